"""Viewer roll-ups (metering/viewers.py): a partial scope's own rows.

A team lead, project admin or member in one organization reads their whole local days
from rows counted for them alone. Every answer is compared with the raw events the gate
lets them see, counted here in Python, and with what the shared roll-ups answer (the
path taken while a viewer's rows are rebuilt); a change of roles, token owners or the
organization's zone is seen at the next read; an outsider's rows hold nothing of others.
"""

from collections import defaultdict
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.models import Membership, Role, User
from analytics import queries as analytics_queries
from analytics.queries import (
    DAY,
    Bucketing,
    Selection,
    distinct_counts,
    grouped_totals,
    latency_percentiles,
    latency_series,
)
from analytics.visibility import viewer_scope, visible_events
from metering import viewers
from metering.aggregates import rebuild_day, reconcile_day
from metering.models import ViewerCalendar, ViewerLink, ViewerUsageDaily
from tests.analytics.test_queries import PERIODS, SPAN, _ingest_period
from tests.factories import event_payload, ingest

BERLIN = ZoneInfo("Europe/Berlin")
PARTIAL = ("team_lead", "project_admin", "member")
GROUPS = {"completion": ("chat", "completion"), "embedding": ("embedding",)}
# Three days and a bit across Berlin's DST change (October 25), never on a day boundary.
START = PERIODS["autumn"] + timedelta(hours=5, minutes=3, seconds=2)
END = START + timedelta(days=3, hours=1, minutes=7)


@pytest.fixture
def autumn(personas):
    _ingest_period(personas, PERIODS["autumn"])
    return personas


def _selection(personas, user, **filters) -> Selection:
    fresh = User.objects.get(pk=user.pk)  # the scope as it is now, not as first read
    return Selection(
        scope=viewer_scope(fresh),
        start=filters.pop("start", START),
        end=filters.pop("end", END),
        org_ids=(personas.org.id,),
        **filters,
    )


def _visible(personas, user, start=START, end=END) -> list:
    fresh = User.objects.get(pk=user.pk)
    return list(
        visible_events(fresh).filter(
            organization=personas.org, timestamp__gte=start, timestamp__lt=end
        )
    )


def _expected(events, dims, bucketing=None) -> dict:
    out: dict = defaultdict(lambda: [0, 0, 0, 0])
    for e in events:
        key = (
            bucketing.key_of(int(e.timestamp.timestamp())) if bucketing else None,
            *(getattr(e, d) for d in dims),
        )
        acc = out[key]
        acc[0] += 1
        acc[1] += e.status_code >= 400
        acc[2] += e.cost_nanos
        acc[3] += e.latency_ms
    return dict(out)


def _answer(grouped) -> dict:
    return {
        key: [t.requests, t.failed_requests, t.cost_nanos, t.latency_ms_sum]
        for key, t in grouped.rows.items()
    }


def _reads_viewer_rows(sql: str) -> bool:
    return any(table._meta.db_table in sql for table in viewers.VIEWER_TABLES)


def _read(fn, *args):
    with CaptureQueriesContext(connection) as seen:
        result = fn(*args)
    return result, " ".join(q["sql"] for q in seen.captured_queries)


def test_partial_scopes_read_their_own_rows_and_equal_raw_events(autumn, subtests):
    berlin = Bucketing(DAY, BERLIN)
    for persona in PARTIAL:
        user = autumn.users[persona]
        sel = _selection(autumn, user)
        visible = _visible(autumn, user)
        assert visible
        for dims, bucketing in (
            (("operation",), None),
            (("model",), None),
            (("status_code",), None),
            ((), berlin),
            (("model",), berlin),
            (("user_id",), None),
            (("api_token_id",), None),
        ):
            with subtests.test(persona=persona, dims=dims, chart=bucketing is not None):
                got, sql = _read(grouped_totals, sel, dims, bucketing)

                assert _answer(got) == _expected(visible, dims, bucketing)
                assert _reads_viewer_rows(sql)
                assert "metering_scope_actor_daily" not in sql
                assert "metering_scope_usage_daily" not in sql
        with subtests.test(persona=persona, what="active users, assistants, workflows"):
            columns = ("user_id", "assistant", "workflow")
            got, sql = _read(distinct_counts, sel, columns)

            assert got == {
                c: len({getattr(e, c) for e in visible if getattr(e, c)}) for c in columns
            }
            assert "metering_viewer_actor_daily" in sql


def test_a_model_or_operation_filter_narrows_the_viewer_rows_exactly(autumn, subtests):
    user = autumn.project_admin
    for filters in ({"models": ("gpt-4o",)}, {"operations": ("chat",)}, {"status": "failed"}):
        with subtests.test(**{k: str(v) for k, v in filters.items()}):
            sel = _selection(autumn, user, **filters)
            visible = [
                e
                for e in _visible(autumn, user)
                if e.model in filters.get("models", (e.model,))
                and e.operation in filters.get("operations", (e.operation,))
                and (filters.get("status") != "failed" or e.status_code >= 400)
            ]
            got, sql = _read(grouped_totals, sel, ("operation",))

            assert _answer(got) == _expected(visible, ("operation",))
            assert "metering_viewer_usage_daily" in sql


