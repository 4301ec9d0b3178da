"""Ingestion and tenancy: slugs resolve only inside the token's organization; people,
teams and projects default from the token and the membership."""

import pytest

from accounts.models import Membership, Role, UnknownLabelPolicy, User
from accounts.tokens import token_issue
from metering.models import LatencyHistogramHourly, OrgUsage15m, ScopeUsage15m, UsageEvent


def _nothing_stored() -> bool:
    return not (
        UsageEvent.objects.exists()
        or OrgUsage15m.objects.exists()
        or ScopeUsage15m.objects.exists()
        or LatencyHistogramHourly.objects.exists()
    )


@pytest.mark.parametrize(
    ("field", "other_orgs_slug"), [("team", "secret-team"), ("project", "secret-project")]
)
def test_other_organizations_slug_is_rejected_exactly_like_an_unknown_one(
    post_events, make_event, personas, field, other_orgs_slug
):
    foreign = post_events([make_event(request_id="r-1", **{field: other_orgs_slug})])
    unknown = post_events([make_event(request_id="r-1", **{field: "made-up-slug"})])

    assert foreign.status_code == unknown.status_code == 422
    foreign_body = foreign.json()
    # Same shape and same words; only the slug the caller sent differs.
    assert foreign_body["rejected"][0]["errors"].keys() == {field}
    assert foreign.content.decode().replace(
        other_orgs_slug, "SLUG"
    ) == unknown.content.decode().replace("made-up-slug", "SLUG")
    text = foreign.content.decode().lower()
    for secret in ("beta", "secret team", "secret project", "another organization"):
        assert secret not in text
    assert foreign_body["rejected"][0]["errors"][field] == [
        f"Unknown {field} '{other_orgs_slug}' in this organization."
    ]
    assert _nothing_stored()


def test_other_organizations_slug_next_to_a_good_event_is_rejected_alone(
    post_events, make_event, personas
):
    response = post_events(
        [make_event(request_id="ok", team="platform"), make_event(team="secret-team")]
    )

    assert response.status_code == 207
    assert list(UsageEvent.objects.values_list("request_id", "team__slug")) == [("ok", "platform")]
    assert not UsageEvent.objects.filter(organization=personas.other_org).exists()


def test_outsiders_token_cannot_write_into_another_organization(post_events, make_event, personas):
    response = post_events([make_event(team="platform")], token=personas.outsider_token)

    # "platform" is a team of alpha, not of beta: unknown from beta's point of view.
    assert response.status_code == 422
    assert not UsageEvent.objects.filter(organization=personas.org).exists()


def test_lenient_token_files_unknown_slugs_under_its_defaults(post_events, make_event, personas):
    lenient = token_issue(
        organization=personas.org,
        name="lenient",
        default_team=personas.research_team,
        default_project=personas.search_project,
    )
    lenient.token.unknown_labels = UnknownLabelPolicy.DEFAULTS
    lenient.token.save()

    response = post_events(
        [make_event(request_id="x", team="secret-team", project="nope")], token=lenient.secret
    )

    assert response.status_code == 200
    event = UsageEvent.objects.get(request_id="x")
    assert (event.team, event.project) == (personas.research_team, personas.search_project)


def test_unknown_user_email_becomes_a_member_of_the_organization(post_events, make_event, personas):
    response = post_events([make_event(request_id="x", user="Newcomer@Example.test")])

    assert response.status_code == 200
    newcomer = User.objects.get(email="newcomer@example.test")
    assert not newcomer.has_usable_password()
    assert list(Membership.objects.filter(user=newcomer).values_list("organization", "role")) == [
        (personas.org.id, Role.MEMBER)
    ]
    assert UsageEvent.objects.get(request_id="x").user == newcomer


def test_known_user_keeps_their_memberships(post_events, make_event, personas):
    post_events([make_event(user=personas.team_lead.email)])

    assert Membership.objects.filter(user=personas.team_lead).count() == 2


def test_rejected_event_creates_no_user(post_events, make_event):
    post_events([make_event(user="ghost@example.test", team="no-such-team")])

    assert not User.objects.filter(email="ghost@example.test").exists()


def test_event_without_team_or_project_takes_the_tokens_defaults(post_events, make_event, personas):
    issued = token_issue(
        organization=personas.org,
        name="support gateway",
        default_team=personas.platform_team,
        default_project=personas.chatbot_project,
    )

    post_events([make_event(request_id="x", user=personas.member.email)], token=issued.secret)

    event = UsageEvent.objects.get(request_id="x")
    assert (event.team, event.project) == (personas.platform_team, personas.chatbot_project)


def test_event_without_team_or_project_takes_the_users_membership(
    post_events, make_event, personas
):
    post_events([make_event(request_id="x", user=personas.member.email)])

    event = UsageEvent.objects.get(request_id="x")
    assert (event.team, event.project) == (personas.research_team, personas.search_project)


def test_named_team_and_project_win_over_every_default(post_events, make_event, personas):
    post_events(
        [
            make_event(
                request_id="x", user=personas.member.email, team="platform", project="chatbot"
            )
        ],
        token=personas.member_token,
    )

    event = UsageEvent.objects.get(request_id="x")
    assert (event.team, event.project) == (personas.platform_team, personas.chatbot_project)


def test_event_without_user_is_attributed_to_the_tokens_owner(post_events, make_event, personas):
    post_events([make_event(request_id="x")], token=personas.member_token)

    event = UsageEvent.objects.get(request_id="x")
    assert event.user == personas.member
    assert (event.team, event.project) == (personas.research_team, personas.search_project)


def test_service_account_tokens_attribute_no_user(post_events, make_event, personas):
    owned_service = token_issue(
        organization=personas.org,
        name="ci",
        owner=personas.member,
        service_account="svc-ci",
    )

    post_events([make_event(request_id="x")], token=owned_service.secret)

    assert UsageEvent.objects.get(request_id="x").user is None
