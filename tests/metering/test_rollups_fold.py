"""Deferred roll-ups (ROLLUPS_DEFERRED, PostgreSQL): ingestion stores the events, counts
their spend and lists them as pending; a fold counts them in every roll-up, once. Reads
stay exact without a worker: every reader folds what its scope reaches first, and sees
nothing more than before.

Tests run inside a transaction, so the fold that ingestion schedules after commit does
not run unless a test runs the commit callbacks itself.
"""

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.db.models import Count, Sum

from metering.aggregates import (
    DAY_SECONDS,
    pending_orgs,
    rebuild_day,
    reconcile_day,
    rollups_fold,
)
from metering.models import (
    BudgetSpend15m,
    OrgUsage15m,
    RollupPending,
    ScopeUsage15m,
    UsageEvent,
    ViewerUsageDaily,
)
from metering.viewers import WHOLE_ORGANIZATION, build_organization, reconcile_range
from tests.conftest import bearer
from tests.factories import event_payload, ingest
from tests.services import REDIS_URL, celery_worker, redis_up, wait_for

pytestmark = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="deferred roll-ups are a PostgreSQL path"
)

T0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)


@pytest.fixture
def deferred(settings):
    settings.ROLLUPS_DEFERRED = True


def _batch(personas, n: int = 40, prefix: str = "fold") -> list[dict]:
    return [
        event_payload(
            request_id=f"{prefix}-{i}",
            timestamp=T0 + timedelta(minutes=i),
            model=("gpt-4o", "gpt-4o-mini")[i % 2],
            input_tokens=100 + i,
            output_tokens=10 + i,
            latency_ms=50 + 7 * i,
            user=personas.member.email if i % 3 else None,
            team="platform" if i % 2 else None,
        )
        for i in range(n)
    ]


def _raw(org) -> dict:
    return UsageEvent.objects.filter(organization=org).aggregate(
        requests=Count("id"), input_tokens=Sum("input_tokens"), cost_nanos=Sum("cost_nanos")
    )


def _rolled(model, org) -> dict:
    return model.objects.filter(organization=org).aggregate(
        requests=Sum("requests"), input_tokens=Sum("input_tokens"), cost_nanos=Sum("cost_nanos")
    )


def _usage_requests(client, **headers) -> int:
    start = int(T0.timestamp()) - 3600
    answer = client.get(
        "/api/v1/usage",
        {"start_time": start, "end_time": start + 86400, "bucket_width": "1d"},
        **headers,
    )
    assert answer.status_code == 200, answer.content
    return sum(r["num_model_requests"] for b in answer.json()["data"] for r in b["results"])


def test_ingest_lists_the_new_events_and_counts_their_spend_at_once(personas, deferred):
    result = ingest(personas.org, _batch(personas))

    assert result.accepted == 40
    assert RollupPending.objects.filter(organization=personas.org).count() == 40
    assert OrgUsage15m.objects.filter(organization=personas.org).count() == 0
    spend = BudgetSpend15m.objects.filter(organization=personas.org, subject="org")
    assert spend.aggregate(s=Sum("cost_nanos"))["s"] == _raw(personas.org)["cost_nanos"]

    again = ingest(personas.org, _batch(personas))  # duplicates list nothing
    assert (again.accepted, again.duplicates) == (0, 40)
    assert RollupPending.objects.count() == 40


def test_a_signed_in_reader_folds_first_and_sees_every_event(client, personas, deferred):
    ingest(personas.org, _batch(personas))
    client.force_login(personas.org_admin)

    assert _usage_requests(client) == 40
    assert RollupPending.objects.count() == 0
    for model in (OrgUsage15m, ScopeUsage15m):
        assert _rolled(model, personas.org) == _raw(personas.org)
    day = int(T0.timestamp()) // DAY_SECONDS * DAY_SECONDS
    for d in {day, day + DAY_SECONDS}:
        assert reconcile_day(personas.org.id, d) == []


def test_a_token_without_owner_folds_its_organization(client, personas, deferred):
    ingest(personas.org, _batch(personas))

    assert _usage_requests(client, **bearer(personas.service_token)) == 40
    assert RollupPending.objects.count() == 0


def test_a_reader_of_another_organization_folds_and_sees_nothing_of_it(client, personas, deferred):
    ingest(personas.org, _batch(personas))
    client.force_login(personas.outsider)

    assert _usage_requests(client) == 0
    assert RollupPending.objects.filter(organization=personas.org).count() == 40


