"""The read engine (analytics/queries.py): roll-ups plus raw edges are exact.

Every answer is compared with sums computed here, in Python, over the raw UsageEvent rows,
bucketed by local time with zoneinfo: across DST changes (Europe/Berlin 2026-03-29 and
2026-10-25, America/New_York) and in +05:30 / +05:45 zones.
"""

import math
import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from analytics import queries as analytics_queries
from analytics.queries import (
    DAY,
    HOUR,
    MINUTE,
    Bucketing,
    Selection,
    grouped_totals,
    latency_percentile,
    latency_series,
    totals,
)
from analytics.visibility import Scope, scope_disjoint_parts, viewer_scope, visible_events
from metering.models import UsageEvent
from tests.factories import event_payload, ingest

BERLIN = ZoneInfo("Europe/Berlin")
KOLKATA = ZoneInfo("Asia/Kolkata")
KATHMANDU = ZoneInfo("Asia/Kathmandu")
NEW_YORK = ZoneInfo("America/New_York")
UTC_ZONE = ZoneInfo("UTC")

# Four days around each DST change of 2026 (Berlin: March 29 and October 25;
# New York: March 8 and November 1).
PERIODS = {
    "spring": datetime(2026, 3, 27, tzinfo=UTC),
    "autumn": datetime(2026, 10, 23, tzinfo=UTC),
    "ny-spring": datetime(2026, 3, 6, tzinfo=UTC),
    "ny-autumn": datetime(2026, 10, 30, tzinfo=UTC),
}
SPAN = timedelta(days=4)


