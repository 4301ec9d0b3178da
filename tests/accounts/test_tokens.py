"""API tokens: hashed at rest, shown once, revocable, last-used time (accounts/tokens.py)."""

import hashlib
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from accounts.models import ApiToken
from accounts.tokens import (
    TOKEN_PREFIX,
    token_authenticate,
    token_issue,
    token_revoke,
    token_rotate,
)
from tests.conftest import bearer


def _row_values(token: ApiToken) -> list[str]:
    """Every column of the token's row as the database stores it, as text."""
    table = connection.ops.quote_name(ApiToken._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {table} WHERE id = %s", [token.id])
        return [str(value) for value in cursor.fetchone()]


def test_token_secret_is_never_stored_in_plain_text(org, member):
    issued = token_issue(organization=org, name="laptop", owner=member, scopes=["ingest"])

    values = _row_values(issued.token)

    assert issued.secret.startswith(TOKEN_PREFIX)
    assert not any(issued.secret in value for value in values)
    # Neither the random part alone (ud_<public>_<random>; the random part may itself
    # hold an underscore, so split at the first two only).
    random_part = issued.secret.split("_", 2)[2]
    assert len(random_part) >= 40
    assert not any(random_part in value for value in values)
    assert hashlib.sha256(issued.secret.encode()).hexdigest() in values


def test_token_prefix_is_the_public_start_of_the_secret(org):
    issued = token_issue(organization=org, name="ci")

    assert issued.secret.startswith(issued.token.prefix + "_")
    assert len(issued.token.prefix) < len(issued.secret) // 3


def test_two_tokens_never_share_a_secret(org):
    a = token_issue(organization=org, name="a")
    b = token_issue(organization=org, name="b")

    assert a.secret != b.secret
    assert a.token.prefix != b.token.prefix


def test_token_authenticates_only_with_its_scope(org):
    issued = token_issue(organization=org, name="reader", scopes=["read"])

    assert token_authenticate(issued.secret, scope="read") == issued.token
    assert token_authenticate(issued.secret, scope="ingest") is None


@pytest.mark.parametrize(
    "secret",
    ["", "nonsense", TOKEN_PREFIX, TOKEN_PREFIX + "deadbeef_" + "x" * 43, TOKEN_PREFIX + "y" * 300],
)
def test_unknown_secrets_do_not_authenticate(org, secret):
    token_issue(organization=org, name="real one")

    assert token_authenticate(secret, scope="ingest") is None


def test_unknown_scope_cannot_be_issued(org):
    with pytest.raises(ValueError, match="admin"):
        token_issue(organization=org, name="x", scopes=["admin"])


def test_revoked_token_no_longer_authenticates(org):
    issued = token_issue(organization=org, name="old")
    token_revoke(token=issued.token)

    assert token_authenticate(issued.secret, scope="ingest") is None
    assert ApiToken.objects.active().filter(id=issued.token.id).count() == 0


def test_revoked_token_gets_401_from_both_apis(client, org, make_event):
    issued = token_issue(organization=org, name="old", scopes=["ingest", "read"])
    token_revoke(token=issued.token)

    ingest = client.post(
        "/api/v1/events",
        data={"events": [make_event()]},
        content_type="application/json",
        **bearer(issued.secret),
    )
    usage = client.get("/api/v1/usage", {"start_time": 0}, **bearer(issued.secret))

    assert ingest.status_code == 401
    assert ingest["WWW-Authenticate"].startswith("Bearer")
    assert usage.status_code == 401


def test_rotating_a_token_revokes_it_and_keeps_its_settings(org, member, personas):
    issued = token_issue(
        organization=org,
        name="ci",
        owner=member,
        scopes=["ingest", "read"],
        default_team=personas.research_team,
    )

    new = token_rotate(token=issued.token)

    assert token_authenticate(issued.secret, scope="ingest") is None
    assert token_authenticate(new.secret, scope="ingest") == new.token
    assert (new.token.owner, new.token.scopes, new.token.default_team) == (
        member,
        ["ingest", "read"],
        personas.research_team,
    )


def test_last_used_at_is_set_when_the_token_is_used(client, service_token, make_event):
    assert service_token.last_used_at is None

    response = client.post(
        "/api/v1/events",
        data={"events": [make_event()]},
        content_type="application/json",
        **bearer(service_token),
    )

    assert response.status_code == 200
    service_token.refresh_from_db()
    assert timezone.now() - service_token.last_used_at < timedelta(seconds=30)


def test_last_used_at_is_refreshed_at_most_once_a_minute(service_token):
    token_authenticate(service_token.secret, scope="ingest")
    service_token.refresh_from_db()
    first = service_token.last_used_at

    token_authenticate(service_token.secret, scope="ingest")
    service_token.refresh_from_db()
    assert service_token.last_used_at == first

    ApiToken.objects.filter(id=service_token.id).update(
        last_used_at=timezone.now() - timedelta(minutes=5)
    )
    token_authenticate(service_token.secret, scope="ingest")
    service_token.refresh_from_db()
    assert timezone.now() - service_token.last_used_at < timedelta(seconds=30)


# ---------------------------------------------------------------------------------------
# manage.py issue_token


def test_issue_token_command_prints_only_the_secret(org, member, personas):
    out, err = StringIO(), StringIO()

    call_command(
        "issue_token",
        "--org",
        "alpha",
        "--name",
        "deploy bot",
        "--owner",
        "MEMBER@example.test",
        "--scopes",
        "ingest,read",
        "--team",
        "research",
        "--project",
        "search",
        stdout=out,
        stderr=err,
    )

    secret = out.getvalue().strip()
    assert "\n" not in secret and " " not in secret
    assert err.getvalue() == ""
    token = token_authenticate(secret, scope="read")
    assert token is not None
    assert (token.name, token.owner, token.organization) == ("deploy bot", member, org)
    assert sorted(token.scopes) == ["ingest", "read"]
    assert (token.default_team, token.default_project) == (
        personas.research_team,
        personas.search_project,
    )
    assert secret not in _row_values(token)


def test_issue_token_command_defaults_to_the_ingest_scope(org):
    out = StringIO()
    call_command("issue_token", "--org", "alpha", "--name", "gw", stdout=out)

    token = token_authenticate(out.getvalue().strip(), scope="ingest")
    assert token.scopes == ["ingest"]
    assert token.owner is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--org", "nope", "--name", "x"], "No organization"),
        (["--org", "alpha", "--name", "x", "--owner", "ghost@example.test"], "No user"),
        (["--org", "alpha", "--name", "x", "--scopes", "ingest,admin"], "--scopes"),
        (["--org", "alpha", "--name", "x", "--team", "secret-team"], "No team"),
        (["--org", "alpha", "--name", "x", "--project", "secret-project"], "No project"),
    ],
)
def test_issue_token_command_refuses_bad_arguments(personas, args, message):
    before = ApiToken.objects.count()

    with pytest.raises(CommandError, match=message):
        call_command("issue_token", *args, stdout=StringIO())

    assert ApiToken.objects.count() == before