def test_partial_scope_p95_from_viewer_rows_is_what_the_shared_roll_ups_give(
    autumn, subtests, monkeypatch
):
    # Both count the same events in the same latency buckets, so the percentiles are the
    # very same values (within 5 % of exact: test_queries); per local Berlin day too,
    # where the shared roll-ups move the pieces of UTC days and the viewer's rows are
    # the local days themselves.
    berlin = Bucketing(DAY, BERLIN)
    for persona in PARTIAL:
        with subtests.test(persona):
            sel = _selection(autumn, autumn.users[persona])
            own, sql = _read(latency_percentiles, sel, GROUPS)
            series, series_sql = _read(latency_series, sel, berlin)
            with monkeypatch.context() as shared:
                shared.setattr(analytics_queries, "_viewer_read", lambda s, bucketing=None: None)
                assert latency_percentiles(sel, GROUPS) == own
                assert latency_series(sel, berlin) == series

            assert own["completion"] is not None and series
            assert "metering_viewer_hist_daily" in sql
            assert "metering_viewer_hist_daily" in series_sql
            assert "latency_hist_part_daily" not in sql + series_sql


def test_hourly_charts_and_short_ranges_use_the_shared_roll_ups(autumn):
    sel = _selection(autumn, autumn.team_lead)
    _hourly, sql = _read(grouped_totals, sel, (), Bucketing(3600, BERLIN))
    short = _selection(autumn, autumn.team_lead, end=START + timedelta(hours=5))
    _short, short_sql = _read(grouped_totals, short, ())

    assert not _reads_viewer_rows(sql)
    assert not _reads_viewer_rows(short_sql)


def test_a_new_role_is_seen_at_the_next_read(autumn, monkeypatch):
    member = autumn.member
    before = _answer(grouped_totals(_selection(autumn, member), ("operation",)))
    Membership.objects.create(
        organization=autumn.org, user=member, role=Role.TEAM_LEAD, team=autumn.platform_team
    )
    # Until the member's rows are rebuilt, the shared roll-ups answer for the new scope.
    monkeypatch.setattr(viewers, "request_rebuild", lambda org_id, viewer_id: False)
    waiting, waiting_sql = _read(grouped_totals, _selection(autumn, member), ("operation",))
    monkeypatch.undo()
    rebuilt, rebuilt_sql = _read(grouped_totals, _selection(autumn, member), ("operation",))

    expected = _expected(_visible(autumn, member), ("operation",))
    assert _answer(waiting) == expected == _answer(rebuilt) != before
    assert not _reads_viewer_rows(waiting_sql)
    assert "metering_viewer_usage_daily" in rebuilt_sql
    links = ViewerLink.objects.filter(organization=autumn.org, viewer_id=member.id)
    assert ("team", autumn.platform_team.id) in set(links.values_list("kind", "part_id"))


def test_a_token_given_to_another_owner_moves_its_events_between_viewers(autumn, subtests):
    lead_before = _answer(grouped_totals(_selection(autumn, autumn.team_lead), ("api_token_id",)))
    grouped_totals(_selection(autumn, autumn.member), ())  # the member's rows built too
    token = autumn.member_token
    token.owner = autumn.team_lead
    token.save()
    for persona in ("member", "team_lead"):
        with subtests.test(persona):
            user = autumn.users[persona]
            got, sql = _read(grouped_totals, _selection(autumn, user), ("api_token_id",))

            assert _answer(got) == _expected(_visible(autumn, user), ("api_token_id",))
            assert "metering_viewer_actor_daily" in sql
    lead_after = _answer(grouped_totals(_selection(autumn, autumn.team_lead), ("api_token_id",)))
    assert lead_after[(None, token.id)][0] > lead_before.get((None, token.id), [0])[0]


def test_an_outsider_reads_nothing_of_the_organization(autumn):
    outsider = autumn.outsider
    sel = _selection(autumn, outsider)

    assert grouped_totals(sel, ("operation",)).rows == {}
    assert distinct_counts(sel, ("user_id",)) == {"user_id": 0}
    assert not ViewerUsageDaily.objects.filter(
        organization=autumn.org, viewer_id=outsider.id
    ).exists()


def test_events_ingested_after_the_build_are_counted_for_every_viewer_who_sees_them(autumn):
    viewers.build_organization(autumn.org.id)
    later = PERIODS["autumn"] + SPAN - timedelta(hours=2)
    events = [
        event_payload(
            request_id=f"late-{i}",
            timestamp=later + timedelta(minutes=i),
            user=("lead@example.test", "member@example.test", None)[i % 3],
            team=("platform", "research", None)[i % 3],
            project=("chatbot", None)[i % 2],
            latency_ms=100 + 37 * i,
        )
        for i in range(30)
    ]
    assert not ingest(autumn.org, events, token=autumn.member_token).rejected
    day = int(later.timestamp()) // 86400 * 86400

    assert reconcile_day(autumn.org.id, day) == []
    for persona in PARTIAL:
        user = autumn.users[persona]
        sel = _selection(autumn, user, start=START, end=PERIODS["autumn"] + SPAN)
        got = grouped_totals(sel, ("operation",))
        assert _answer(got) == _expected(
            _visible(autumn, user, START, PERIODS["autumn"] + SPAN), ("operation",)
        )


