"""The bulk load path (metering/bulk.py): COPY + INSERT ... SELECT + SQL roll-ups.

It must leave exactly what `ingest_batch` leaves: the same event rows, the same roll-up
rows (check_aggregates clean), the same budget spend counters; duplicates change nothing.
PostgreSQL only (COPY); the tests skip on SQLite.
"""

import random
from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

from metering.aggregates import LATENCY_BUCKET_SQL, ROLLUPS, latency_bucket, reconcile_day
from metering.bulk import bulk_load, count_days, load_chunk, loaded_days, rows_from_events
from metering.models import (
    BudgetSpend15m,
    LatencyHistogramHourly,
    OrgUsage15m,
    ScopeUsage15m,
    UsageEvent,
)
from metering.viewers import VIEWER_TABLES, build_organization
from tests.factories import event_payload, ingest

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _postgresql_only(db):
    if connection.vendor != "postgresql":
        pytest.skip("bulk loading uses PostgreSQL COPY")


def _events(n: int, *, seed: int = 1, prefix: str = "bulk") -> list[dict]:
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(microsecond=0)
    models = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "acme-unpriced-model"]
    out = []
    for i in range(n):
        model = rng.choice(models)
        out.append(
            event_payload(
                request_id=f"{prefix}-{i:06d}",
                timestamp=now - timedelta(seconds=rng.randrange(3 * 86400)),
                model=model,
                operation="embedding" if "embedding" in model else "chat",
                input_tokens=rng.randrange(1, 5000),
                output_tokens=0 if "embedding" in model else rng.randrange(0, 800),
                latency_ms=rng.choice([0, 1, 2, 3, rng.randrange(4, 60_000)]),
                status_code=rng.choice([200, 200, 200, 429, 500]),
                user=rng.choice(["member@example.test", "lead@example.test", None]),
                assistant=rng.choice(["", "Helper"]) or None,
                workflow=rng.choice(["", "", "triage"]) or None,
                team=rng.choice(["platform", "research", None]),
            )
        )
    return out


def _load(personas, events, token=None, chunk_size=97):
    prepared = rows_from_events(
        organization=personas.org, token=token, events=events, now=datetime.now(UTC)
    )
    assert not prepared.rejected
    return bulk_load(prepared.rows, chunk_size=chunk_size)


def _days(org_id: int) -> list[int]:
    first = min(OrgUsage15m.objects.filter(organization_id=org_id).values_list("bucket", flat=True))
    start = first - first % 86400
    return list(range(start, start + 5 * 86400, 86400))


def _snapshot() -> list:
    out = []
    for model in (OrgUsage15m, ScopeUsage15m, LatencyHistogramHourly, BudgetSpend15m):
        out.append(sorted(tuple(row.values()) for row in model.objects.values()))
    out.append(
        sorted(
            tuple(v for k, v in row.items() if k not in ("id", "ingested_at"))
            for row in UsageEvent.objects.values()
        )
    )
    return out


def test_bulk_loaded_events_reconcile(personas):
    result = _load(personas, _events(600), token=personas.member_token)
    assert (result.rows, result.inserted, result.duplicates) == (600, 600, 0)
    assert result.chunks == 7
    assert UsageEvent.objects.count() == 600
    for day in _days(personas.org.id):
        assert reconcile_day(personas.org.id, day) == []
    call_command("check_aggregates", stdout=StringIO())  # exits 1 on any mismatch


def test_bulk_equals_ingest_batch(personas):
    events = _events(300, seed=7)
    ingest(personas.org, events, token=personas.service_token)
    by_ingest = _snapshot()
    UsageEvent.objects.all().delete()
    for model in (OrgUsage15m, ScopeUsage15m, LatencyHistogramHourly, BudgetSpend15m):
        model.objects.all().delete()
    _load(personas, events, token=personas.service_token)
    assert _snapshot() == by_ingest


def test_duplicates_change_nothing(personas):
    events = _events(250, seed=3)
    _load(personas, events)
    before = _snapshot()
    again = _load(personas, events, chunk_size=1000)
    assert (again.inserted, again.duplicates) == (0, 250)
    repeated = rows_from_events(
        organization=personas.org, token=None, events=events[:50] * 2, now=datetime.now(UTC)
    )
    assert (len(repeated.rows), repeated.duplicates) == (50, 50)
    # The same rows twice in one chunk: the first is the one stored (already here).
    assert bulk_load(repeated.rows * 2).duplicates == 100
    assert _snapshot() == before
    # Half old, half new: only the new half is counted.
    mixed = _load(personas, events[:100] + _events(100, seed=4, prefix="new"))
    assert (mixed.inserted, mixed.duplicates) == (100, 100)
    for day in _days(personas.org.id):
        assert reconcile_day(personas.org.id, day) == []


def _counted_tables() -> list:
    return [r.model for r in ROLLUPS] + [BudgetSpend15m, *VIEWER_TABLES]


def _every_rollup() -> dict:
    return {
        model.__name__: sorted(tuple(row.values()) for row in model.objects.values())
        for model in _counted_tables()
    }


def test_counting_days_after_the_load_equals_counting_each_chunk(personas):
    build_organization(personas.org.id)  # viewer roll-ups kept: counted both ways too
    events = _events(500, seed=11)
    _load(personas, events, token=personas.member_token)
    by_chunk = _every_rollup()
    UsageEvent.objects.all().delete()
    for model in _counted_tables():
        model.objects.all().delete()
    prepared = rows_from_events(
        organization=personas.org,
        token=personas.member_token,
        events=events,
        now=datetime.now(UTC),
    )
    assert load_chunk(prepared.rows[:200], count=False) == 200
    assert load_chunk(prepared.rows, count=False) == 300  # the first 200 are duplicates
    assert all(rows == [] for rows in _every_rollup().values())  # stored, not counted
    days = loaded_days()
    assert {org for org, _ in days} == {personas.org.id}
    assert len(days) in (3, 4)  # three days back from now, cut at UTC midnights
    assert count_days(days) == len(days)
    assert _every_rollup() == by_chunk
    assert all(_every_rollup()[model.__name__] for model in VIEWER_TABLES)
    for _, day in days:
        assert reconcile_day(personas.org.id, day) == []


def test_latency_bucket_sql_equals_python(db):
    values = list(range(0, 100_001))
    # Around every bucket boundary (where rounding would show) and up to the maximum.
    edge = 1.0
    while edge < 2**31:
        base = int(edge)
        values += [base - 1, base, base + 1]
        edge *= 1.04
    values += [2**31 - 1, 10**6, 10**9]
    values = sorted({v for v in values if v >= 0})
    sql = LATENCY_BUCKET_SQL.format(col="v")
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT v, {sql} FROM unnest(%s::bigint[]) AS v", [values])
        got = dict(cursor.fetchall())
    wrong = [(v, got[v], latency_bucket(v)) for v in values if got[v] != latency_bucket(v)]
    assert wrong == []
