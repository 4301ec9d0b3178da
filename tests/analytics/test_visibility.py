"""The visibility gate (analytics/visibility.py): each persona sees exactly its scope."""

from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import AnonymousUser
from django.db.models import Count, Sum

from accounts.models import Membership, Role, User
from analytics.visibility import (
    scope_disjoint_parts,
    scope_q,
    viewer_scope,
    visible_event_parts,
    visible_events,
    visible_events_in,
    visible_organizations,
    visible_projects,
    visible_scope_rollup,
    visible_teams,
    visible_tokens,
    visible_users,
)
from metering.models import ScopeUsage15m, UsageEvent
from tests.factories import event_payload, ingest

WHEN = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)

# request_id -> who may see it (besides the platform admin, who sees everything).
EXPECTED = {
    "member-own": {"org_admin", "member"},
    "member-token-for-contractor": {"org_admin", "member"},
    "lead-own-platform-chatbot": {"org_admin", "team_lead", "project_admin"},
    "platform-dev": {"org_admin", "team_lead"},
    "chatbot-dev": {"org_admin", "project_admin"},
    "research-search": {"org_admin"},
    "unattributed": {"org_admin"},
    "project-admin-own": {"org_admin", "project_admin"},
    "beta-outsider": {"outsider"},
    "beta-service": set(),
}


def _ingest_world(personas) -> None:
    alpha, beta = personas.org, personas.other_org
    at = iter(WHEN + timedelta(minutes=13 * i) for i in range(100))

    def ev(request_id, **fields):
        return event_payload(request_id=request_id, timestamp=next(at), **fields)

    results = [
        ingest(
            alpha,
            [
                ev("member-own", user=personas.member.email),
                ev("lead-own-platform-chatbot", user=personas.team_lead.email, project="chatbot"),
                ev("platform-dev", user="dev1@example.test", team="platform"),
                ev("chatbot-dev", user="dev2@example.test", team="research", project="chatbot"),
                ev("research-search", user="dev3@example.test", team="research", project="search"),
                ev("unattributed"),
                ev("project-admin-own", user=personas.project_admin.email, team="research"),
            ],
            token=personas.service_token,
        ),
        ingest(
            alpha,
            [ev("member-token-for-contractor", user="contractor@example.test")],
            token=personas.member_token,
        ),
        ingest(beta, [ev("beta-outsider")], token=personas.outsider_token),
        ingest(beta, [ev("beta-service", team="secret-team")]),
    ]
    assert all(not r.rejected for r in results)


@pytest.fixture
def world(personas):
    _ingest_world(personas)
    return personas


def _fresh(user: User) -> User:
    """The user without the scope cached on the instance."""
    return User.objects.get(pk=user.pk)


def _lead_also_administering_chatbot(world) -> User:
    """The team lead, given the chatbot project's admin role as well."""
    Membership.objects.create(
        organization=world.org,
        user=world.team_lead,
        role=Role.PROJECT_ADMIN,
        project=world.chatbot_project,
    )
    return _fresh(world.team_lead)


@pytest.mark.parametrize(
    "persona", ["org_admin", "team_lead", "project_admin", "member", "outsider"]
)
def test_each_persona_sees_exactly_its_scope(world, persona):
    user = world.users[persona]
    expected = {rid for rid, viewers in EXPECTED.items() if persona in viewers}

    seen = set(visible_events(user).values_list("request_id", flat=True))

    assert seen == expected


@pytest.mark.parametrize(
    "persona", ["platform_admin", "org_admin", "team_lead", "project_admin", "member", "outsider"]
)
@pytest.mark.parametrize("org", ["org", "other_org"])
def test_events_within_an_organization_are_the_gate_s_events_there(world, persona, org):
    user = world.users[persona]
    organization = getattr(world, org)
    expected = set(
        visible_events(user).filter(organization=organization).values_list("id", flat=True)
    )

    seen = set(visible_events_in(_fresh(user), [organization.id]).values_list("id", flat=True))

    assert seen == expected


@pytest.mark.parametrize("persona", ["team_lead", "project_admin", "member", "outsider"])
@pytest.mark.parametrize("org", ["org", "other_org"])
def test_the_parts_of_a_scope_together_are_its_events_and_nothing_else(world, persona, org):
    user = world.users[persona]
    organization = getattr(world, org)
    expected = set(
        visible_events(user).filter(organization=organization).values_list("id", flat=True)
    )

    parts = visible_event_parts(_fresh(user), [organization.id])
    seen = [set(part.values_list("id", flat=True)) for part in parts]

    assert set().union(*seen) == expected
    assert all(part <= expected for part in seen)  # no part reaches past the gate


def test_platform_admin_sees_everything(world):
    seen = set(visible_events(world.platform_admin).values_list("request_id", flat=True))

    assert seen == set(EXPECTED)


def test_member_sees_only_own_events_and_own_tokens_events(world):
    events = visible_events(world.member)

    assert all(
        e.user_id == world.member.id or e.api_token_id == world.member_token.id for e in events
    )


def test_outsider_sees_nothing_of_the_other_organization(world):
    assert not visible_events(world.outsider).filter(organization=world.org).exists()
    assert not visible_scope_rollup(world.outsider).filter(organization=world.org).exists()