def test_the_fold_scheduled_after_commit_empties_the_list(
    personas, deferred, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        ingest(personas.org, _batch(personas))

    assert len(callbacks) >= 1
    assert RollupPending.objects.count() == 0
    assert _rolled(OrgUsage15m, personas.org) == _raw(personas.org)


def test_a_second_fold_counts_nothing_twice(personas, deferred):
    ingest(personas.org, _batch(personas, 30, "one"))
    assert rollups_fold([personas.org.id]) == 30
    ingest(personas.org, _batch(personas, 20, "two"))

    assert rollups_fold([personas.org.id]) == 20
    assert rollups_fold() == 0
    assert _rolled(ScopeUsage15m, personas.org) == _raw(personas.org)


def test_check_and_rebuild_leave_pending_events_to_their_fold(personas, deferred):
    ingest(personas.org, _batch(personas, 30, "folded"))
    rollups_fold()
    ingest(personas.org, _batch(personas, 20, "waiting"))
    day = int(T0.timestamp()) // DAY_SECONDS * DAY_SECONDS
    days = {day, day + DAY_SECONDS}

    assert all(reconcile_day(personas.org.id, d) == [] for d in days)  # pending: not drift
    for d in days:
        rebuild_day(personas.org.id, d)
    assert RollupPending.objects.count() == 20  # the rebuild did not count them
    spend = BudgetSpend15m.objects.filter(organization=personas.org, subject="org")
    assert spend.aggregate(s=Sum("cost_nanos"))["s"] == _raw(personas.org)["cost_nanos"]

    assert rollups_fold() == 20
    assert _rolled(OrgUsage15m, personas.org) == _raw(personas.org)
    assert all(reconcile_day(personas.org.id, d) == [] for d in days)


def test_events_removed_before_their_fold_are_skipped(personas, deferred):
    ingest(personas.org, _batch(personas))
    UsageEvent.objects.filter(request_id__in=["fold-0", "fold-1"]).delete()

    assert rollups_fold() == 38
    assert RollupPending.objects.count() == 0
    assert _rolled(OrgUsage15m, personas.org) == _raw(personas.org)


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_folds_the_batches_of_a_window_at_once(personas, settings, tmp_path):
    if not redis_up():
        pytest.skip(f"no Redis at {REDIS_URL}")
    settings.ROLLUPS_DEFERRED = True
    settings.ROLLUPS_FOLD_WAIT_SECONDS = 5  # wide enough for the three batches below
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
    with celery_worker(tmp_path, "fold") as (worker, log):
        for n in range(3):
            ingest(personas.org, _batch(personas, 25, f"worker-{n}"))
        wait_for(lambda: not RollupPending.objects.exists(), worker, log)
    assert UsageEvent.objects.filter(organization=personas.org).count() == 75
    for model in (OrgUsage15m, ScopeUsage15m):
        assert _rolled(model, personas.org) == _raw(personas.org)
    # One fold for the three batches: the first scheduled it, the others were inside
    # its window.
    assert log.read_text().count("Task metering.rollups_fold[") == 2, log.read_text()[-3000:]


def test_a_fold_counts_the_events_for_every_viewer_who_sees_them(personas, deferred):
    build_organization(personas.org.id)
    ingest(personas.org, _batch(personas), token=personas.member_token)
    start = int(T0.timestamp()) - 86400
    viewer_rows = ViewerUsageDaily.objects.filter(organization=personas.org)
    assert not viewer_rows.exists()  # listed, not counted yet

    assert rollups_fold([personas.org.id]) == 40
    # The member (sender of some, owner of the token), the team lead (platform) and the
    # whole organization.
    assert set(viewer_rows.values_list("viewer_id", flat=True)) == {
        WHOLE_ORGANIZATION,
        personas.member.id,
        personas.team_lead.id,
    }
    assert reconcile_range(personas.org.id, start, start + 3 * 86400) == []
    day = int(T0.timestamp()) // DAY_SECONDS * DAY_SECONDS
    assert reconcile_day(personas.org.id, day) == []


def test_pending_orgs_names_only_the_organizations_with_events_listed(personas, deferred):
    ingest(personas.org, _batch(personas))
    other = personas.other_org.id

    assert pending_orgs([personas.org.id, other]) == [personas.org.id]
    assert pending_orgs([other]) == []
    assert pending_orgs(None) == [personas.org.id]
    rollups_fold([personas.org.id])
    assert pending_orgs([personas.org.id, other]) == []