def test_check_and_day_rebuild_cover_the_viewer_rows(autumn):
    viewers.build_organization(autumn.org.id)
    row = ViewerUsageDaily.objects.filter(organization=autumn.org).order_by("bucket").last()
    row.requests += 5
    row.save()
    day = row.bucket // 86400 * 86400 + 86400  # a UTC day overlapping that local day

    assert any("requests" in p or "viewer" in p.lower() for p in reconcile_day(autumn.org.id, day))
    rebuild_day(autumn.org.id, day)
    assert reconcile_day(autumn.org.id, day) == []
    assert reconcile_day(autumn.org.id, day - 86400) == []


def test_a_new_zone_counts_the_rows_again_by_its_local_days(autumn):
    viewers.build_organization(autumn.org.id)
    autumn.org.timezone = "Asia/Kolkata"
    autumn.org.save()
    kolkata = Bucketing(DAY, ZoneInfo("Asia/Kolkata"))
    sel = _selection(autumn, autumn.project_admin)
    _stale, stale_sql = _read(grouped_totals, sel, (), kolkata)  # rows in Berlin days
    viewers.request_rebuild(autumn.org.id, None)  # what the change asks for after commit
    got, sql = _read(grouped_totals, sel, (), kolkata)

    assert ViewerCalendar.objects.get(organization=autumn.org).timezone == "Asia/Kolkata"
    assert not _reads_viewer_rows(stale_sql)
    assert "metering_viewer_usage_daily" in sql
    assert _answer(got) == _expected(_visible(autumn, autumn.project_admin), (), kolkata)


def test_whole_organization_charts_of_local_days_read_its_own_rows(autumn, subtests, monkeypatch):
    # An org admin's (and a platform admin's, one organization selected) daily chart in
    # the organization's zone: the rows counting every event by local day, no pieces
    # moved; the same sums as raw events and the same p95 as the shared roll-ups.
    # Metrics (no chart) keep the org roll-ups' UTC days.
    berlin = Bucketing(DAY, BERLIN)
    events = _visible(autumn, autumn.org_admin)
    for persona in ("org_admin", "platform_admin"):
        sel = _selection(autumn, autumn.users[persona])
        with subtests.test(persona):
            got, sql = _read(grouped_totals, sel, ("model",), berlin)
            series, series_sql = _read(latency_series, sel, berlin)
            _metrics, metrics_sql = _read(grouped_totals, sel, ("operation",))
            with monkeypatch.context() as shared:
                shared.setattr(analytics_queries, "_viewer_read", lambda s, bucketing=None: None)
                assert latency_series(sel, berlin) == series

            assert _answer(got) == _expected(events, ("model",), berlin)
            assert "metering_viewer_usage_daily" in sql
            assert "metering_viewer_hist_daily" in series_sql
            assert not _reads_viewer_rows(metrics_sql)


def test_rows_being_counted_are_not_read(autumn):
    # A build counts one local day per transaction and a viewer's rebuild marks their
    # links as being rebuilt: until the last day is done, reads take the shared
    # roll-ups (and the answer is the same).
    from metering.models import ViewerLinkKind

    viewers.build_organization(autumn.org.id)
    sel = _selection(autumn, autumn.team_lead)
    ready, ready_sql = _read(grouped_totals, sel, ("operation",))
    mark = ViewerLink.objects.create(
        organization=autumn.org,
        kind=ViewerLinkKind.REBUILDING,
        part_id=0,
        viewer_id=autumn.team_lead.id,
    )
    marked, marked_sql = _read(grouped_totals, sel, ("operation",))
    mark.delete()
    ViewerCalendar.objects.filter(organization=autumn.org).update(ready=False)
    building, building_sql = _read(grouped_totals, sel, ("operation",))

    assert _reads_viewer_rows(ready_sql)
    assert not _reads_viewer_rows(marked_sql) and not _reads_viewer_rows(building_sql)
    assert _answer(ready) == _answer(marked) == _answer(building)
    assert _answer(ready) == _expected(_visible(autumn, autumn.team_lead), ("operation",))
    # A viewer's rebuild counts their rows day by day and leaves no mark behind.
    ViewerCalendar.objects.filter(organization=autumn.org).update(ready=True)
    ViewerLink.objects.filter(organization=autumn.org, viewer_id=autumn.team_lead.id).delete()
    viewers.rebuild_viewer(autumn.org.id, autumn.team_lead.id)
    assert not ViewerLink.objects.filter(kind=ViewerLinkKind.REBUILDING).exists()
    again, again_sql = _read(grouped_totals, sel, ("operation",))
    assert _reads_viewer_rows(again_sql) and _answer(again) == _answer(ready)
    day = int(PERIODS["autumn"].timestamp())
    assert all(reconcile_day(autumn.org.id, day + i * 86400) == [] for i in range(5))
