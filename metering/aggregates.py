"""Roll-up maintenance: increments at ingest, and a full recomputation to check them.

Three roll-ups, each chosen for the widgets and filters it can serve (see
docs/architecture.md):

- OrgUsage15m: org x 15 min x model x operation x status (org-wide widgets),
- ScopeUsage15m: the same plus team, project, user, token, assistant, workflow
  (scoped viewers and scope filters),
- LatencyHistogramHourly: org x hour x operation x log-latency bucket (org-wide p95),
- LatencyHistogramScopeDaily: org x UTC day x team x project x token x operation x
  log-latency bucket (p95 for team, project and token scopes and filters).

Increments are upserts `ON CONFLICT ... DO UPDATE SET x = x + EXCLUDED.x`, sent in
key order so that concurrent writers lock rows in the same order.
"""

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from django.db import connection

from .models import (
    BUCKET_SECONDS,
    DAY_SECONDS,
    HOUR_SECONDS,
    CostSource,
    LatencyHistogramHourly,
    LatencyHistogramScopeDaily,
    OrgUsage15m,
    ScopeUsage15m,
)

# Latency histogram: bucket i holds latencies in (GAMMA^(i-1), GAMMA^i] ms, bucket 0 holds
# 0-1 ms. Reporting the bucket's geometric middle keeps p95 within (GAMMA-1)/(GAMMA+1),
# about 2 %, of the exact value.
LATENCY_GAMMA = 1.04
_LOG_GAMMA = math.log(LATENCY_GAMMA)

MEASURES = (
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "quantity",
    "cost_nanos",
    "latency_ms_sum",
    "latency_ms_max",
    "unpriced_requests",
)
_MAX_MEASURES = {"latency_ms_max"}

ORG_KEYS = ("organization_id", "bucket", "model", "operation", "status_code")
SCOPE_KEYS = (
    "organization_id",
    "bucket",
    "team_id",
    "project_id",
    "user_id",
    "api_token_id",
    "model",
    "operation",
    "status_code",
    "assistant",
    "workflow",
)
HIST_KEYS = ("organization_id", "bucket", "operation", "latency_bucket")
SCOPE_HIST_KEYS = (
    "organization_id",
    "bucket",
    "team_id",
    "project_id",
    "api_token_id",
    "operation",
    "latency_bucket",
)


def latency_bucket(latency_ms: int) -> int:
    if latency_ms <= 1:
        return 0
    return math.ceil(math.log(latency_ms) / _LOG_GAMMA - 1e-9)


def latency_bucket_value(index: int) -> float:
    """The representative latency (ms) of a histogram bucket."""
    if index <= 0:
        return 1.0 if index == 0 else 0.0
    return 2 * LATENCY_GAMMA**index / (LATENCY_GAMMA + 1)


def epoch(ts) -> int:
    return int(ts.timestamp())


@dataclass(frozen=True)
class EventFacts:
    """What the roll-ups need of one event (an ingested event or a raw row)."""

    timestamp: object
    organization_id: int
    team_id: int | None
    project_id: int | None
    user_id: int | None
    api_token_id: int | None
    model: str
    operation: str
    status_code: int
    assistant: str
    workflow: str
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    quantity: int
    cost_nanos: int
    latency_ms: int
    cost_source: str


def _measures(f: EventFacts) -> tuple:
    return (
        1,
        f.input_tokens,
        f.cached_input_tokens,
        f.cache_write_tokens,
        f.output_tokens,
        f.reasoning_tokens,
        f.quantity,
        f.cost_nanos,
        f.latency_ms,
        f.latency_ms,
        1 if f.cost_source == CostSource.UNPRICED else 0,
    )


def _add(acc: list[int], values: tuple) -> None:
    for i, value in enumerate(values):
        if MEASURES[i] in _MAX_MEASURES:
            acc[i] = max(acc[i], value)
        else:
            acc[i] += value


