"""factory_boy factories for tenancy objects, and builders of usage event payloads.

Usage events are never created with a factory: they go through `ingest_batch` (or the
HTTP API), the one write path that also keeps the roll-ups exact. `event_payload` builds
the JSON object the API takes; `ingest` sends a list of them through `ingest_batch`.
"""

import itertools
from datetime import UTC, datetime, timedelta

import factory
from django.contrib.auth.hashers import make_password

from accounts.models import ApiToken, Membership, Organization, Project, Role, Team, User
from accounts.tokens import token_issue
from metering.ingest import IngestResult, ingest_batch

PASSWORD = "pw-for-tests"
# Hashed once: every factory user gets the same (valid) password without paying for
# the hasher per user.
_PASSWORD_HASH = None


def _password_hash() -> str:
    global _PASSWORD_HASH
    if _PASSWORD_HASH is None:
        _PASSWORD_HASH = make_password(PASSWORD)
    return _PASSWORD_HASH


class OrganizationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Organization
        django_get_or_create = ("slug",)

    slug = factory.Sequence(lambda n: f"org-{n}")
    name = factory.LazyAttribute(lambda o: o.slug.replace("-", " ").title())
    timezone = "UTC"


class TeamFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Team

    organization = factory.SubFactory(OrganizationFactory)
    slug = factory.Sequence(lambda n: f"team-{n}")
    name = factory.LazyAttribute(lambda o: o.slug.replace("-", " ").title())


class ProjectFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Project

    organization = factory.SubFactory(OrganizationFactory)
    slug = factory.Sequence(lambda n: f"project-{n}")
    name = factory.LazyAttribute(lambda o: o.slug.replace("-", " ").title())


class UserFactory(factory.django.DjangoModelFactory):
    """A person who can sign in with `factories.PASSWORD`."""

    class Meta:
        model = User
        django_get_or_create = ("email",)

    email = factory.Sequence(lambda n: f"person{n}@example.test")
    name = factory.Faker("name")
    password = factory.LazyFunction(_password_hash)


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    organization = factory.SubFactory(OrganizationFactory)
    user = factory.SubFactory(UserFactory)
    role = Role.MEMBER


class ApiTokenFactory(factory.django.DjangoModelFactory):
    """An API token issued through `token_issue`; the plain secret is on `token.secret`.

    The secret exists only on the returned Python object (as it would be shown once to
    the person who created it); the database row holds its hash.
    """

    class Meta:
        model = ApiToken

    organization = factory.SubFactory(OrganizationFactory)
    name = factory.Sequence(lambda n: f"token {n}")
    owner = None
    scopes = factory.LazyFunction(lambda: ["ingest", "read"])
    service_account = ""
    default_team = None
    default_project = None

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        issued = token_issue(**kwargs)
        issued.token.secret = issued.secret
        return issued.token


# ---------------------------------------------------------------------------------------
# Usage events

_request_ids = itertools.count(1)


def next_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{next(_request_ids):08d}"


def recent(minutes: float = 30) -> datetime:
    """A UTC time `minutes` ago (ingestion rejects times over 5 minutes ahead)."""
    return datetime.now(UTC) - timedelta(minutes=minutes)


def event_payload(**fields) -> dict:
    """A valid event as the ingestion API takes it; `fields` override or add keys.

    A datetime `timestamp` is turned into RFC 3339; pass `field=None` to drop a key.
    """
    event = {
        "request_id": next_request_id(),
        "timestamp": recent(),
        "model": "gpt-4o-mini",
        "provider": "openai",
        "input_tokens": 1000,
        "output_tokens": 100,
        "latency_ms": 800,
    }
    event.update(fields)
    if isinstance(event.get("timestamp"), datetime):
        event["timestamp"] = event["timestamp"].isoformat()
    return {k: v for k, v in event.items() if v is not None}


def ingest(
    organization: Organization,
    events: list[dict],
    *,
    token: ApiToken | None = None,
    now: datetime | None = None,
) -> IngestResult:
    """Send `events` through `ingest_batch` (the API's write path, without HTTP).

    `now` moves the clock for the 5-minute future check, for events dated after today.
    """
    return ingest_batch(organization=organization, events=events, token=token, now=now)
