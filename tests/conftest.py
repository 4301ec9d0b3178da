"""Shared fixtures: the personas of SPEC section 2 and helpers to send and read usage.

The world every persona fixture lives in (built once per test by `personas`):

    organization "alpha" (Alpha Corp, Europe/Berlin)   organization "beta" (Beta Inc)
      teams:    platform, research                        team:    secret-team
      projects: chatbot, search                           project: secret-project
      platform_admin  sees everything (belongs to no organization)
      org_admin       org admin of alpha
      team_lead       team lead of alpha/platform (and a member of it)
      project_admin   project admin of alpha/chatbot
      member          member of alpha (team research, project search), owns member_token
      outsider        member of beta, owns outsider_token
      service_token   alpha's token with no owner (a gateway): ingest + read

Every token's plain secret is on `token.secret`.
"""

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.core.cache import cache

from accounts.models import ApiToken, Organization, Project, Role, Team, User
from tests.factories import (
    ApiTokenFactory,
    MembershipFactory,
    OrganizationFactory,
    ProjectFactory,
    TeamFactory,
    UserFactory,
    event_payload,
)


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix):
    """Give each test process its own on-disk test database.

    SQLite: a file instead of ":memory:", so that `live_server` threads get connections of
    their own (an in-memory database makes every server thread share the test's single
    connection, and concurrent ingestion could not be tested). Both engines: the name
    carries the process id, so two test runs on one machine do not drop each other's
    database.
    """
    from django.conf import settings

    db = settings.DATABASES["default"]
    test = db.setdefault("TEST", {})
    if test.get("NAME"):
        return  # chosen explicitly (or by pytest-xdist): keep it
    if db["ENGINE"] == "django.db.backends.sqlite3":
        test["NAME"] = os.path.join(tempfile.gettempdir(), f"usage_test_{os.getpid()}.sqlite3")
    else:
        test["NAME"] = f"test_{db['NAME']}_{os.getpid()}"


@pytest.fixture(scope="session", autouse=True)
def _no_session_left_on_the_test_database(django_db_setup, django_db_blocker):
    """PostgreSQL drops no database that has sessions. live_server's handler threads
    outlive their tests while a client (an SDK's pooled HTTP connection) keeps their
    socket open, each with its database connection: end those sessions before the test
    database is dropped, or every run would leave its database behind."""
    yield
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    others = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(f"SELECT pg_terminate_backend(pid) {others}")
        for _ in range(50):  # they end a moment after being told to
            cursor.execute(f"SELECT count(*) {others}")
            if not cursor.fetchone()[0]:
                break
            time.sleep(0.1)
    connection.close()


@pytest.fixture(autouse=True)
def _fast_and_isolated(settings):
    """Cheap password hashing, and no rate-limit counters left over from other tests; no
    connection of the dashboard's side thread left open (a test database with one open
    could not be dropped)."""
    from analytics.queries import close_side_connections

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    cache.clear()
    yield
    cache.clear()
    close_side_connections()


@pytest.fixture
def shared_rollups_only(monkeypatch):
    """Reads take the shared roll-ups, as they do for a viewer whose own roll-up rows are
    being rebuilt (metering.viewers): for tests of that path."""
    from analytics import queries

    monkeypatch.setattr(queries, "_viewer_read", lambda sel, bucketing=None: None)


@dataclass
class Personas:
    org: Organization
    other_org: Organization
    platform_team: Team
    research_team: Team
    chatbot_project: Project
    search_project: Project
    secret_team: Team
    secret_project: Project
    platform_admin: User
    org_admin: User
    team_lead: User
    project_admin: User
    member: User
    outsider: User
    member_token: ApiToken
    outsider_token: ApiToken
    service_token: ApiToken

    @property
    def users(self) -> dict[str, User]:
        """Every persona by fixture name."""
        return {
            name: getattr(self, name)
            for name in (
                "platform_admin",
                "org_admin",
                "team_lead",
                "project_admin",
                "member",
                "outsider",
            )
        }