@pytest.mark.parametrize(
    "persona", ["platform_admin", "org_admin", "team_lead", "project_admin", "member", "outsider"]
)
def test_scope_predicate_gives_the_same_sums_on_the_rollup_as_on_events(world, persona):
    scope = viewer_scope(world.users[persona])
    measures = ("input_tokens", "output_tokens", "cost_nanos")

    raw = UsageEvent.objects.filter(scope_q(scope)).aggregate(
        requests=Count("id"), **{m: Sum(m) for m in measures}
    )
    rolled = ScopeUsage15m.objects.filter(scope_q(scope)).aggregate(
        requests=Sum("requests"), **{m: Sum(m) for m in measures}
    )
    gated = visible_scope_rollup(world.users[persona]).aggregate(
        requests=Sum("requests"), **{m: Sum(m) for m in measures}
    )

    assert rolled == raw
    assert gated["requests"] == raw["requests"] or (
        gated["requests"] is None and raw["requests"] == 0
    )


def test_visibility_is_the_union_of_every_role(world):
    lead = _lead_also_administering_chatbot(world)
    expected = {
        rid for rid, viewers in EXPECTED.items() if {"team_lead", "project_admin"} & viewers
    }

    seen = set(visible_events(lead).values_list("request_id", flat=True))

    assert seen == expected


@pytest.mark.parametrize("persona", ["team_lead", "project_admin", "member", "lead_and_project"])
def test_disjoint_parts_hold_each_visible_event_once_and_nothing_else(world, persona):
    """Counting a partial scope part by part adds up to its events: the team lead's own
    event of a project they also administer is in one part, not two."""
    if persona == "lead_and_project":
        user = _lead_also_administering_chatbot(world)
    else:
        user = world.users[persona]
    scope = viewer_scope(user)
    parts = scope_disjoint_parts(scope)
    in_parts = [
        request_id
        for part in parts
        for request_id in UsageEvent.objects.filter(part).values_list("request_id", flat=True)
    ]

    assert len(parts) >= 2
    assert sorted(in_parts) == sorted(visible_events(user).values_list("request_id", flat=True))
    assert len(in_parts) == len(set(in_parts))


def test_a_scope_of_whole_organizations_has_no_disjoint_parts(world):
    assert scope_disjoint_parts(viewer_scope(world.org_admin)) is None
    assert scope_disjoint_parts(viewer_scope(world.platform_admin)) is None


def test_a_person_in_two_organizations_sees_each_by_their_role_there(world):
    Membership.objects.create(organization=world.other_org, user=world.member, role=Role.ORG_ADMIN)
    member = _fresh(world.member)

    seen = set(visible_events(member).values_list("request_id", flat=True))

    assert seen == {"member-own", "member-token-for-contractor", "beta-outsider", "beta-service"}


def test_a_team_lead_membership_without_a_team_grants_nothing(world):
    lonely = User.objects.create_user("lonely@example.test")
    Membership.objects.create(organization=world.org, user=lonely, role=Role.TEAM_LEAD)

    assert not visible_events(lonely).exists()


@pytest.mark.parametrize("who", ["anonymous", "inactive"])
def test_anonymous_and_inactive_people_see_nothing(world, who):
    if who == "anonymous":
        user = AnonymousUser()
    else:
        user = _fresh(world.org_admin)
        user.is_active = False

    assert not visible_events(user).exists()
    assert not visible_scope_rollup(user).exists()


def test_option_lists_never_name_the_other_organizations_objects(world):
    outsider = world.outsider

    assert set(visible_organizations(outsider)) == {world.other_org}
    assert world.platform_team not in visible_teams(outsider)
    assert world.chatbot_project not in visible_projects(outsider)
    assert world.org_admin not in visible_users(outsider)
    assert world.service_token not in visible_tokens(outsider)


def test_option_lists_of_a_member_stay_within_their_scope(world):
    member = world.member

    assert set(visible_organizations(member)) == {world.org}
    assert world.secret_team not in visible_teams(member)
    assert world.outsider not in visible_users(member)
    # Their own token, and the gateway their own events came through; nothing else.
    assert set(visible_tokens(member)) == {world.member_token, world.service_token}


def test_org_admin_option_lists_cover_the_organization(world):
    admin = world.org_admin

    assert {world.platform_team, world.research_team} <= set(visible_teams(admin))
    assert world.secret_team not in visible_teams(admin)
    assert {world.service_token, world.member_token} <= set(visible_tokens(admin))
    assert world.outsider_token not in visible_tokens(admin)


def test_a_token_owned_in_another_organization_reaches_its_usage_there(world):
    """A person owns a token of an organization they hold no role in: the gate shows the
    token's events and the teams and people on them, and no other event of that
    organization."""
    from tests.factories import ApiTokenFactory

    admin = world.org_admin
    token = ApiTokenFactory(organization=world.other_org, name="side key", owner=admin)
    result = ingest(
        world.other_org,
        [event_payload(request_id="side-key-call", user="side@example.test", team="secret-team")],
        token=token,
    )
    assert not result.rejected
    admin = _fresh(admin)

    scope = viewer_scope(admin)
    assert world.other_org.id in scope.token_org_ids
    assert world.other_org.id not in scope.member_org_ids
    beta_ids = set(
        visible_events_in(admin, [world.other_org.id]).values_list("request_id", flat=True)
    )
    assert beta_ids == {"side-key-call"}
    assert world.secret_team in set(visible_teams(admin))
    assert User.objects.get(email="side@example.test") in set(visible_users(admin))
    assert world.outsider not in set(visible_users(admin))