def compute_rollups(facts: Iterable[EventFacts]) -> tuple[dict, dict, dict, dict]:
    """Group events into the roll-ups' rows: {key tuple: measures or count}."""
    org_rows: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(MEASURES))
    scope_rows: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(MEASURES))
    hist_rows: dict[tuple, int] = defaultdict(int)
    scope_hist_rows: dict[tuple, int] = defaultdict(int)
    for f in facts:
        ts = epoch(f.timestamp)
        bucket = ts - ts % BUCKET_SECONDS
        values = _measures(f)
        _add(org_rows[(f.organization_id, bucket, f.model, f.operation, f.status_code)], values)
        scope_key = (
            f.organization_id,
            bucket,
            f.team_id or 0,
            f.project_id or 0,
            f.user_id or 0,
            f.api_token_id or 0,
            f.model,
            f.operation,
            f.status_code,
            f.assistant,
            f.workflow,
        )
        _add(scope_rows[scope_key], values)
        hour = ts - ts % HOUR_SECONDS
        lb = latency_bucket(f.latency_ms)
        hist_rows[(f.organization_id, hour, f.operation, lb)] += 1
        day = ts - ts % DAY_SECONDS
        scope_hist_key = (
            f.organization_id,
            day,
            f.team_id or 0,
            f.project_id or 0,
            f.api_token_id or 0,
            f.operation,
            lb,
        )
        scope_hist_rows[scope_hist_key] += 1
    return org_rows, scope_rows, hist_rows, scope_hist_rows


def _upsert(table: str, keys: tuple, measures: tuple, rows: list[tuple]) -> None:
    if not rows:
        return
    quote = connection.ops.quote_name
    greatest = "MAX" if connection.vendor == "sqlite" else "GREATEST"
    columns = keys + measures
    updates = ", ".join(
        f"{quote(m)} = {greatest}({quote(table)}.{quote(m)}, EXCLUDED.{quote(m)})"
        if m in _MAX_MEASURES
        else f"{quote(m)} = {quote(table)}.{quote(m)} + EXCLUDED.{quote(m)}"
        for m in measures
    )
    placeholders = "(" + ", ".join(["%s"] * len(columns)) + ")"
    chunk_size = max(1, 30000 // len(columns))
    column_list = ", ".join(quote(c) for c in columns)
    conflict = f" ON CONFLICT ({', '.join(quote(k) for k in keys)}) DO UPDATE SET {updates}"
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # Pipelined single-row upserts, still in key order (see write_rollups).
            cursor.cursor.executemany(
                f"INSERT INTO {quote(table)} ({column_list}) VALUES {placeholders}{conflict}", rows
            )
            return
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start : start + chunk_size]
            sql = (
                f"INSERT INTO {quote(table)} ({', '.join(quote(c) for c in columns)}) VALUES "
                + ", ".join([placeholders] * len(chunk))
                + f" ON CONFLICT ({', '.join(quote(k) for k in keys)}) DO UPDATE SET {updates}"
            )
            cursor.execute(sql, [v for row in chunk for v in row])


def write_rollups(org_rows: dict, scope_rows: dict, hist_rows: dict, scope_hist_rows: dict) -> None:
    """Add grouped rows to the roll-up tables, in key order (no deadlocks)."""
    _upsert(
        OrgUsage15m._meta.db_table,
        ORG_KEYS,
        MEASURES,
        [key + tuple(values) for key, values in sorted(org_rows.items())],
    )
    _upsert(
        ScopeUsage15m._meta.db_table,
        SCOPE_KEYS,
        MEASURES,
        [key + tuple(values) for key, values in sorted(scope_rows.items())],
    )
    _upsert(
        LatencyHistogramHourly._meta.db_table,
        HIST_KEYS,
        ("count",),
        [(*key, count) for key, count in sorted(hist_rows.items())],
    )
    _upsert(
        LatencyHistogramScopeDaily._meta.db_table,
        SCOPE_HIST_KEYS,
        ("count",),
        [(*key, count) for key, count in sorted(scope_hist_rows.items())],
    )


def rollups_add(organization_id: int, token_id: int | None, events) -> None:
    """Count freshly inserted events (ingest.CleanEvent) in every roll-up."""
    facts = (
        EventFacts(
            timestamp=e.timestamp,
            organization_id=organization_id,
            team_id=e.team_id,
            project_id=e.project_id,
            user_id=e.user_id,
            api_token_id=token_id,
            model=e.model,
            operation=e.operation,
            status_code=e.status_code,
            assistant=e.labels["assistant"],
            workflow=e.labels["workflow"],
            input_tokens=e.input_tokens,
            cached_input_tokens=e.cached_input_tokens,
            cache_write_tokens=e.cache_write_tokens,
            output_tokens=e.output_tokens,
            reasoning_tokens=e.reasoning_tokens,
            quantity=e.quantity,
            cost_nanos=e.cost_nanos,
            latency_ms=e.latency_ms,
            cost_source=e.cost_source,
        )
        for e in events
    )
    write_rollups(*compute_rollups(facts))