def _ingest_period(personas, start: datetime, seed: int = 1) -> None:
    """An event every 11 min 13 s (never on a 15-minute mark) for four days."""
    rng = random.Random(seed)
    tokens = [personas.service_token, personas.member_token]
    by_token = defaultdict(list)
    step = timedelta(minutes=11, seconds=13)
    t = start + timedelta(seconds=17)
    i = 0
    while t < start + SPAN:
        token = tokens[i % 2]
        by_token[token].append(
            event_payload(
                request_id=f"{start:%m%d}-{i}",
                timestamp=t,
                model=rng.choice(["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "nopriced"]),
                input_tokens=rng.randint(1, 3000),
                output_tokens=rng.randint(0, 500),
                latency_ms=rng.randint(50, 9000),
                status_code=rng.choice([200, 200, 200, 200, 429, 500]),
                team=rng.choice([None, "platform", "research"]),
                project=rng.choice([None, "chatbot"]),
                user=rng.choice([None, None, "lead@example.test", "projectadmin@example.test"]),
                assistant=rng.choice([None, "helper", "coder"]),
                workflow=rng.choice([None, None, "nightly", "triage", "digest"]),
            )
        )
        t += step
        i += 1
    for token, events in by_token.items():
        for n in range(0, len(events), 1000):
            result = ingest(personas.org, events[n : n + 1000], token=token)
            assert not result.rejected


@pytest.fixture
def spring(personas):
    _ingest_period(personas, PERIODS["spring"])
    return personas


@pytest.fixture
def autumn(personas):
    _ingest_period(personas, PERIODS["autumn"])
    return personas


def _local_bucket(ts: datetime, tz: ZoneInfo, width: int) -> int:
    """The UTC epoch at which `ts`'s local bucket starts (computed independently)."""
    if width == MINUTE:
        return int(ts.timestamp()) // 60 * 60
    local = ts.astimezone(tz)
    if width == HOUR:
        return int(local.replace(minute=0, second=0, microsecond=0).timestamp())
    return int(datetime(local.year, local.month, local.day, tzinfo=tz).timestamp())


def _raw_buckets(events, tz: ZoneInfo, width: int) -> dict[int, tuple]:
    out: dict[int, list] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for e in events:
        acc = out[_local_bucket(e.timestamp, tz, width)]
        acc[0] += 1
        acc[1] += e.status_code >= 400
        acc[2] += e.input_tokens
        acc[3] += e.output_tokens
        acc[4] += e.cost_nanos
    return {k: tuple(v) for k, v in out.items()}


def _answer_buckets(grouped) -> dict[int, tuple]:
    out: dict[int, list] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for key, t in grouped.rows.items():
        acc = out[key[0]]
        for i, value in enumerate(
            (t.requests, t.failed_requests, t.input_tokens, t.output_tokens, t.cost_nanos)
        ):
            acc[i] += value
    return {k: tuple(v) for k, v in out.items()}


def _org_selection(personas, start, end, **filters) -> Selection:
    scope = viewer_scope(personas.org_admin)
    return Selection(scope=scope, start=start, end=end, org_ids=(personas.org.id,), **filters)


def _raw_events(personas, start, end, **filters):
    qs = UsageEvent.objects.filter(
        organization=personas.org, timestamp__gte=start, timestamp__lt=end
    )
    return list(qs.filter(**filters))


# ---------------------------------------------------------------------------------------
# Local buckets across DST and in half-hour zones


@pytest.mark.parametrize("period", list(PERIODS))
def test_local_buckets_equal_raw_sums(personas, subtests, period):
    base = PERIODS[period]
    _ingest_period(personas, base)
    start = base + timedelta(hours=2, minutes=7, seconds=41)
    end = base + SPAN - timedelta(hours=3, minutes=2, seconds=9)
    sel = _org_selection(personas, start, end)
    events = _raw_events(personas, start, end)

    for tz in (UTC_ZONE, BERLIN, NEW_YORK, KOLKATA, KATHMANDU):
        for width in (HOUR, DAY):
            with subtests.test(tz=str(tz), width=width):
                answer = _answer_buckets(grouped_totals(sel, (), Bucketing(width, tz)))

                assert answer == _raw_buckets(events, tz, width)


@pytest.mark.parametrize("tz", [UTC_ZONE, BERLIN, NEW_YORK, KOLKATA, KATHMANDU], ids=str)
def test_scoped_local_days_equal_raw_sums(personas, tz):
    # The wide roll-up has UTC days and quarters only: local days read the daily rows and
    # move the pieces that belong to a neighbouring day (from the quarter rows).
    _ingest_period(personas, PERIODS["autumn"])
    start = PERIODS["autumn"] + timedelta(hours=2, minutes=7, seconds=41)
    end = PERIODS["autumn"] + SPAN - timedelta(hours=3, minutes=2, seconds=9)
    team = personas.platform_team
    sel = _org_selection(personas, start, end, team_ids=(team.id,))

    answer = _answer_buckets(grouped_totals(sel, (), Bucketing(DAY, tz)))

    assert answer == _raw_buckets(_raw_events(personas, start, end, team=team), tz, DAY)


@pytest.mark.parametrize("team_filter", [False, True])
def test_whole_days_come_from_the_daily_roll_ups_and_add_up_to_raw(personas, team_filter):
    _ingest_period(personas, PERIODS["autumn"])
    start = PERIODS["autumn"] + timedelta(hours=2, minutes=7, seconds=41)
    end = PERIODS["autumn"] + SPAN - timedelta(hours=3, minutes=2, seconds=9)
    team = personas.platform_team
    sel = _org_selection(personas, start, end, **({"team_ids": (team.id,)} if team_filter else {}))
    events = _raw_events(personas, start, end, **({"team": team} if team_filter else {}))

    with CaptureQueriesContext(connection) as queries:
        answer = totals(sel)

    daily = "metering_scope_actor_daily" if team_filter else "metering_org_usage_daily"
    assert any(daily in q["sql"] for q in queries.captured_queries)
    assert (answer.requests, answer.failed_requests, answer.input_tokens, answer.cost_nanos) == (
        len(events),
        sum(e.status_code >= 400 for e in events),
        sum(e.input_tokens for e in events),
        sum(e.cost_nanos for e in events),
    )


@pytest.mark.parametrize(
    ("period", "days"),
    [("spring", {(2026, 3, 29): 23, (2026, 3, 28): 24}), ("autumn", {(2026, 10, 25): 25})],
)
def test_hourly_sums_equal_the_daily_total_across_a_dst_change(personas, subtests, period, days):
    _ingest_period(personas, PERIODS[period])
    for day, hours in days.items():
        with subtests.test(day=day):
            _check_hours_add_up_to_the_day(personas, datetime(*day, tzinfo=BERLIN), hours)


def _check_hours_add_up_to_the_day(personas, local_midnight: datetime, hours: int) -> None:
    start = local_midnight - timedelta(days=1)
    end = local_midnight + timedelta(days=2)
    sel = _org_selection(personas, start, end)
    next_midnight = datetime.combine(
        local_midnight.date() + timedelta(days=1), datetime.min.time(), tzinfo=BERLIN
    )
    day_start, day_end = int(local_midnight.timestamp()), int(next_midnight.timestamp())

    daily = _answer_buckets(grouped_totals(sel, (), Bucketing(DAY, BERLIN)))
    hourly = _answer_buckets(grouped_totals(sel, (), Bucketing(HOUR, BERLIN)))
    hours_of_day = {k: v for k, v in hourly.items() if day_start <= k < day_end}

    assert len(hours_of_day) == hours
    assert tuple(map(sum, zip(*hours_of_day.values(), strict=True))) == daily[day_start]


def test_buckets_start_at_local_boundaries_in_quarter_hour_zones(spring, subtests):
    start = PERIODS["spring"] + timedelta(hours=1)
    end = start + timedelta(days=2)
    sel = _org_selection(spring, start, end)

    with subtests.test("days start at local midnight"):
        kolkata = grouped_totals(sel, (), Bucketing(DAY, KOLKATA))
        kathmandu = grouped_totals(sel, (), Bucketing(DAY, KATHMANDU))
        for grouped, tz in ((kolkata, KOLKATA), (kathmandu, KATHMANDU)):
            for (key,) in grouped.rows:
                local = datetime.fromtimestamp(key, tz)
                assert (local.hour, local.minute, local.second) == (0, 0, 0)
        # 2026-03-28 00:00 in Kolkata is 2026-03-27 18:30 UTC; in Kathmandu 18:15 UTC.
        assert epoch(2026, 3, 27, 18, 30) in {k[0] for k in kolkata.rows}
        assert epoch(2026, 3, 27, 18, 15) in {k[0] for k in kathmandu.rows}

    with subtests.test("Kathmandu hours start at a quarter past the UTC hour"):
        grouped = grouped_totals(sel, (), Bucketing(HOUR, KATHMANDU))
        assert {datetime.fromtimestamp(k[0], UTC).minute for k in grouped.rows} == {15}

    with subtests.test("Kolkata hours start at half past the UTC hour"):
        grouped = grouped_totals(sel, (), Bucketing(HOUR, KOLKATA))
        assert {datetime.fromtimestamp(k[0], UTC).minute for k in grouped.rows} == {30}


def epoch(*parts) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp())


@pytest.mark.parametrize("tz", [ZoneInfo("UTC"), KATHMANDU], ids=["UTC", "Kathmandu"])
def test_minute_buckets_equal_raw_sums(spring, tz):
    start = PERIODS["spring"] + timedelta(hours=30, seconds=11)
    end = start + timedelta(hours=2, minutes=3)
    sel = _org_selection(spring, start, end)

    answer = _answer_buckets(grouped_totals(sel, (), Bucketing(MINUTE, tz)))

    assert answer == _raw_buckets(_raw_events(spring, start, end), tz, MINUTE)


# ---------------------------------------------------------------------------------------
# Ranges not aligned to 15 minutes, and every source


def _totals_tuple(t) -> tuple:
    return (t.requests, t.failed_requests, t.input_tokens, t.output_tokens, t.cost_nanos)


def _raw_tuple(events) -> tuple:
    return (
        len(events),
        sum(e.status_code >= 400 for e in events),
        sum(e.input_tokens for e in events),
        sum(e.output_tokens for e in events),
        sum(e.cost_nanos for e in events),
    )


def test_unaligned_ranges_are_exact_to_the_second(autumn, subtests):
    rng = random.Random(5)
    base = PERIODS["autumn"]
    for _ in range(25):
        start = base + timedelta(seconds=rng.randint(0, 3 * 86400))
        end = start + timedelta(seconds=rng.randint(1, 86400 + 7))
        with subtests.test(start=start.isoformat(), end=end.isoformat()):
            sel = _org_selection(autumn, start, end)

            assert _totals_tuple(totals(sel)) == _raw_tuple(_raw_events(autumn, start, end))


def test_filters_narrow_exactly_like_on_raw_events(autumn, subtests):
    cases = {
        "none": ({}, {}),
        "models": (
            {"models": ("gpt-4o", "nopriced")},
            {"model__in": ("gpt-4o", "nopriced")},
        ),
        "failed": ({"status": "failed"}, {"status_code__gte": 400}),
        "ok": ({"status": "ok"}, {"status_code__lt": 400}),
        "operation": ({"operations": ("chat",)}, {"operation": "chat"}),
        "team": ({"team_ids": (autumn.platform_team.id,)}, {"team": autumn.platform_team}),
        "project": (
            {"project_ids": (autumn.chatbot_project.id,)},
            {"project": autumn.chatbot_project},
        ),
        "user": ({"user_ids": (autumn.member.id,)}, {"user": autumn.member}),
        "token": ({"token_ids": (autumn.member_token.id,)}, {"api_token": autumn.member_token}),
        "team and model": (
            {"team_ids": (autumn.research_team.id,), "models": ("gpt-4o-mini",)},
            {"team": autumn.research_team, "model": "gpt-4o-mini"},
        ),
    }
    start = PERIODS["autumn"] + timedelta(hours=5, minutes=3, seconds=1)
    end = start + timedelta(days=2, minutes=59, seconds=58)
    for name, (filters, raw_filters) in cases.items():
        with subtests.test(name):
            sel = _org_selection(autumn, start, end, **filters)

            got = _answer_buckets(grouped_totals(sel, (), Bucketing(DAY, BERLIN)))

            expected = _raw_buckets(_raw_events(autumn, start, end, **raw_filters), BERLIN, DAY)
            assert got == expected


def test_grouping_by_a_dimension_gives_one_group_per_value(autumn, subtests):
    """A missing team (or project, token) is one group, from raw edges and roll-ups alike."""
    start = PERIODS["autumn"] + timedelta(hours=1, minutes=1, seconds=1)
    end = start + timedelta(days=1, hours=1, seconds=1)
    events = _raw_events(autumn, start, end)
    for dim in ("model", "team_id", "project_id", "user_id", "api_token_id", "status_code"):
        with subtests.test(dim):
            expected: dict = defaultdict(int)
            for e in events:
                expected[getattr(e, dim)] += 1

            got = grouped_totals(_org_selection(autumn, start, end), (dim,))

            assert {key[1]: t.requests for key, t in got.rows.items()} == dict(expected)


def test_who_questions_of_whole_organizations_come_from_the_people_roll_ups(autumn, subtests):
    """Top users, ranked tokens and distinct users/assistants/workflows of an org admin
    read the people and label roll-ups (days, hours, raw edges) and equal raw events
    exactly."""
    start = PERIODS["autumn"] + timedelta(hours=2, minutes=7, seconds=3)
    end = start + timedelta(days=2, hours=3, minutes=1)
    events = _raw_events(autumn, start, end)
    sel = _org_selection(autumn, start, end)
    for dim in ("user_id", "api_token_id"):
        with subtests.test(dim):
            expected: dict = defaultdict(lambda: [0, 0, 0])
            for e in events:
                acc = expected[getattr(e, dim)]
                acc[0] += 1
                acc[1] += e.status_code >= 400
                acc[2] += e.cost_nanos
            with CaptureQueriesContext(connection) as seen:
                got = grouped_totals(sel, (dim,))

            assert {
                key[1]: [t.requests, t.failed_requests, t.cost_nanos] for key, t in got.rows.items()
            } == {key: value for key, value in expected.items()}
            tables = " ".join(q["sql"] for q in seen.captured_queries)
            assert "metering_org_people_daily" in tables and "metering_org_people_hourly" in tables
            assert "metering_scope_usage" not in tables
    with subtests.test("distinct"):
        with CaptureQueriesContext(connection) as seen:
            got = analytics_queries.distinct_counts(sel, ("user_id", "assistant", "workflow"))

        tables = " ".join(q["sql"] for q in seen.captured_queries)
        assert "metering_org_people_daily" in tables and "metering_org_label_daily" in tables

        assert got["user_id"] >= 2 and got["assistant"] == 2 and got["workflow"] == 3
        assert got == {
            "user_id": len({e.user_id for e in events if e.user_id}),
            "assistant": len({e.assistant for e in events if e.assistant}),
            "workflow": len({e.workflow for e in events if e.workflow}),
        }
    with subtests.test("a model filter reads the wide roll-up"):
        filtered = _org_selection(autumn, start, end, models=("gpt-4o",))
        expected_users: dict = defaultdict(int)
        for e in events:
            if e.model == "gpt-4o":
                expected_users[e.user_id] += 1

        got = grouped_totals(filtered, ("user_id",))

        assert {key[1]: t.requests for key, t in got.rows.items()} == dict(expected_users)


def test_scoped_viewers_get_exact_totals_of_their_scope(autumn, subtests):
    start = PERIODS["autumn"] + timedelta(minutes=44, seconds=44)
    end = start + timedelta(days=3, minutes=1)
    for persona in ("team_lead", "project_admin", "member", "outsider", "platform_admin"):
        with subtests.test(persona):
            user = autumn.users[persona]
            sel = Selection(scope=viewer_scope(user), start=start, end=end)
            visible = visible_events(user).filter(timestamp__gte=start, timestamp__lt=end)

            assert _totals_tuple(totals(sel)) == _raw_tuple(list(visible))


def test_totals_of_some_measures_sum_those_alone_and_equal_raw_events(autumn, subtests):
    """Latency averages ask for requests and latency only: per operation and Berlin day,
    those equal the raw events' and no other measure is summed."""
    start = PERIODS["autumn"] + timedelta(hours=3, minutes=7, seconds=9)
    end = start + timedelta(days=3, hours=2, minutes=1)
    measures = ("requests", "latency_ms_sum")
    for persona in ("org_admin", "team_lead", "member"):
        with subtests.test(persona):
            user = autumn.users[persona]
            sel = Selection(scope=viewer_scope(user), start=start, end=end)
            bucketing = Bucketing(DAY, BERLIN)
            expected = defaultdict(lambda: [0, 0])
            for e in visible_events(user).filter(timestamp__gte=start, timestamp__lt=end):
                key = (_local_bucket(e.timestamp, BERLIN, DAY), e.operation)
                expected[key][0] += 1
                expected[key][1] += e.latency_ms

            got = grouped_totals(sel, ("operation",), bucketing, measures).rows

            assert expected
            assert {k: [t.requests, t.latency_ms_sum] for k, t in got.items()} == dict(expected)
            assert all(t.cost_nanos == 0 and t.input_tokens == 0 for t in got.values())


def test_scoped_distinct_counts_read_the_scope_actors_and_equal_raw_events(autumn, subtests):
    """Active users, assistants and workflows of a partial scope: whole days from the
    scope actor roll-up (not the wide one), edges from quarters and raw events, exact."""
    start = PERIODS["autumn"] + timedelta(hours=3, minutes=7, seconds=9)
    end = start + timedelta(days=3, hours=2, minutes=1)
    columns = ("user_id", "assistant", "workflow")
    for persona in ("team_lead", "project_admin", "member", "outsider"):
        with subtests.test(persona):
            user = autumn.users[persona]
            sel = Selection(scope=viewer_scope(user), start=start, end=end)
            visible = list(visible_events(user).filter(timestamp__gte=start, timestamp__lt=end))
            with CaptureQueriesContext(connection) as seen:
                got = analytics_queries.distinct_counts(sel, columns)

            assert got == {
                column: len({getattr(e, column) for e in visible if getattr(e, column)})
                for column in columns
            }
            sql = " ".join(q["sql"] for q in seen.captured_queries)
            assert "metering_scope_actor_daily" in sql
            assert "metering_scope_usage_daily" not in sql
    with subtests.test("a team lead counts someone, an outsider no one"):
        counts = {
            persona: analytics_queries.distinct_counts(
                Selection(scope=viewer_scope(autumn.users[persona]), start=start, end=end),
                columns,
            )
            for persona in ("team_lead", "outsider")
        }

        assert counts["team_lead"]["user_id"] > 0 and counts["team_lead"]["assistant"] > 0
        assert counts["outsider"] == dict.fromkeys(columns, 0)


def test_scoped_totals_by_who_and_operation_come_from_the_scope_actors(autumn, subtests):
    """A partial scope's totals by operation, user, token or team, failures and latency
    sums included, and per local day in Berlin: whole days from the scope actor roll-up,
    exactly what its raw events give; a model filter still reads the wide roll-up."""
    start = PERIODS["autumn"] + timedelta(hours=5, minutes=3, seconds=2)
    end = start + timedelta(days=3, hours=1, minutes=7)
    berlin = Bucketing(DAY, ZoneInfo("Europe/Berlin"))
    for persona in ("team_lead", "project_admin", "member"):
        user = autumn.users[persona]
        sel = Selection(scope=viewer_scope(user), start=start, end=end)
        visible = list(visible_events(user).filter(timestamp__gte=start, timestamp__lt=end))
        for dims, bucketing in (
            (("operation",), None),
            (("user_id",), None),
            (("api_token_id",), None),
            (("team_id",), None),
            (("operation",), berlin),
        ):
            with subtests.test(persona=persona, dims=dims, chart=bucketing is not None):
                expected: dict = defaultdict(lambda: [0, 0, 0, 0])
                for e in visible:
                    key = (
                        berlin.key_of(int(e.timestamp.timestamp())) if bucketing else None,
                        *(getattr(e, d) for d in dims),
                    )
                    acc = expected[key]
                    acc[0] += 1
                    acc[1] += e.status_code >= 400
                    acc[2] += e.cost_nanos
                    acc[3] += e.latency_ms
                with CaptureQueriesContext(connection) as seen:
                    got = grouped_totals(sel, dims, bucketing)

                assert {
                    key: [t.requests, t.failed_requests, t.cost_nanos, t.latency_ms_sum]
                    for key, t in got.rows.items()
                } == dict(expected)
                sql = " ".join(q["sql"] for q in seen.captured_queries)
                assert "metering_scope_actor_daily" in sql
                assert "metering_scope_usage_daily" not in sql
    with subtests.test("a model filter needs the wide roll-up"):
        lead = Selection(
            scope=viewer_scope(autumn.users["team_lead"]), start=start, end=end, models=("gpt-4o",)
        )
        with CaptureQueriesContext(connection) as seen:
            grouped_totals(lead, ("operation",))

        sql = " ".join(q["sql"] for q in seen.captured_queries)
        assert "metering_scope_usage_daily" in sql and "metering_scope_actor_daily" not in sql


def test_an_empty_scope_reads_nothing(autumn):
    start = PERIODS["autumn"]
    sel = Selection(scope=Scope(), start=start, end=start + SPAN)

    assert totals(sel).requests == 0


# ---------------------------------------------------------------------------------------
# An edge read as its bucket less the rest of it; a range that ends now


def _histogram_counts(monkeypatch, sel: Selection, plan) -> dict[int, int]:
    """The latency histogram `_hist_percentiles` builds from `plan` (counts by bucket
    index, zeros left out), captured where it becomes a percentile."""
    seen = []
    monkeypatch.setattr(
        analytics_queries,
        "_percentile_from_histogram",
        lambda counts, q: seen.append({i: n for i, n in counts.items() if n}),
    )
    analytics_queries._hist_percentiles(sel, plan, {o: "all" for o in sel.operations}, 0.95)
    return seen[0]


@pytest.mark.parametrize(
    ("start_at", "end_at", "now_at"),
    [
        # Ends "now" at 14:24 (this minute included): the end hour is read as its row less
        # the events still to come; the start edge of 36 minutes as its hour less 24.
        (timedelta(hours=8, minutes=24), timedelta(days=1, hours=14, minutes=24), 40),
        # In the past: a 10-minute start edge stays raw, a 41-minute end edge is its hour
        # less 19 minutes of events.
        (timedelta(hours=2, minutes=50), timedelta(days=2, hours=20, minutes=41), None),
    ],
    ids=["ends-now", "past"],
)
def test_edge_read_as_its_hour_less_the_rest_equals_raw_events(
    autumn, monkeypatch, start_at, end_at, now_at
):
    """The p95's histogram of an org-wide range whose edges are read as their hour's row
    less the raw events of the rest of the hour is the raw events' own histogram."""
    from analytics.queries import _histogram_plan
    from metering.aggregates import latency_bucket

    start, end = PERIODS["autumn"] + start_at, PERIODS["autumn"] + end_at
    if now_at is not None:
        now = (end - timedelta(seconds=now_at)).timestamp()
        monkeypatch.setattr(analytics_queries, "_now", lambda: now)
    events = _raw_events(autumn, start, end)
    sel = _org_selection(
        autumn, start, end, operations=tuple(sorted({e.operation for e in events}))
    )
    plan = _histogram_plan(sel, complement=True)
    end_hour = int(end.timestamp()) // HOUR * HOUR

    assert plan.family == "org" and plan.raw_less, "some edge read as its hour less the rest"
    assert any(a <= end_hour < b for _rows, a, b, _grain, sign in plan.reads if sign == 1)
    assert any(a < int(start.timestamp()) for a, _b in plan.raw_less) == (now_at is not None)
    expected = defaultdict(int)
    for e in events:
        expected[latency_bucket(e.latency_ms)] += 1
    assert _histogram_counts(monkeypatch, sel, plan) == dict(expected)


def test_distinct_counts_of_a_range_ending_now_read_the_current_hour_exactly(
    personas, monkeypatch, subtests
):
    """Active users, assistants and workflows of a range that ends now: the current hour
    from its roll-up rows while no event lies beyond the end, from raw events when one
    does (an event up to 5 minutes ahead); both exact."""
    base = datetime(2026, 9, 7, tzinfo=UTC)
    events = [
        event_payload(timestamp=base + timedelta(hours=h, minutes=7), assistant="helper")
        for h in range(30)
    ]
    # Hour 30: "coder" before the end (30:20), "ahead" after it, in the same hour.
    events += [
        event_payload(timestamp=base + timedelta(hours=30, minutes=12), assistant="coder"),
        event_payload(
            timestamp=base + timedelta(hours=30, minutes=23),
            assistant="ahead",
            workflow="ahead",
            user="lead@example.test",
        ),
        # Hour 32: "closer" before its end (32:40), nothing after it.
        event_payload(timestamp=base + timedelta(hours=32, minutes=5), assistant="closer"),
    ]
    assert not ingest(personas.org, events, token=personas.service_token).rejected
    columns = ("user_id", "assistant", "workflow")
    cases = {
        "an event beyond the end": (30, 20, {"user_id": 0, "assistant": 2, "workflow": 0}),
        "nothing beyond the end": (32, 40, {"user_id": 1, "assistant": 4, "workflow": 1}),
    }
    for case, (hour, minute, expected) in cases.items():
        with subtests.test(case):
            end = base + timedelta(hours=hour, minutes=minute)
            now = end.timestamp() - 30
            monkeypatch.setattr(analytics_queries, "_now", lambda now=now: now)
            sel = _org_selection(personas, base, end)
            raw = _raw_events(personas, base, end)
            with CaptureQueriesContext(connection) as seen:
                got = analytics_queries.distinct_counts(sel, columns)

            assert got == expected
            assert got == {c: len({getattr(e, c) for e in raw if getattr(e, c)}) for c in columns}
            sql = " ".join(q["sql"] for q in seen.captured_queries)
            assert "EXISTS" in sql and "metering_org_people_hourly" in sql


# ---------------------------------------------------------------------------------------
# Latency percentiles


def _exact_p95(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def test_org_wide_p95_from_the_histogram_is_within_5_percent(personas, monkeypatch):
    rng = random.Random(11)
    start = datetime(2026, 8, 3, 0, 0, 17, tzinfo=UTC)
    events = [
        event_payload(
            timestamp=start + timedelta(seconds=rng.randint(0, 2 * 86400)),
            latency_ms=int(rng.lognormvariate(6.5, 1.1)) + 5,
        )
        for _ in range(3000)
    ]
    for n in range(0, len(events), 1000):
        ingest(personas.org, events[n : n + 1000], token=personas.service_token)
    begin = start + timedelta(minutes=23, seconds=5)
    end = start + timedelta(days=1, hours=20, minutes=41, seconds=3)
    sel = _org_selection(personas, begin, end)
    exact = _exact_p95([e.latency_ms for e in _raw_events(personas, begin, end)])

    def no_raw_percentile(*args):
        raise AssertionError("an org-wide p95 over days must come from the histogram")

    monkeypatch.setattr("analytics.queries._raw_percentile", no_raw_percentile)
    estimate = latency_percentile(sel, 0.95)

    assert abs(estimate - exact) <= 0.05 * exact


def _no_raw_percentile(*args):
    raise AssertionError("this p95 must come from a histogram, not a raw sort")


def test_team_filtered_p95_from_the_daily_histogram_is_within_5_percent(autumn, monkeypatch):
    # Starts and ends mid-day: the two partial UTC days come from raw events.
    start = PERIODS["autumn"] + timedelta(hours=3, minutes=7)
    end = start + timedelta(days=2, hours=5)
    sel = _org_selection(autumn, start, end, team_ids=(autumn.platform_team.id,))
    values = [e.latency_ms for e in _raw_events(autumn, start, end, team=autumn.platform_team)]
    monkeypatch.setattr("analytics.queries._raw_percentile", _no_raw_percentile)

    estimate = latency_percentile(sel, 0.95)

    assert abs(estimate - _exact_p95(values)) <= 0.05 * _exact_p95(values)


def test_project_admin_p95_counts_own_events_outside_the_project(personas, monkeypatch):
    # 95 fast calls in the project, 8 slow ones of the admin's own elsewhere: the p95 is
    # one of the slow ones, so it is right only if the own events outside the project are
    # counted too (the scoped histogram keys the user as well).
    start = datetime(2026, 9, 7, 0, 0, tzinfo=UTC)
    events = [
        event_payload(timestamp=start + timedelta(hours=i), latency_ms=100 + i, project="chatbot")
        for i in range(95)
    ] + [
        event_payload(
            timestamp=start + timedelta(hours=5 * i + 2),
            latency_ms=9000 + i,
            user=personas.project_admin.email,
            team="research",
            project="search",
        )
        for i in range(8)
    ]
    ingest(personas.org, events, token=personas.service_token)
    viewer = personas.project_admin
    sel = Selection(
        scope=viewer_scope(viewer),
        start=start,
        end=start + timedelta(days=5),
        org_ids=(personas.org.id,),
    )
    visible = visible_events(viewer).filter(timestamp__gte=sel.start, timestamp__lt=sel.end)
    exact = _exact_p95(list(visible.values_list("latency_ms", flat=True)))
    monkeypatch.setattr("analytics.queries._raw_percentile", _no_raw_percentile)

    estimate = latency_percentile(sel, 0.95)

    assert exact >= 9000
    assert abs(estimate - exact) <= 0.05 * exact


def test_user_filtered_p95_from_the_scoped_histogram_is_within_5_percent(autumn, monkeypatch):
    start = PERIODS["autumn"] + timedelta(hours=3)
    end = start + timedelta(days=2)
    member = autumn.member
    sel = _org_selection(autumn, start, end, user_ids=(member.id,))
    values = [e.latency_ms for e in _raw_events(autumn, start, end, user=member)]
    monkeypatch.setattr("analytics.queries._raw_percentile", _no_raw_percentile)

    estimate = latency_percentile(sel, 0.95)

    assert values
    assert abs(estimate - _exact_p95(values)) <= 0.05 * _exact_p95(values)


def test_model_filtered_p95_comes_from_the_model_histogram_within_5_percent(autumn, monkeypatch):
    # A model filter, alone or with a team the viewer sees whole (an org admin; a team
    # lead on their own team), reads the org x day x team x model histogram.
    start = PERIODS["autumn"] + timedelta(hours=3)
    end = start + timedelta(days=2)
    team = autumn.platform_team
    lead_scope = viewer_scope(autumn.team_lead)
    assert team.id in lead_scope.team_ids
    monkeypatch.setattr("analytics.queries._raw_percentile", _no_raw_percentile)
    cases = [
        (_org_selection(autumn, start, end, models=("gpt-4o",)), {"model": "gpt-4o"}),
        (
            _org_selection(autumn, start, end, models=("gpt-4o-mini",), team_ids=(team.id,)),
            {"model": "gpt-4o-mini", "team": team},
        ),
        (
            Selection(
                scope=lead_scope,
                start=start,
                end=end,
                org_ids=(autumn.org.id,),
                team_ids=(team.id,),
                models=("gpt-4o",),
            ),
            {"model": "gpt-4o", "team": team},
        ),
    ]
    for sel, raw_filters in cases:
        values = [e.latency_ms for e in _raw_events(autumn, start, end, **raw_filters)]
        exact = _exact_p95(values)

        got = latency_percentile(sel, 0.95)

        assert values and abs(got - exact) <= 0.05 * exact, (raw_filters, got, exact)


def test_a_model_filter_within_a_partial_scope_is_exact_from_raw_events(autumn):
    # A project admin's model filter: the model histogram has no project, user or token
    # column, so raw events answer, exactly.
    start = PERIODS["autumn"] + timedelta(hours=3)
    end = start + timedelta(days=2)
    scope = viewer_scope(autumn.project_admin)
    sel = Selection(scope=scope, start=start, end=end, org_ids=(autumn.org.id,), models=("gpt-4o",))
    values = [
        e.latency_ms
        for e in visible_events(autumn.project_admin).filter(
            organization=autumn.org, timestamp__gte=start, timestamp__lt=end, model="gpt-4o"
        )
    ]

    assert values
    assert latency_percentile(sel, 0.95) == _exact_p95(values)


def test_p95_of_nothing_is_none(personas):
    start = datetime(2026, 1, 1, tzinfo=UTC)

    assert latency_percentile(_org_selection(personas, start, start + SPAN)) is None


def _partial_scopes(autumn):
    """The team lead, project admin and member, and one person holding every kind of
    part: a team, a project, own events and two own tokens (overlapping each other)."""
    from accounts.models import Membership, Role, User

    scopes = {p: viewer_scope(autumn.users[p]) for p in ("team_lead", "project_admin", "member")}
    lead = User.objects.get(pk=autumn.team_lead.pk)
    Membership.objects.create(
        organization=autumn.org, user=lead, role=Role.PROJECT_ADMIN, project=autumn.chatbot_project
    )
    for token in (autumn.member_token, autumn.service_token):
        token.owner = lead
        token.save()
    scopes["every part"] = viewer_scope(User.objects.get(pk=lead.pk))
    assert len(scopes["every part"].token_ids) == 2 and scopes["every part"].project_ids
    return scopes


def test_partial_scope_p95_from_part_histograms_equals_the_scope_histogram(
    autumn, subtests, monkeypatch, shared_rollups_only
):
    # Inclusion-exclusion over the parts' histograms counts every event of the scope
    # once: the p95 per operation group and per local day is the very value the scope
    # histogram gives (same buckets), itself within 5 % of exact (tests above).
    start = PERIODS["autumn"] + timedelta(hours=3, minutes=7)
    end = start + timedelta(days=3)
    groups = {"completion": ("chat", "completion"), "embedding": ("embedding",)}
    real_family = analytics_queries._hist_family
    for name, scope in _partial_scopes(autumn).items():
        with subtests.test(name):
            sel = Selection(scope=scope, start=start, end=end, org_ids=(autumn.org.id,))
            assert real_family(sel) == "parts"
            with CaptureQueriesContext(connection) as queries:
                by_parts = analytics_queries.latency_percentiles(sel, groups)
            assert any("latency_hist_part_daily" in q["sql"] for q in queries.captured_queries)
            series = latency_series(sel, Bucketing(DAY, BERLIN))
            assert by_parts["completion"] is not None and series

            with monkeypatch.context() as patched:
                patched.setattr(analytics_queries, "_hist_family", lambda s: "scope")
                assert analytics_queries.latency_percentiles(sel, groups) == by_parts
                assert latency_series(sel, Bucketing(DAY, BERLIN)) == series


def test_moved_pieces_compiled_once_count_what_one_query_per_piece_counts(autumn, monkeypatch):
    # `_piece_latencies` compiles one branch per part of the scope and repeats it with
    # each piece's values; a marker found more than once (a filter value equal to it)
    # falls back to compiling every piece. Both count the events of each piece once,
    # summed over the scope's disjoint parts (an empty piece counts nothing).
    if connection.vendor != "postgresql":
        pytest.skip("raw pieces are counted in SQL on PostgreSQL")
    start = int((PERIODS["autumn"] + timedelta(hours=3)).timestamp())
    pieces = [(start + day * 86400, start + day * 86400 + 7200) for day in range(3)]
    pieces.append((start, start))
    lead = autumn.users["team_lead"]
    rows = visible_events(lead)
    parts = [UsageEvent.objects.filter(q) for q in scope_disjoint_parts(viewer_scope(lead))]
    assert len(parts) >= 2

    def per_piece(statement) -> dict[int, int]:
        counts = defaultdict(int)
        for piece, _operation, _index, n in analytics_queries._tuples(statement):
            counts[piece] += n
        return dict(counts)

    expected = {
        i: n
        for i, (a, b) in enumerate(pieces)
        if (
            n := rows.filter(timestamp__gte=datetime.fromtimestamp(a, UTC))
            .filter(timestamp__lt=datetime.fromtimestamp(b, UTC))
            .count()
        )
    }
    once = analytics_queries._piece_latencies(parts, pieces)
    assert expected and per_piece(once) == expected
    number, bound, _ = analytics_queries._PIECE_MARKERS
    # Equal bounds: each marker is found twice, as a filter value equal to one would be.
    monkeypatch.setattr(analytics_queries, "_PIECE_MARKERS", (number, bound, bound))
    each = analytics_queries._piece_latencies(parts, pieces)
    assert per_piece(each) == expected
    assert sorted(analytics_queries._tuples(each)) == sorted(analytics_queries._tuples(once))


@pytest.mark.parametrize("tz", [UTC_ZONE, BERLIN, NEW_YORK, KOLKATA], ids=str)
def test_team_latency_series_per_local_day_from_the_daily_histogram(autumn, tz, monkeypatch):
    # UTC days are the daily histogram's own buckets; Berlin, New York and Kolkata days
    # straddle two of them: each row goes to the local day holding most of it and the
    # events of its other piece are moved, so each day's p95 stays within 5 %.
    start = PERIODS["autumn"] + timedelta(hours=3)
    end = start + timedelta(days=3)
    team = autumn.platform_team
    sel = _org_selection(autumn, start, end, team_ids=(team.id,))
    by_day = defaultdict(list)
    for e in _raw_events(autumn, start, end, team=team):
        by_day[_local_bucket(e.timestamp, tz, DAY)].append(e.latency_ms)
    real_quantile = analytics_queries._quantile_sorted

    def no_raw_sort(values, q):
        assert not values, "a day's p95 was sorted from raw events, not read from the histogram"
        return real_quantile(values, q)

    monkeypatch.setattr("analytics.queries._quantile_sorted", no_raw_sort)

    series = latency_series(sel, Bucketing(DAY, tz))

    assert set(series) == set(by_day)
    for key, values in by_day.items():
        exact = _exact_p95(values)
        assert abs(series[key][1] - exact) <= 0.05 * exact, (key, series[key][1], exact)


@pytest.mark.parametrize("tz", [UTC_ZONE, BERLIN, KOLKATA], ids=str)
def test_org_latency_series_per_local_day_moves_pieces_from_the_hourly_histogram(
    autumn, tz, monkeypatch
):
    # An org admin's chart reads whole UTC days from the daily histogram; a Berlin day's
    # other hour comes from the hourly one, a Kolkata day's half hours from raw events.
    start = PERIODS["autumn"] + timedelta(hours=3, minutes=7)
    end = start + timedelta(days=3)
    sel = _org_selection(autumn, start, end)
    by_day = defaultdict(list)
    for e in _raw_events(autumn, start, end):
        by_day[_local_bucket(e.timestamp, tz, DAY)].append(e.latency_ms)

    def no_raw_series(*args):
        raise AssertionError("the whole range was read from raw events")

    monkeypatch.setattr("analytics.queries._raw_series", no_raw_series)

    series = latency_series(sel, Bucketing(DAY, tz))

    assert set(series) == set(by_day)
    for key, values in by_day.items():
        exact = _exact_p95(values)
        assert abs(series[key][1] - exact) <= 0.05 * exact, (key, series[key][1], exact)


# ---------------------------------------------------------------------------------------
# Org-wide reads with their WHERE written by hand


def test_narrow_reads_select_what_the_orm_selects(autumn, subtests):
    """The org-wide roll-ups' hand-written WHERE (`_NarrowRows`) keeps the same rows as
    the ORM's filter of the same lookups, and an empty list keeps none."""
    from django.db.models import Q

    from analytics.queries import _NarrowRows, _select, _Sql, _tuples, _union
    from metering.models import OrgUsageHourly

    start = int(PERIODS["autumn"].timestamp()) + 3 * HOUR
    cases = {
        "range": {"bucket__gte": start, "bucket__lt": start + DAY},
        "models and status": {
            "model__in": ["gpt-4o", "nopriced"],
            "status_code__gte": 400,
            "bucket__lte": start + 2 * DAY,
        },
        "operation": {"operation": "chat", "bucket__gt": start},
        "empty list": {"model__in": []},
    }
    items = [("bucket", "bucket"), ("model", "model"), ("n", _Sql('SUM("requests")'))]
    for name, lookups in cases.items():
        with subtests.test(name):
            org = {"organization_id__in": [autumn.org.id]}
            narrow = _NarrowRows(OrgUsageHourly).filter(Q(**org)).filter(**lookups)
            orm = OrgUsageHourly.objects.filter(**org).filter(**lookups)

            got = _select(narrow, items, (1, 2))
            expected = _select(orm, items, (1, 2))

            if name == "empty list":
                assert got is None and expected is None
                continue
            rows = sorted(_tuples(_union([got])))
            assert rows == sorted(_tuples(_union([expected])))
            assert rows, "the case should select some rows"


def test_narrow_reads_name_the_organizations_once(personas, subtests):
    """The org-wide roll-ups' organization condition is the gate and the filter at once:
    each read writes it once, with the selected organizations, and keeps the filters."""
    from analytics.queries import _rollup_rows

    start = PERIODS["autumn"]
    org_id = personas.org.id
    cases = {
        "org": ({"models": ("gpt-4o",)}, ("model__in", ("gpt-4o",)), "gpt-4o"),
        "people": ({"user_ids": (7,)}, ("user_id__in", (7,)), 7),
        "labels": ({}, None, None),
    }
    for family, (filters, lookup, value) in cases.items():
        with subtests.test(family):
            sel = _org_selection(personas, start, start + SPAN, **filters)
            rows = _rollup_rows(sel, family, DAY)
            where, params = rows.where()
            assert where.count("organization_id") == 1, where
            assert ("organization_id__in", (org_id,)) in rows.lookups
            assert params == [org_id] + ([value] if lookup else [])
            if lookup:
                assert lookup in rows.lookups


def test_narrow_reads_refuse_an_or():
    """Only ANDed lookups: an OR (a gate's predicate) is never flattened into an AND."""
    from django.db.models import Q

    from analytics.queries import _NarrowRows
    from metering.models import OrgUsageHourly

    with pytest.raises(ValueError):
        _NarrowRows(OrgUsageHourly).filter(Q(team_id=1) | Q(user_id=2))
    with pytest.raises(ValueError):
        _NarrowRows(OrgUsageHourly).filter(~Q(model="gpt-4o"))


# ---------------------------------------------------------------------------------------
# Most of a day as the day less the rest of it


@pytest.mark.parametrize(
    "filters",
    [{}, {"team_ids": "platform"}, {"operations": ("chat",)}],
    ids=["org-wide", "team", "operation"],
)
def test_most_of_a_day_read_as_the_day_less_the_rest_is_exact(autumn, filters, subtests):
    """Edges covering most of a UTC day (20 h 41 min at the end, 21 h at the start) are
    read as the day's row less the finer rows of the rest of it: totals equal raw events,
    and the p95's histogram counts are the same as read hour by hour."""
    from analytics.queries import _hist_percentiles, _histogram_plan

    if filters.get("team_ids"):
        filters = {"team_ids": (autumn.platform_team.id,)}
    start = PERIODS["autumn"] + timedelta(hours=2, minutes=59, seconds=3)
    end = PERIODS["autumn"] + timedelta(days=2, hours=20, minutes=41, seconds=3)
    sel = _org_selection(autumn, start, end, **filters)
    raw = {}
    if "team_ids" in filters:
        raw["team"] = autumn.platform_team
    if "operations" in filters:
        raw["operation"] = "chat"
    events = _raw_events(autumn, start, end, **raw)

    with subtests.test("totals"):
        t = totals(sel)
        assert (t.requests, t.input_tokens, t.output_tokens, t.cost_nanos) == (
            len(events),
            sum(e.input_tokens for e in events),
            sum(e.output_tokens for e in events),
            sum(e.cost_nanos for e in events),
        )
    with subtests.test("p95"):
        ops = tuple(sorted({e.operation for e in events}))
        narrowed = analytics_queries.replace(sel, operations=ops)
        group_of = {op: "all" for op in ops}
        plain = _histogram_plan(narrowed)
        signed = _histogram_plan(narrowed, complement=True)
        if signed is None:  # a filter the histograms lack: raw events answer both
            assert plain is None
            return
        if signed.family == "org":  # the histogram family with hours under its days
            assert any(sign == -1 for *_rest, sign in signed.reads), "the day less the rest"
        for q in (0.5, 0.95, 0.99):
            assert _hist_percentiles(narrowed, signed, group_of, q) == _hist_percentiles(
                narrowed, plain, group_of, q
            )
