"""Strict readers for configuration from environment variables.

A bad value raises ImproperlyConfigured at start-up instead of silently falling back.
"""

import os
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {raw!r}")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None


def env_list(name: str, default: list[str] | None = None) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return list(default or [])
    return [item.strip() for item in raw.split(",") if item.strip()]


def database_from_url(url: str) -> dict:
    """Turn postgres://user:pass@host:port/name?sslmode=require into a DATABASES entry."""
    parsed = urlparse(url)
    if parsed.scheme not in {"postgres", "postgresql", "pgsql"}:
        raise ImproperlyConfigured(
            f"DATABASE_URL must start with postgres:// or postgresql://, got {parsed.scheme!r}"
        )
    name = unquote(parsed.path.lstrip("/"))
    if not name:
        raise ImproperlyConfigured("DATABASE_URL must name a database, e.g. postgres://host/usage")
    options = {key: values[-1] for key, values in parse_qs(parsed.query).items()}
    if not env_bool("DATABASE_JIT", False):
        # PostgreSQL's JIT pays off for minutes-long analytics; the dashboard's reads take
        # milliseconds, and a plan with many branches (one per time range) spent seconds
        # compiling. Off for this application's sessions unless DATABASE_JIT=1.
        options["options"] = f"{options.get('options', '')} -c jit=off".strip()
    # Parallel workers per query: starting them costs about 10 ms, more than a roll-up
    # read of UNION ALL branches takes (the planner picks a Parallel Append for them), and
    # concurrent requests already use every core. 0 by default; DATABASE_PARALLEL_WORKERS
    # restores PostgreSQL's own setting for this application's sessions.
    workers = env_int("DATABASE_PARALLEL_WORKERS", 0)
    options["options"] = (
        f"{options.get('options', '')} -c max_parallel_workers_per_gather={workers}".strip()
    )
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": unquote(parsed.username or ""),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": parsed.hostname or "",
        "PORT": str(parsed.port or ""),
        "OPTIONS": options,
        "CONN_MAX_AGE": env_int("DATABASE_CONN_MAX_AGE", 60),
        "CONN_HEALTH_CHECKS": True,
    }
