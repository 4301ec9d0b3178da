"""Idempotency: (organization, request_id) is stored once, whatever is sent again."""

from datetime import UTC, datetime, timedelta

import pytest
from django.db.models import Sum

from accounts.models import User
from metering.aggregates import reconcile_day
from metering.models import LatencyHistogramHourly, OrgUsage15m, ScopeUsage15m, UsageEvent
from tests.factories import event_payload, ingest

ROLLUPS = (OrgUsage15m, ScopeUsage15m)


def _rollup_snapshot() -> list:
    """Every roll-up row with every measure, to compare before and after."""
    snapshot = []
    for model in (*ROLLUPS, LatencyHistogramHourly):
        snapshot.append(sorted(tuple(row.values()) for row in model.objects.values()))
    return snapshot


def _event_snapshot() -> list:
    return sorted(
        tuple(v for k, v in row.items() if k != "id") for row in UsageEvent.objects.values()
    )


def test_a_batch_sent_twice_is_stored_once(post_events, make_event):
    events = [make_event(input_tokens=10 * i, output_tokens=i) for i in range(1, 21)]
    first = post_events(events)
    events_after_first, rollups_after_first = _event_snapshot(), _rollup_snapshot()

    second = post_events(events)

    assert first.json() == {"accepted": 20, "duplicates": 0, "rejected": []}
    assert second.status_code == 200
    assert second.json() == {"accepted": 0, "duplicates": 20, "rejected": []}
    assert _event_snapshot() == events_after_first
    assert _rollup_snapshot() == rollups_after_first
    assert OrgUsage15m.objects.aggregate(n=Sum("requests"))["n"] == 20


def test_duplicate_request_id_changes_nothing(post_events, make_event, member_token):
    original = make_event(request_id="r-1", model="gpt-4o", input_tokens=100, output_tokens=10)
    post_events([original])
    events_before, rollups_before = _event_snapshot(), _rollup_snapshot()
    changed = make_event(
        request_id="r-1",
        model="claude-opus-4-1",
        input_tokens=999_999,
        output_tokens=5,
        status_code=500,
        cost_usd="12.5",
        team="platform",
        user="someone.else@example.test",
        metadata={"retry": True},
    )

    response = post_events([changed], token=member_token)

    assert response.json() == {"accepted": 0, "duplicates": 1, "rejected": []}
    assert _event_snapshot() == events_before
    assert _rollup_snapshot() == rollups_before


def test_a_request_id_repeated_inside_one_batch_is_stored_once(post_events, make_event):
    first = make_event(request_id="same", input_tokens=1)
    second = make_event(request_id="same", input_tokens=2)

    response = post_events([first, second, make_event(request_id="other")])

    assert response.json() == {"accepted": 2, "duplicates": 1, "rejected": []}
    assert UsageEvent.objects.get(request_id="same").input_tokens == 1
    assert OrgUsage15m.objects.aggregate(n=Sum("requests"))["n"] == 2


def test_a_retry_with_new_events_stores_only_the_new_ones(post_events, make_event):
    old = [make_event() for _ in range(3)]
    post_events(old)

    response = post_events([*old, make_event(), make_event()])

    assert response.json() == {"accepted": 2, "duplicates": 3, "rejected": []}
    assert UsageEvent.objects.count() == 5


def test_the_same_request_id_in_two_organizations_is_two_events(
    post_events, make_event, outsider_token
):
    post_events([make_event(request_id="shared-id")])

    response = post_events([make_event(request_id="shared-id")], token=outsider_token)

    assert response.json()["accepted"] == 1
    assert UsageEvent.objects.filter(request_id="shared-id").count() == 2


def test_reingesting_through_the_service_is_a_no_op(org, service_token):
    when = datetime(2026, 6, 1, 12, 7, 30, tzinfo=UTC)
    events = [
        event_payload(timestamp=when + timedelta(minutes=7 * i), latency_ms=100 + i)
        for i in range(50)
    ]
    ingest(org, events, token=service_token)
    before = _rollup_snapshot()

    again = ingest(org, list(reversed(events)), token=service_token)

    assert (again.accepted, again.duplicates) == (0, 50)
    assert _rollup_snapshot() == before
    day = int(datetime(2026, 6, 1, tzinfo=UTC).timestamp())
    assert reconcile_day(org.id, day) == []


def test_a_failure_while_counting_leaves_nothing_half_stored(org, service_token, monkeypatch):
    # The budget step runs last, after the events, roll-ups and spend counters were
    # written (on PostgreSQL all in one statement): failing there must undo them all.
    def broken_budgets(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("metering.ingest.budgets_after_ingest", broken_budgets)

    with pytest.raises(RuntimeError):
        ingest(org, [event_payload(user="brand.new@example.test") for _ in range(5)])

    assert not UsageEvent.objects.exists()
    assert not OrgUsage15m.objects.exists()
    assert not ScopeUsage15m.objects.exists()
    assert not User.objects.filter(email="brand.new@example.test").exists()
    monkeypatch.undo()
    retried = ingest(org, [event_payload(request_id="after")], token=service_token)
    assert retried.accepted == 1