@pytest.fixture
def personas(db) -> Personas:
    """The whole world of the module docstring, as one object."""
    org = OrganizationFactory(slug="alpha", name="Alpha Corp", timezone="Europe/Berlin")
    other = OrganizationFactory(slug="beta", name="Beta Inc", timezone="America/New_York")
    platform = TeamFactory(organization=org, slug="platform", name="Platform")
    research = TeamFactory(organization=org, slug="research", name="Research")
    chatbot = ProjectFactory(organization=org, slug="chatbot", name="Chatbot")
    search = ProjectFactory(organization=org, slug="search", name="Search")
    secret_team = TeamFactory(organization=other, slug="secret-team", name="Secret Team")
    secret_project = ProjectFactory(
        organization=other, slug="secret-project", name="Secret Project"
    )

    platform_admin = UserFactory(
        email="admin@example.test", name="Platform Admin", is_platform_admin=True
    )
    org_admin = UserFactory(email="orgadmin@example.test", name="Olga Orgadmin")
    MembershipFactory(organization=org, user=org_admin, role=Role.ORG_ADMIN)
    team_lead = UserFactory(email="lead@example.test", name="Lea Lead")
    MembershipFactory(organization=org, user=team_lead, role=Role.TEAM_LEAD, team=platform)
    MembershipFactory(organization=org, user=team_lead, role=Role.MEMBER, team=platform)
    project_admin = UserFactory(email="projectadmin@example.test", name="Pia Projectadmin")
    MembershipFactory(
        organization=org, user=project_admin, role=Role.PROJECT_ADMIN, project=chatbot
    )
    member = UserFactory(email="member@example.test", name="Max Member")
    MembershipFactory(
        organization=org, user=member, role=Role.MEMBER, team=research, project=search
    )
    outsider = UserFactory(email="outsider@beta.test", name="Otto Outsider")
    MembershipFactory(organization=other, user=outsider, role=Role.MEMBER, team=secret_team)

    member_token = ApiTokenFactory(organization=org, name="member's key", owner=member)
    outsider_token = ApiTokenFactory(organization=other, name="outsider's key", owner=outsider)
    service_token = ApiTokenFactory(
        organization=org, name="gateway", owner=None, service_account="svc-gateway"
    )
    return Personas(
        org=org,
        other_org=other,
        platform_team=platform,
        research_team=research,
        chatbot_project=chatbot,
        search_project=search,
        secret_team=secret_team,
        secret_project=secret_project,
        platform_admin=platform_admin,
        org_admin=org_admin,
        team_lead=team_lead,
        project_admin=project_admin,
        member=member,
        outsider=outsider,
        member_token=member_token,
        outsider_token=outsider_token,
        service_token=service_token,
    )


@pytest.fixture
def org(personas) -> Organization:
    """Organization "alpha", where every persona but the outsider works."""
    return personas.org


@pytest.fixture
def other_org(personas) -> Organization:
    """Organization "beta", the outsider's; nothing of it may show in alpha."""
    return personas.other_org


@pytest.fixture
def platform_admin(personas) -> User:
    """Sees every organization; holds no membership."""
    return personas.platform_admin


@pytest.fixture
def org_admin(personas) -> User:
    """Org admin of alpha: sees every alpha event."""
    return personas.org_admin


@pytest.fixture
def team_lead(personas) -> User:
    """Team lead of alpha/platform: sees that team's events (and their own)."""
    return personas.team_lead


@pytest.fixture
def project_admin(personas) -> User:
    """Project admin of alpha/chatbot: sees that project's events (and their own)."""
    return personas.project_admin


@pytest.fixture
def member(personas) -> User:
    """Plain member of alpha (team research, project search): own events, own token's."""
    return personas.member


@pytest.fixture
def member_token(personas) -> ApiToken:
    """Alpha token owned by `member`, scopes ingest + read; secret on `.secret`."""
    return personas.member_token


@pytest.fixture
def outsider(personas) -> User:
    """Member of beta only: must learn nothing about alpha."""
    return personas.outsider


@pytest.fixture
def outsider_token(personas) -> ApiToken:
    """Beta token owned by `outsider`, scopes ingest + read; secret on `.secret`."""
    return personas.outsider_token


@pytest.fixture
def service_token(personas) -> ApiToken:
    """Alpha gateway token with no owner, scopes ingest + read; reads all of alpha."""
    return personas.service_token


def bearer(token_or_secret) -> dict:
    """Test-client keyword arguments for `Authorization: Bearer <secret>`."""
    secret = getattr(token_or_secret, "secret", token_or_secret)
    return {"HTTP_AUTHORIZATION": f"Bearer {secret}"}


@pytest.fixture
def post_events(client, service_token) -> Callable:
    """POST to /api/v1/events through Django's test client; returns the response.

    post_events(events)                   a list of event dicts, sent as {"events": events}
    post_events(events, token=member_token)   another token (or a plain secret string)
    post_events(body=b"...")              a raw body (str or bytes) instead
    post_events(events, token=None)       no Authorization header at all
    Default token: `service_token`.
    """
    sentinel = object()

    def send(events=None, *, token=sentinel, body=None):
        if token is sentinel:
            token = service_token
        if body is None:
            body = json.dumps({"events": events})
        headers = bearer(token) if token is not None else {}
        return client.post("/api/v1/events", data=body, content_type="application/json", **headers)

    return send


@pytest.fixture
def make_event() -> Callable[..., dict]:
    """`event_payload` as a fixture: a valid event dict with a fresh request_id."""
    return event_payload
