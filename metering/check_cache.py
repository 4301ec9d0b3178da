"""What the budget check API may remember between calls: everything but the spend.

A gateway asks `GET /api/v1/budgets/check` before every model call, mostly for the same
few users. Who a token is, what its owner may read, who the call counts against and
which budgets apply change rarely; the spend changes with every call. So the check keeps
the first (`CheckConfig`) in the cache for `CHECK_CACHE_SECONDS` and reads the spend
every time.

Any change to tokens, memberships, users, teams, projects, organizations or budgets
bumps one version number that is part of every key, so a revoked token, a removed role or
an edited budget is seen by the next call (the cache is shared through Redis when
REDIS_URL is set; a process-local cache only serves a single-process installation). A
cache that is down makes every call compute everything, as without it.
"""

import hashlib
import logging
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django.db.models.signals import post_delete, post_save

logger = logging.getLogger(__name__)

_VERSION_KEY = "budget-check:version"


@dataclass(frozen=True)
class CheckConfig:
    """One (token, query) pair's answer without the spend: the authenticated token, the
    budgets that apply (with their subjects' names) and nothing that changes per call."""

    token: object
    budgets: tuple


def _version() -> int:
    version = cache.get(_VERSION_KEY)
    if version is None:
        cache.add(_VERSION_KEY, 1, timeout=None)
        version = cache.get(_VERSION_KEY) or 1
    return version


def config_key(secret: str, query: str) -> str | None:
    """The cache key of a call, or None when the cache cannot be used."""
    if settings.CHECK_CACHE_SECONDS <= 0:
        return None
    try:
        version = _version()
    except Exception:  # a cache outage must not fail the check
        logger.warning("budget check cache unavailable", exc_info=True)
        return None
    digest = hashlib.sha256(f"{secret}\n{query}".encode()).hexdigest()
    return f"budget-check:{version}:{digest}"


def config_get(key: str | None) -> CheckConfig | None:
    if key is None:
        return None
    try:
        return cache.get(key)
    except Exception:
        logger.warning("budget check cache unavailable", exc_info=True)
        return None


def config_set(key: str | None, config: CheckConfig) -> None:
    if key is None:
        return
    try:
        cache.set(key, config, timeout=settings.CHECK_CACHE_SECONDS)
    except Exception:
        logger.warning("budget check cache unavailable", exc_info=True)


def config_changed(*args, **kwargs) -> None:
    """A signal receiver: forget every remembered check (one version bump)."""
    if kwargs.get("update_fields") and set(kwargs["update_fields"]) <= {"last_login"}:
        return  # a login changes nothing a check depends on
    try:
        try:
            cache.incr(_VERSION_KEY)
        except ValueError:  # no version yet (or it was evicted): start one past any
            cache.set(_VERSION_KEY, 2, timeout=None)
    except Exception:
        logger.warning("budget check cache unavailable; entries expire on their own", exc_info=True)


def connect_signals() -> None:
    from accounts.models import ApiToken, Membership, Organization, Project, Team, User

    from .models import Budget

    for model in (ApiToken, Membership, Organization, Project, Team, User, Budget):
        post_save.connect(config_changed, sender=model, dispatch_uid=f"check-{model.__name__}")
        post_delete.connect(config_changed, sender=model, dispatch_uid=f"check-{model.__name__}-d")
