"""The dashboard page, its widget partials, option lists and CSVs, per persona.

Expected numbers are computed here from the events the test wrote, by the rules of SPEC
section 2 written out by hand, never through the visibility gate under test.
"""

import csv
import io
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from analytics.views import WIDGET_ORDER
from metering.models import NANOS_PER_USD, UsageEvent
from tests.factories import event_payload, ingest

PERSONAS = ["platform_admin", "org_admin", "team_lead", "project_admin", "member", "outsider"]


def read_csv(response) -> list[dict]:
    body = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(body)))


def metric(client, query: str, name: str) -> str:
    rows = read_csv(client.get(f"/dashboard/widgets/metrics/?{query}&format=csv"))
    return next(r["This period"] for r in rows if r["Metric"] == name)


@pytest.fixture
def world(personas):
    """Events in every scope: who sent what, kept for the expectations."""
    p = personas
    now = datetime.now(UTC)
    batches = [
        # (organization, token, events)
        (
            p.org,
            p.member_token,
            [
                event_payload(timestamp=now - timedelta(hours=h), input_tokens=100 + h)
                for h in range(1, 6)
            ],
        ),
        (
            p.org,
            p.service_token,
            [
                event_payload(
                    timestamp=now - timedelta(hours=2),
                    user=p.team_lead.email,
                    team="platform",
                    model="claude-sonnet-4",
                    input_tokens=700,
                )
                for _ in range(3)
            ],
        ),
        (
            p.org,
            p.service_token,
            [
                event_payload(
                    timestamp=now - timedelta(hours=3),
                    team="research",
                    project="chatbot",
                    status_code=500,
                    input_tokens=300,
                )
                for _ in range(4)
            ],
        ),
        (
            p.org,
            p.service_token,
            [
                event_payload(
                    timestamp=now - timedelta(hours=4),
                    user="someone@alpha.test",
                    team="research",
                    operation="embedding",
                    model="text-embedding-3-small",
                    output_tokens=0,
                    input_tokens=50,
                )
                for _ in range(2)
            ],
        ),
        (
            p.other_org,
            p.outsider_token,
            [
                event_payload(
                    timestamp=now - timedelta(hours=1),
                    team="secret-team",
                    model="secret-model-x",
                    input_tokens=9999,
                )
                for _ in range(6)
            ],
        ),
    ]
    for org, token, events in batches:
        result = ingest(org, events, token=token)
        assert result.accepted == len(events), result.as_dict()
    return p


def expected_events(p, persona: str):
    """SPEC section 2, by hand."""
    events = list(UsageEvent.objects.all())
    rules = {
        "platform_admin": lambda e: True,
        "org_admin": lambda e: e.organization_id == p.org.id,
        "team_lead": lambda e: e.team_id == p.platform_team.id or e.user_id == p.team_lead.id,
        "project_admin": lambda e: (
            e.project_id == p.chatbot_project.id or e.user_id == p.project_admin.id
        ),
        "member": lambda e: e.user_id == p.member.id or e.api_token_id == p.member_token.id,
        "outsider": lambda e: e.user_id == p.outsider.id or e.api_token_id == p.outsider_token.id,
    }
    return [e for e in events if rules[persona](e)]


@pytest.mark.parametrize("persona", PERSONAS)
def test_each_persona_sees_exactly_its_scope_in_every_widget(client, world, persona):
    user = getattr(world, persona)
    client.force_login(user)
    expected = expected_events(world, persona)
    assert expected, "every persona has something to see in this world"
    query = "period=24h"

    page = client.get(f"/dashboard/?{query}")
    assert page.status_code == 200
    for name in WIDGET_ORDER:
        assert client.get(f"/dashboard/widgets/{name}/?{query}").status_code == 200

    assert int(metric(client, query, "Requests")) == len(expected)
    assert int(metric(client, query, "Failed requests")) == sum(
        e.status_code >= 400 for e in expected
    )
    assert int(metric(client, query, "Input tokens")) == sum(e.input_tokens for e in expected)
    cost = Decimal(metric(client, query, "Cost"))
    assert cost == (Decimal(sum(e.cost_nanos for e in expected)) / NANOS_PER_USD).quantize(
        Decimal("0.000000001")
    )
    requests_rows = read_csv(client.get(f"/dashboard/widgets/requests/?{query}&format=csv"))
    assert sum(int(r["Total"]) for r in requests_rows) == len(expected)
    model_rows = read_csv(client.get(f"/dashboard/widgets/models/?{query}&format=csv"))
    seen_models = {r["Model"] for r in model_rows}
    assert {e.model for e in expected} <= seen_models
    if persona != "platform_admin" and persona != "outsider":
        assert "secret-model-x" not in seen_models
        assert b"secret-model-x" not in page.content
        assert b"Secret Team" not in page.content