# ---------------------------------------------------------------------------------------
# Reconciliation


FACT_FIELDS = (
    "timestamp",
    "organization_id",
    "team_id",
    "project_id",
    "user_id",
    "api_token_id",
    "model",
    "operation",
    "status_code",
    "assistant",
    "workflow",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "quantity",
    "cost_nanos",
    "latency_ms",
    "cost_source",
)


def _stored(model, keys: tuple, measures: tuple, org_id: int, start: int, end: int) -> dict:
    rows = model.objects.filter(organization_id=org_id, bucket__gte=start, bucket__lt=end)
    out = {}
    for row in rows.values_list(*keys, *measures).iterator(chunk_size=5000):
        out[tuple(row[: len(keys)])] = list(row[len(keys) :])
    return out


def _diff(name: str, expected: dict, stored: dict, normalise=lambda v: v) -> list[str]:
    problems = []
    for key in sorted(set(expected) | set(stored), key=repr):
        want = normalise(expected.get(key))
        have = stored.get(key)
        if want != have:
            problems.append(f"{name} {key}: raw events give {want}, roll-up has {have}")
    return problems


def reconcile_day(org_id: int, day_start: int) -> list[str]:
    """Recompute one organization's roll-ups for one UTC day from raw events and compare."""
    from datetime import UTC, datetime

    from .models import UsageEvent

    day_end = day_start + DAY_SECONDS
    events = UsageEvent.objects.filter(
        organization_id=org_id,
        timestamp__gte=datetime.fromtimestamp(day_start, UTC),
        timestamp__lt=datetime.fromtimestamp(day_end, UTC),
    ).values_list(*FACT_FIELDS)
    facts = (EventFacts(*row) for row in events.iterator(chunk_size=5000))
    org_rows, scope_rows, hist_rows, scope_hist_rows = compute_rollups(facts)
    as_list = lambda v: list(v) if v is not None else None  # noqa: E731
    problems = _diff(
        "org roll-up",
        org_rows,
        _stored(OrgUsage15m, ORG_KEYS, MEASURES, org_id, day_start, day_end),
        as_list,
    )
    problems += _diff(
        "scope roll-up",
        scope_rows,
        _stored(ScopeUsage15m, SCOPE_KEYS, MEASURES, org_id, day_start, day_end),
        as_list,
    )
    stored_hist = {
        k: v[0]
        for k, v in _stored(
            LatencyHistogramHourly, HIST_KEYS, ("count",), org_id, day_start, day_end
        ).items()
    }
    problems += _diff("latency histogram", dict(hist_rows), stored_hist)
    stored_scope_hist = {
        k: v[0]
        for k, v in _stored(
            LatencyHistogramScopeDaily, SCOPE_HIST_KEYS, ("count",), org_id, day_start, day_end
        ).items()
    }
    problems += _diff("scope latency histogram", dict(scope_hist_rows), stored_scope_hist)
    return problems


def reconcile_days(org_id: int, since: int | None = None) -> tuple[list[int], list[str]]:
    """(UTC days to check, problems found outside them) for one organization.

    The days that either side has data for: a roll-up row in a day with no raw event is
    itself a mismatch, and empty days between sparse data (an old backfill) cost nothing.
    """
    from datetime import UTC, datetime

    from django.db.models import F

    from .models import UsageEvent

    days: set[int] = set()
    for model in (OrgUsage15m, ScopeUsage15m, LatencyHistogramHourly, LatencyHistogramScopeDaily):
        qs = model.objects.filter(organization_id=org_id)
        if since is not None:
            qs = qs.filter(bucket__gte=since)
        day_numbers = qs.annotate(day=F("bucket") / DAY_SECONDS).values_list("day", flat=True)
        days |= {d * DAY_SECONDS for d in day_numbers.distinct().order_by()}
    events = UsageEvent.objects.filter(organization_id=org_id)
    if since is not None:
        events = events.filter(timestamp__gte=datetime.fromtimestamp(since, UTC))
    days |= {epoch(d) for d in events.datetimes("timestamp", "day", tzinfo=UTC)}
    return sorted(days), []
