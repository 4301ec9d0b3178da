"""A person's page: metrics, charts, top models and sessions of that person, as far as the
viewer's scope reaches; 404 for a person the viewer may not see."""

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from analytics.widgets import Money
from tests.analytics.events_world import build_world, sees
from tests.factories import event_payload, ingest

# Who may open whose page in the events world (SPEC section 2, through memberships and
# visible usage).
MAY_OPEN = {
    "platform_admin": {
        "platform_admin",
        "org_admin",
        "team_lead",
        "project_admin",
        "member",
        "outsider",
    },
    "org_admin": {"org_admin", "team_lead", "project_admin", "member"},
    "team_lead": {"team_lead"},
    "project_admin": {"project_admin", "org_admin"},  # the org admin used project chatbot
    "member": {"member"},
    "outsider": {"outsider"},
}


@pytest.fixture
def world(personas):
    return build_world(personas)


def _metric(response, key):
    widget = next(w for w in response.context["widgets"] if w["name"] == "metrics")
    return next(row["value"] for row in widget["data"].rows if row["key"] == key)


@pytest.mark.parametrize("viewer", list(MAY_OPEN))
def test_user_pages_open_only_for_people_the_viewer_may_see(client, world, viewer):
    client.force_login(world.personas.users[viewer])

    for name, person in world.personas.users.items():
        response = client.get(f"/users/{person.id}/")
        expected = 200 if name in MAY_OPEN[viewer] else 404
        assert response.status_code == expected, (viewer, name)


def test_an_unknown_user_is_404(client, world):
    client.force_login(world.personas.platform_admin)

    assert client.get("/users/999999/").status_code == 404


@pytest.mark.parametrize(
    ("viewer", "person"),
    [
        ("org_admin", "member"),
        ("org_admin", "team_lead"),
        ("platform_admin", "outsider"),
        ("project_admin", "org_admin"),
        ("member", "member"),
    ],
)
def test_the_page_counts_the_viewers_scope_of_that_person(client, world, viewer, person):
    p = world.personas
    target = p.users[person]
    client.force_login(p.users[viewer])

    response = client.get(f"/users/{target.id}/")

    mine = [e for e in world.visible_to(viewer) if e.user_id == target.id]
    assert mine
    assert _metric(response, "requests") == len(mine)
    assert _metric(response, "input_tokens") == sum(e.input_tokens for e in mine)
    assert _metric(response, "cost") == sum(e.cost_nanos for e in mine)
    names = {w["name"] for w in response.context["widgets"]}
    assert names == {"metrics", "requests", "tokens", "cost", "top_models"}


def test_a_team_lead_sees_only_the_team_part_of_a_persons_usage(client, world):
    p = world.personas
    # The member works for the platform team once: the team lead sees that call, not
    # the member's other usage.
    ingest(
        p.org,
        [event_payload(request_id="member-for-platform", user=p.member.email, team="platform")],
        token=p.service_token,
    )
    client.force_login(p.team_lead)

    response = client.get(f"/users/{p.member.id}/")

    assert response.status_code == 200
    assert _metric(response, "requests") == 1
    everything = [e for e in world.visible_to("org_admin") if e.user_id == p.member.id]
    assert len(everything) > 1


def test_sessions_list_totals_per_session_latest_first(client, world):
    p = world.personas
    client.force_login(p.org_admin)

    response = client.get(f"/users/{p.team_lead.id}/")
    rows = response.context["session_rows"]

    events = [e for e in world.visible_to("org_admin") if e.user_id == p.team_lead.id]
    by_session: dict[str, list] = {}
    for e in events:
        if e.session_id:
            by_session.setdefault(e.session_id, []).append(e)
    assert {r["session_id"] for r in rows} == set(by_session)
    for r in rows:
        mine = by_session[r["session_id"]]
        assert r["requests"] == len(mine)
        assert r["input_tokens"] == sum(e.input_tokens for e in mine)
        assert r["output_tokens"] == sum(e.output_tokens for e in mine)
        assert r["cost_nanos"] == sum(e.cost_nanos for e in mine)
        assert r["first"] == min(e.timestamp for e in mine)
        assert r["last"] == max(e.timestamp for e in mine)
        assert f"session={r['session_id']}" in r["url"] and f"user={p.team_lead.id}" in r["url"]
    lasts = [r["last"] for r in rows]
    assert lasts == sorted(lasts, reverse=True)