@pytest.mark.parametrize("persona", ["org_admin", "team_lead", "project_admin", "member"])
def test_option_lists_only_list_what_the_viewer_may_see(client, world, persona):
    client.force_login(getattr(world, persona))
    teams = client.get("/dashboard/options/team/?q=").content.decode()
    users = client.get("/dashboard/options/user/?q=").content.decode()
    models = client.get("/dashboard/options/model/?q=").content.decode()
    assert "Secret Team" not in teams
    assert "outsider@beta.test" not in users
    assert "secret-model-x" not in models
    if persona == "member":
        assert "Platform" not in teams  # the member has no event in team platform
        assert "lead@example.test" not in users
    if persona == "org_admin":
        assert "Platform" in teams and "Research" in teams


def test_outsider_naming_another_orgs_team_gets_nothing(client, world):
    client.force_login(world.outsider)
    response = client.get(f"/dashboard/?period=24h&team={world.platform_team.id}")
    assert response.status_code == 200
    assert b"Nothing to show for this filter" in response.content
    assert b"Platform" not in response.content
    csv_response = client.get(
        f"/dashboard/widgets/metrics/?period=24h&team={world.platform_team.id}&format=csv"
    )
    assert csv_response.status_code == 404


def test_team_filter_narrows_the_org_admins_numbers(client, world):
    client.force_login(world.org_admin)
    query = f"period=24h&team={world.platform_team.id}"
    expected = [
        e for e in expected_events(world, "org_admin") if e.team_id == world.platform_team.id
    ]
    assert int(metric(client, query, "Requests")) == len(expected) == 3


def test_member_dashboard_equals_the_usage_api_for_the_member(client, world):
    client.force_login(world.member)
    query = "period=24h"
    start = int((datetime.now(UTC) - timedelta(hours=24)).timestamp()) + 60
    api = client.get(f"/api/v1/usage?start_time={start - 60}&bucket_width=1h&limit=30").json()
    api_requests = sum(r["num_model_requests"] for b in api["data"] for r in b["results"])
    api_input = sum(r["input_tokens"] for b in api["data"] for r in b["results"])
    assert int(metric(client, query, "Requests")) == api_requests
    assert int(metric(client, query, "Input tokens")) == api_input


def test_deltas_compare_with_the_previous_period_of_the_same_length(client, personas):
    now = datetime.now(UTC)
    ingest(personas.org, [event_payload(timestamp=now - timedelta(hours=2)) for _ in range(6)])
    ingest(personas.org, [event_payload(timestamp=now - timedelta(hours=30)) for _ in range(4)])
    client.force_login(personas.org_admin)
    rows = read_csv(client.get("/dashboard/widgets/metrics/?period=24h&format=csv"))
    requests = next(r for r in rows if r["Metric"] == "Requests")
    assert requests["This period"] == "6"
    assert requests["Previous period"] == "4"
    assert Decimal(requests["Change"]) == Decimal("0.5")


def test_widget_csv_neutralises_formula_labels(client, personas):
    ingest(
        personas.org,
        [
            event_payload(
                model='=HYPERLINK("http://x")', timestamp=datetime.now(UTC) - timedelta(hours=1)
            )
        ],
    )
    client.force_login(personas.org_admin)
    rows = read_csv(client.get("/dashboard/widgets/top_models/?period=24h&format=csv"))
    assert rows[0]["Model"].startswith("'=")


def test_empty_state_explains_the_filter(client, personas):
    client.force_login(personas.org_admin)
    response = client.get(
        f"/dashboard/widgets/requests/?period=24h&team={personas.research_team.id}"
    )
    assert b"No requests from team Research in the last 24 hours" in response.content


