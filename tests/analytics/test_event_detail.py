"""An event's details: a panel (HTMX) or a page, every field, the API token, and links to
the user, the session and the request id; 404 outside the viewer's scope."""

from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from metering.models import UsageEvent
from tests.analytics.events_world import build_world, sees
from tests.factories import event_payload, ingest

PERSONAS = ["platform_admin", "org_admin", "team_lead", "project_admin", "member", "outsider"]


@pytest.fixture
def world(personas):
    return build_world(personas)


@pytest.fixture
def rich_event(personas):
    """One event with every field set, sent with the member's token."""
    p = personas
    ingest(
        p.org,
        [
            event_payload(
                request_id="rich-1",
                user=p.member.email,
                model="claude-sonnet-4",
                provider="anthropic",
                operation="chat",
                input_tokens=5000,
                cached_input_tokens=1200,
                cache_write_tokens=300,
                output_tokens=800,
                reasoning_tokens=200,
                latency_ms=1234,
                status_code=503,
                cost_usd="0.012345678",
                end_user="customer-42",
                session_id="sess-rich",
                assistant="helper",
                workflow="triage",
                workflow_run_id="run-9",
                workflow_status="failed",
                client="ide",
                endpoint="/v1/messages",
                pool_category="hybrid",
                metadata={"ticket": "T-1", "nested": {"a": [1, 2]}},
            )
        ],
        token=p.member_token,
    )
    return UsageEvent.objects.get(request_id="rich-1")


@pytest.mark.parametrize("persona", PERSONAS)
def test_details_answer_inside_the_scope_and_404_outside(client, world, persona):
    client.force_login(world.personas.users[persona])

    for event in world.events():
        response = client.get(f"/events/{event.id}/", HTTP_HX_REQUEST="true")
        expected = 200 if sees(world.personas, persona, event) else 404
        assert response.status_code == expected, (persona, event.request_id)


def test_an_unknown_event_is_404(client, world):
    client.force_login(world.personas.platform_admin)

    assert client.get("/events/999999/").status_code == 404


def test_panel_shows_every_field_the_token_and_the_metadata(client, rich_event, personas):
    client.force_login(personas.org_admin)

    response = client.get(f"/events/{rich_event.id}/", HTTP_HX_REQUEST="true")
    html = response.content.decode()

    assert html.lstrip().startswith("<article")  # a panel, not a page
    for text in (
        "rich-1",
        "claude-sonnet-4",
        "anthropic",
        "5,000",
        "1,200",
        "300",
        "800",
        "200",
        "1,234 ms",
        "503",
        "0.012345678 USD",
        "customer-42",
        "sess-rich",
        "helper",
        "triage",
        "run-9",
        "/v1/messages",
        "hybrid",
        "ide",
        personas.member.email,
        # the token: name, prefix, owner
        "member&#x27;s key",
        personas.member_token.prefix,
    ):
        assert text in html, text
    assert "&quot;nested&quot;: {" in html  # pretty-printed JSON
    assert "&quot;ticket&quot;: &quot;T-1&quot;" in html


def test_panel_shows_the_service_account_of_an_ownerless_token(client, world):
    p = world.personas
    client.force_login(p.org_admin)
    event = UsageEvent.objects.filter(api_token=p.service_token).first()

    html = client.get(f"/events/{event.id}/", HTTP_HX_REQUEST="true").content.decode()

    assert "svc-gateway" in html
    assert "gateway" in html


def test_full_page_without_javascript(client, rich_event, personas):
    client.force_login(personas.member)

    html = client.get(f"/events/{rich_event.id}/").content.decode()

    assert "<!doctype html>" in html
    assert "Back to the events log" in html
    assert "rich-1" in html


def test_links_lead_to_the_user_session_and_request_id(client, rich_event, personas):
    p = personas
    client.force_login(p.org_admin)

    response = client.get(f"/events/{rich_event.id}/", HTTP_HX_REQUEST="true")
    links = response.context["links"]

    assert links["user"].startswith(f"/users/{p.member.id}/")
    assert links["token_owner"].startswith(f"/users/{p.member.id}/")
    assert parse_qs(urlsplit(links["session"]).query)["session"] == ["sess-rich"]
    assert parse_qs(urlsplit(links["request_id"]).query)["request_id"] == ["rich-1"]
    # Following them finds the event.
    for key in ("session", "request_id"):
        log = client.get(links[key], HTTP_HX_REQUEST="true")
        assert rich_event.id in [r["event"].id for r in log.context["rows"]], key
    assert client.get(links["user"]).status_code == 200


def test_links_from_an_old_event_cover_its_time(client, personas):
    p = personas
    old = event_payload(request_id="old-1", session_id="sess-old", user=p.member.email)
    old["timestamp"] = (
        UsageEvent._meta.get_field("timestamp").to_python(old["timestamp"]) - timedelta(days=60)
    ).isoformat()
    ingest(p.org, [old], token=p.service_token)
    event = UsageEvent.objects.get(request_id="old-1")
    client.force_login(p.org_admin)

    links = client.get(f"/events/{event.id}/", HTTP_HX_REQUEST="true").context["links"]
    log = client.get(links["session"], HTTP_HX_REQUEST="true")

    assert parse_qs(urlsplit(links["session"]).query)["period"] == ["custom"]
    assert [r["event"].id for r in log.context["rows"]] == [event.id]


def test_no_link_to_a_person_the_viewer_may_not_see(client, personas):
    p = personas
    # The team lead sees this event (their own, in their team); it was sent with the
    # member's token, and the member is a person the team lead cannot see.
    ingest(
        p.org,
        [event_payload(request_id="via-member-token", team="platform", user=p.team_lead.email)],
        token=p.member_token,
    )
    event = UsageEvent.objects.get(request_id="via-member-token")
    client.force_login(p.team_lead)

    response = client.get(f"/events/{event.id}/", HTTP_HX_REQUEST="true")

    assert response.status_code == 200
    assert response.context["links"]["token_owner"] == ""
    assert f"/users/{p.member.id}/" not in response.content.decode()


def test_the_log_links_each_row_to_its_panel(client, world):
    client.force_login(world.personas.org_admin)

    response = client.get("/events/")
    row = response.context["rows"][0]
    html = response.content.decode()

    assert f'hx-get="{row["detail_url"].replace("&", "&amp;")}"' in html
    panel = client.get(row["detail_url"], HTTP_HX_REQUEST="true")
    assert panel.status_code == 200
    assert row["event"].request_id in panel.content.decode()