def test_a_session_link_opens_the_log_of_that_session(client, world):
    p = world.personas
    client.force_login(p.org_admin)
    row = client.get(f"/users/{p.team_lead.id}/").context["session_rows"][0]

    log = client.get(row["url"], HTTP_HX_REQUEST="true")

    ids = [r["event"].id for r in log.context["rows"]]
    assert len(ids) == row["requests"]


def test_htmx_filter_change_swaps_the_user_page(client, world):
    p = world.personas
    client.force_login(p.org_admin)

    html = client.get(
        f"/users/{p.member.id}/", {"period": "24h"}, HTTP_HX_REQUEST="true"
    ).content.decode()

    assert html.lstrip().startswith('<div id="user-page"')
    assert 'id="filters"' not in html


def test_the_filter_bar_has_no_user_picker_on_a_users_page(client, world):
    p = world.personas
    client.force_login(p.org_admin)

    response = client.get(f"/users/{p.member.id}/")

    assert [x["name"] for x in response.context["pickers"]] == [
        "team",
        "project",
        "model",
        "token",
    ]
    assert 'hx-target="#user-page"' in response.content.decode()


def test_the_user_cannot_be_swapped_through_the_query_string(client, world):
    p = world.personas
    client.force_login(p.org_admin)

    response = client.get(f"/users/{p.member.id}/", {"user": p.team_lead.id})

    mine = [e for e in world.visible_to("org_admin") if e.user_id == p.member.id]
    assert _metric(response, "requests") == len(mine)


def test_dashboard_top_users_link_to_their_pages(client, world):
    p = world.personas
    client.force_login(p.org_admin)

    response = client.get("/dashboard/widgets/top_users/", {"top_users_view": "table"})
    rows = response.context["w"]["data"].rows

    linked = [r for r in rows if r["detail_url"]]
    assert linked
    for r in linked:
        assert r["detail_url"].startswith("/users/")
        assert client.get(r["detail_url"]).status_code == 200
    assert "data-user-detail" in response.content.decode()


def test_event_rows_of_the_person_are_visible_events(world):
    # Guard for the fixture: the personas the pages are opened for have events.
    p = world.personas
    for name in ("member", "team_lead", "org_admin", "outsider"):
        assert any(
            e.user_id == p.users[name].id for e in world.events() if sees(p, "platform_admin", e)
        )


def test_the_persons_budget_status_shows_for_viewers_who_may_see_it(client, world):
    from decimal import Decimal

    from metering.models import Budget

    p = world.personas
    Budget.objects.create(
        organization=p.org,
        subject="user",
        user=p.member,
        amount_usd=Decimal("500"),
        period="monthly",
    )
    berlin = ZoneInfo("Europe/Berlin")
    month_start = datetime.now(berlin).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spent = sum(
        e.cost_nanos
        for e in world.events()
        if e.user_id == p.member.id and e.timestamp >= month_start
    )

    client.force_login(p.org_admin)
    response = client.get(f"/users/{p.member.id}/")
    [status] = response.context["budgets"]
    html = response.content.decode()

    assert "data-budget-status" in html
    assert status["limit"] == "$500.00"
    assert status["state"] == "ok"
    assert status["spent"] == Money().format(spent)
    assert "resets" in html

    # A team lead who sees a little of the member's usage does not see their budget.
    ingest(
        p.org,
        [event_payload(request_id="member-for-platform", user=p.member.email, team="platform")],
        token=p.service_token,
    )
    client.force_login(p.team_lead)
    response = client.get(f"/users/{p.member.id}/")
    assert response.context["budgets"] == []
    assert "No budget you can see" in response.content.decode()