def test_page_renders_without_javascript_with_every_widget_inline(client, world):
    client.force_login(world.org_admin)
    html = client.get("/dashboard/?period=24h").content.decode()
    for name in WIDGET_ORDER:
        assert f'id="widget-{name}"' in html
    assert 'hx-trigger="load"' not in html  # everything is rendered server-side
    assert '<script id="fig-requests" type="application/json">' in html


def test_htmx_filter_change_returns_only_the_widgets(client, world):
    client.force_login(world.org_admin)
    response = client.get("/dashboard/?period=7d", HTTP_HX_REQUEST="true")
    html = response.content.decode()
    assert 'id="widgets"' in html and "<html" not in html
    assert html.count('hx-trigger="load"') == len(WIDGET_ORDER)


def test_anonymous_visitors_are_sent_to_login(client):
    assert client.get("/dashboard/").status_code == 302
    assert client.get("/dashboard/widgets/metrics/").status_code == 302


# ---------------------------------------------------------------------------------------
# Buckets and deltas against raw sums, in zones with DST and half-hour offsets


def _local_day_counts(events, tz: ZoneInfo, start: datetime, end: datetime) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in events:
        if start <= e.timestamp < end:
            key = e.timestamp.astimezone(tz).strftime("%Y-%m-%d 00:00")
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize(
    ("zone", "day", "seed"),
    [
        ("Europe/Berlin", "2026-10-25", 1),  # clocks go back: a 25-hour day
        ("Europe/Berlin", "2026-03-29", 2),  # clocks go forward: a 23-hour day
        ("Asia/Kolkata", "2026-10-25", 3),  # +05:30
        ("Asia/Kathmandu", "2026-06-10", 4),  # +05:45
    ],
)
def test_daily_and_hourly_buckets_equal_raw_counts_in_the_viewers_zone(
    client, personas, zone, day, seed
):
    rng = random.Random(seed)
    tz = ZoneInfo(zone)
    personas.org_admin.timezone = zone
    personas.org_admin.save()
    middle = datetime.fromisoformat(day).replace(tzinfo=tz)
    events = [
        event_payload(
            timestamp=(middle + timedelta(seconds=rng.randint(-3 * 86400, 3 * 86400))).astimezone(
                UTC
            ),
            status_code=rng.choice([200, 200, 200, 429]),
            input_tokens=rng.randint(1, 5000),
        )
        for _ in range(400)
    ]
    ingest(personas.org, events)
    stored = list(UsageEvent.objects.filter(organization=personas.org))
    client.force_login(personas.org_admin)

    start_local = (middle - timedelta(days=2)).replace(hour=0, minute=0)
    end_local = (middle + timedelta(days=2)).replace(hour=0, minute=0)
    query = f"period=custom&start={start_local:%Y-%m-%dT%H:%M}&end={end_local:%Y-%m-%dT%H:%M}"
    rows = read_csv(client.get(f"/dashboard/widgets/requests/?{query}&bucket=1d&format=csv"))
    got = {r["Time"]: int(r["Total"]) for r in rows if int(r["Total"])}
    want = _local_day_counts(stored, tz, start_local.astimezone(UTC), end_local.astimezone(UTC))
    assert got == want
    assert len(rows) == 4  # four local days, DST or not

    hourly = read_csv(client.get(f"/dashboard/widgets/requests/?{query}&bucket=1h&format=csv"))
    hours = (end_local.astimezone(UTC) - start_local.astimezone(UTC)) / timedelta(hours=1)
    assert len(hourly) == hours  # 95 or 97 real hours around a DST change
    assert sum(int(r["Total"]) for r in hourly) == sum(want.values())
    failed = sum(
        1 for e in stored if start_local <= e.timestamp < end_local and e.status_code >= 400
    )
    assert sum(int(r["Failed"]) for r in hourly) == failed


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_metrics_and_deltas_equal_raw_sums_for_random_data_and_ranges(client, personas, seed):
    rng = random.Random(seed)
    now = datetime.now(UTC)
    events = [
        event_payload(
            timestamp=now - timedelta(seconds=rng.randint(60, 20 * 86400)),
            input_tokens=rng.randint(0, 4000),
            output_tokens=rng.randint(0, 900),
            status_code=rng.choice([200, 200, 201, 400, 503]),
            team=rng.choice([None, "platform", "research"]),
            model=rng.choice(["gpt-4o", "gpt-4o-mini", "claude-sonnet-4"]),
        )
        for _ in range(300)
    ]
    ingest(personas.org, events)
    stored = list(UsageEvent.objects.filter(organization=personas.org))
    tz = ZoneInfo("Europe/Berlin")
    start = (
        (now - timedelta(seconds=rng.randint(2 * 86400, 8 * 86400)))
        .astimezone(tz)
        .replace(second=0, microsecond=0)
    )
    end = (
        (now - timedelta(seconds=rng.randint(0, 86400)))
        .astimezone(tz)
        .replace(second=0, microsecond=0)
    )
    team = rng.choice([None, personas.platform_team, personas.research_team])
    query = f"period=custom&start={start:%Y-%m-%dT%H:%M}&end={end:%Y-%m-%dT%H:%M}"
    if team:
        query += f"&team={team.id}"
    client.force_login(personas.org_admin)

    def select(a, b):
        return [
            e for e in stored if a <= e.timestamp < b and (team is None or e.team_id == team.id)
        ]

    current = select(start, end)
    previous = select(start - (end - start), start)
    rows = {
        r["Metric"]: r
        for r in read_csv(client.get(f"/dashboard/widgets/metrics/?{query}&format=csv"))
    }
    assert int(rows["Requests"]["This period"]) == len(current)
    assert int(rows["Requests"]["Previous period"]) == len(previous)
    assert int(rows["Output tokens"]["This period"]) == sum(e.output_tokens for e in current)
    assert int(rows["Failed requests"]["This period"]) == sum(e.status_code >= 400 for e in current)
    if previous:
        expected_change = (len(current) - len(previous)) / len(previous)
        assert float(rows["Requests"]["Change"]) == pytest.approx(expected_change, abs=1e-6)


