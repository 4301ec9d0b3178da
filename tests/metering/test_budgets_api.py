"""GET /api/v1/budgets/check: every budget that applies to a call, within what the token
may read; cheap enough to call before each model call."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from accounts.models import Role
from metering.budgets import period_at, zone_of
from tests.conftest import bearer
from tests.factories import ApiTokenFactory, MembershipFactory, ingest
from tests.metering.budget_helpers import make_budget, spend_event

pytestmark = pytest.mark.django_db
URL = "/api/v1/budgets/check"


@pytest.fixture
def world(personas):
    org = personas.org
    b = {
        "org": make_budget(org, "org", "100"),
        "member": make_budget(org, "user", "10", user=personas.member, period="daily"),
        "research": make_budget(org, "team", "50", team=personas.research_team),
        "search": make_budget(org, "project", "30", project=personas.search_project),
        "platform": make_budget(org, "team", "40", team=personas.platform_team),
        "member_key": make_budget(org, "token", "5", api_token=personas.member_token),
        "beta": make_budget(personas.other_org, "org", "1000"),
    }
    recent = datetime.now(UTC) - timedelta(minutes=3)
    # The member spends 4 through their key (team research, project search by default).
    ingest(
        org,
        [spend_event("4", user="member@example.test", timestamp=recent)],
        token=personas.member_token,
    )
    ingest(org, [spend_event("1.5", team="platform", timestamp=recent)])
    return b


def check(client, token, **params):
    return client.get(URL, params, **bearer(token))


def scopes(response) -> dict:
    return {(b["scope"]["type"], b["scope"]["name"]): b for b in response.json()["budgets"]}


def test_a_gateway_token_sees_every_budget_that_applies_to_a_user(client, personas, world):
    response = check(client, personas.service_token, user="member@example.test")
    assert response.status_code == 200
    body = response.json()
    assert body["allowed"] is True
    by_scope = scopes(response)
    assert set(by_scope) == {
        ("org", "Alpha Corp"),
        ("user", "member@example.test"),
        ("team", "Research"),
        ("project", "Search"),
    }
    mine = by_scope[("user", "member@example.test")]
    assert mine["limit_usd"] == "10.0000"
    assert mine["spent_usd"] == "4.000000000"
    assert mine["remaining_usd"] == "6.000000000"
    assert Decimal(by_scope[("org", "Alpha Corp")]["spent_usd"]) == Decimal("5.5")
    period = period_at(world["member"], zone_of(personas.org), datetime.now(UTC))
    assert datetime.fromisoformat(mine["resets_at"]) == period.end
    assert mine["resets_at"].endswith(("+01:00", "+02:00"))  # Berlin time
    assert mine["period"] == "daily"


def test_the_token_used_for_the_call_adds_its_budget_and_can_deny(client, personas, world):
    ingest(
        personas.org,
        [
            spend_event(
                "1", user="member@example.test", timestamp=datetime.now(UTC) - timedelta(minutes=1)
            )
        ],
        token=personas.member_token,
    )  # the key's budget: 5 of 5
    response = check(
        client,
        personas.service_token,
        user="member@example.test",
        api_key_id=personas.member_token.id,
    )
    body = response.json()
    assert body["allowed"] is False
    key = scopes(response)[("token", "member's key")]
    assert key["remaining_usd"] == "0.000000000"
    # Named by its prefix alone, the token brings its owner (as ingestion attributes
    # the owner's calls), and with them their default team and project.
    by_prefix = check(client, personas.service_token, api_key_id=personas.member_token.prefix)
    assert set(scopes(by_prefix)) == {
        ("org", "Alpha Corp"),
        ("token", "member's key"),
        ("user", "member@example.test"),
        ("team", "Research"),
        ("project", "Search"),
    }


def test_an_explicit_team_or_project_replaces_the_users_default(client, personas, world):
    response = check(client, personas.service_token, user="member@example.test", team="platform")
    assert set(scopes(response)) == {
        ("org", "Alpha Corp"),
        ("user", "member@example.test"),
        ("team", "Platform"),
        ("project", "Search"),  # still the member's default project
    }
    by_id = check(client, personas.service_token, project=str(personas.search_project.id))
    assert set(scopes(by_id)) == {("org", "Alpha Corp"), ("project", "Search")}


def test_a_service_accounts_token_brings_no_user(client, personas, world):
    response = check(client, personas.service_token, api_key_id=personas.service_token.id)
    assert set(scopes(response)) == {("org", "Alpha Corp")}


def test_an_over_budget_team_is_not_allowed(client, personas, world):
    ingest(
        personas.org,
        [spend_event("39", team="platform", timestamp=datetime.now(UTC) - timedelta(minutes=1))],
    )
    response = check(client, personas.service_token, team="platform")
    assert response.json()["allowed"] is False


def test_a_members_own_token_sees_only_budgets_the_member_may_see(client, personas, world):
    response = check(
        client,
        personas.member_token,
        user="member@example.test",
        api_key_id=personas.member_token.id,
    )
    assert response.status_code == 200
    assert set(scopes(response)) == {("user", "member@example.test"), ("token", "member's key")}


@pytest.mark.parametrize(
    "params",
    [
        {"user": "lead@example.test"},
        {"team": "platform"},
        {"project": "chatbot"},
        {"user": "outsider@beta.test"},
    ],
)
def test_a_members_token_cannot_ask_about_others(client, personas, world, params):
    assert check(client, personas.member_token, **params).status_code == 404


@pytest.mark.parametrize(
    "params",
    [
        {"user": "member@example.test"},
        {"team": "platform"},
        {"project": "search"},
        {"api_key_id": "1"},
        {"user": "nobody@example.test"},
    ],
)
def test_another_organizations_token_learns_nothing(client, personas, world, params):
    params = dict(params)
    if "api_key_id" in params:
        params["api_key_id"] = str(personas.member_token.id)
    response = check(client, personas.outsider_token, **params)
    assert response.status_code == 404
    assert "Alpha" not in response.content.decode()


def test_a_team_leads_token_sees_the_team_budget(client, personas, world):
    token = ApiTokenFactory(organization=personas.org, owner=personas.team_lead, name="lead key")
    response = check(client, token, team="platform")
    assert set(scopes(response)) == {("team", "Platform")}


def test_an_org_admins_token_sees_everything_in_the_org(client, personas, world):
    token = ApiTokenFactory(organization=personas.org, owner=personas.org_admin, name="admin key")
    response = check(client, token, user="member@example.test")
    assert len(response.json()["budgets"]) == 4


def test_authentication_and_parameters(client, personas, world):
    assert client.get(URL, {"user": "member@example.test"}).status_code == 401
    ingest_only = ApiTokenFactory(organization=personas.org, scopes=["ingest"])
    assert check(client, ingest_only, user="member@example.test").status_code == 401
    assert check(client, personas.service_token).status_code == 400
    assert check(client, personas.service_token, team="no-such-team").status_code == 404
    assert check(client, personas.service_token, api_key_id="999999").status_code == 404


def test_no_budget_means_allowed(client, personas):
    MembershipFactory(organization=personas.org, user=personas.outsider, role=Role.MEMBER)
    response = check(client, personas.service_token, user="outsider@beta.test")
    assert response.json() == {"allowed": True, "budgets": []}


def test_paused_budgets_do_not_count(client, personas, world):
    world["member"].is_active = False
    world["member"].save()
    response = check(client, personas.service_token, user="member@example.test")
    assert ("user", "member@example.test") not in scopes(response)


def test_a_check_costs_a_handful_of_indexed_queries(
    client, personas, world, django_assert_max_num_queries, settings
):
    settings.CHECK_CACHE_SECONDS = 0  # every lookup, as on a first call
    check(client, personas.service_token, user="member@example.test")  # last_used_at written
    # Token, subject (memberships), budgets, one spend sum for all of them.
    with django_assert_max_num_queries(4):
        response = check(client, personas.service_token, user="member@example.test")
    assert len(response.json()["budgets"]) == 4


def test_a_repeated_check_reads_only_the_spend_and_sees_new_spend_at_once(
    client, personas, world, django_assert_num_queries
):
    first = check(client, personas.service_token, user="member@example.test")
    ingest(
        personas.org,
        [spend_event("2", user="member@example.test", timestamp=datetime.now(UTC))],
        token=personas.member_token,
    )

    with django_assert_num_queries(1):  # the spend sum; who and which budgets: remembered
        again = check(client, personas.service_token, user="member@example.test")

    mine = ("user", "member@example.test")
    assert scopes(first)[mine]["spent_usd"] == "4.000000000"
    assert scopes(again)[mine]["spent_usd"] == "6.000000000"


def test_a_remembered_check_sees_revocations_role_and_budget_changes_at_once(
    client, personas, world
):
    lead = ApiTokenFactory(organization=personas.org, owner=personas.team_lead, scopes=["read"])
    assert ("team", "Platform") in scopes(check(client, lead, team="platform"))
    assert check(client, personas.service_token, user="member@example.test").status_code == 200

    world["platform"].is_active = False  # a budget paused
    world["platform"].save()
    assert ("team", "Platform") not in scopes(check(client, lead, team="platform"))

    personas.team_lead.memberships.filter(role=Role.TEAM_LEAD).delete()  # a role removed
    assert check(client, lead, team="platform").status_code == 404

    from accounts.tokens import token_revoke

    token_revoke(token=personas.service_token)  # a token revoked
    assert check(client, personas.service_token, user="member@example.test").status_code == 401


def test_the_check_answers_when_the_cache_is_down(client, personas, world, monkeypatch):
    from django.core.cache import cache

    def down(*args, **kwargs):
        raise ConnectionError("cache down")

    for name in ("get", "set", "add", "incr"):
        monkeypatch.setattr(cache, name, down)

    response = check(client, personas.service_token, user="member@example.test")

    assert response.status_code == 200
    assert len(response.json()["budgets"]) == 4