def test_dashboard_has_a_shortcut_to_my_spending(client, personas):
    client.force_login(personas.member)
    html = client.get("/dashboard/").content.decode()
    assert 'href="/spending/"' in html
    assert client.get("/spending/").status_code == 200


@pytest.mark.parametrize("persona", ["org_admin", "member"])
def test_a_widget_partial_looks_up_the_viewer_once(client, world, persona):
    """Scope, organization and time zone are resolved once per request, however many
    option lists and helpers ask for them."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.force_login(getattr(world, persona))
    # The first read of a new installation builds the viewer roll-ups (here, with eager
    # tasks, in that request): what is counted is every read after.
    assert client.get("/dashboard/widgets/requests/?period=30d").status_code == 200
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/dashboard/widgets/requests/?period=30d")
    assert response.status_code == 200
    sql = [q["sql"] for q in queries.captured_queries]
    membership_reads = [s for s in sql if 'FROM "accounts_membership"' in s]
    token_reads = [s for s in sql if 'FROM "accounts_apitoken"' in s]
    org_reads = [s for s in sql if s.startswith('SELECT "accounts_organization"')]
    # One read of the scope (memberships UNION owned tokens), one of the zone's fallback.
    assert len(membership_reads) <= 2, membership_reads
    assert not [s for s in token_reads if s not in membership_reads], token_reads
    assert len(org_reads) <= 1, org_reads


def test_scope_filters_add_no_distinct_to_the_events_query(world):
    """Team, project, user and token filters are columns of the events table: no row can
    repeat, and a DISTINCT would make the session list and the log's pages read and sort
    the whole selection before their LIMIT."""
    from types import SimpleNamespace

    from django.http import QueryDict

    from analytics.filters import UsageFilter
    from analytics.visibility import visible_events

    admin = world.org_admin
    query = QueryDict(f"team={world.platform_team.id}&user={admin.id}&period=30d")
    flt = UsageFilter(query, queryset=visible_events(admin), request=SimpleNamespace(user=admin))

    sql = str(flt.qs.query)
    assert flt.is_valid()
    assert "DISTINCT" not in sql.upper()
    assert '"team_id"' in sql and '"user_id"' in sql
