"""Bulk loading for PostgreSQL: COPY into a staging table, insert the new events, and
count exactly those in every roll-up, with SQL, in one transaction per chunk.

`ingest_batch` stays the one path for live traffic (HTTP, importer, adapters). This path
is for loading millions of already-validated events (the benchmark, `import_events
--bulk`): rows are built with ingest's own validation and pricing (`rows_from_events`),
then `bulk_load` writes them chunk by chunk:

1. COPY the chunk into a temporary staging table (psycopg 3 `cursor.copy`);
2. `INSERT INTO metering_usageevent SELECT ... FROM staging ORDER BY (org, request_id)
   ON CONFLICT (organization_id, request_id) DO NOTHING RETURNING ...` into a second
   temporary table: the rows really inserted (a duplicate changes nothing);
3. every roll-up (`aggregates.ROLLUPS`: usage by 15 min / hour / day, actors by hour /
   day, the latency histograms) and the budget spend counters (BudgetSpend15m) get `INSERT ... SELECT ... GROUP BY ... ORDER BY key
   ON CONFLICT DO UPDATE SET x = x + EXCLUDED.x` from those rows only, keys in sorted
   order (concurrent loaders and live ingestion lock rows in the same order).

The SQL computes the same keys as `metering.aggregates.compute_rollups` (15-minute,
hourly and daily buckets from the UTC epoch, missing ids as 0, the log-latency bucket of
`aggregates.latency_bucket`), so `manage.py check_aggregates` stays clean.

Events of an organization with resource pools must go through `ingest_batch` (pool
categories depend on the order of consumption); `bulk_load` refuses them.
"""

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import connection, transaction

from .aggregates import (
    ACTOR_KEYS,
    ACTOR_MEASURES,
    FACT_FIELDS,
    HIST_KEYS,
    LATENCY_GAMMA,
    MEASURES,
    ORG_KEYS,
    SCOPE_HIST_KEYS,
    SCOPE_KEYS,
)
from .ingest import (
    EVENT_COLUMNS,
    CleanEvent,
    Rejection,
    _price,
    _resolve,
    _row,
    validate_event,
)
from .models import (
    BUCKET_SECONDS,
    DAY_SECONDS,
    HOUR_SECONDS,
    BudgetSpend15m,
    CostSource,
    LatencyHistogramDaily,
    LatencyHistogramHourly,
    LatencyHistogramScopeDaily,
    OrgActorDaily,
    OrgActorHourly,
    OrgUsage15m,
    OrgUsageDaily,
    OrgUsageHourly,
    Pool,
    ScopeUsage15m,
    ScopeUsageDaily,
    UsageEvent,
)
from .pricing import PriceBook

DEFAULT_CHUNK = 50_000

# SQL twin of aggregates.latency_bucket: ceil(ln(ms) / ln(gamma) - 1e-9), 0 up to 1 ms.
# float8 ln() is the C library's log(), like Python's math.log, so the two agree exactly
# (tests/metering/test_bulk.py compares them over every value up to 10^6 and beyond).
LATENCY_BUCKET_SQL = (
    "CASE WHEN {col} <= 1 THEN 0 "
    f"ELSE ceil(ln(({{col}})::float8) / ln({LATENCY_GAMMA}::float8) - 1e-9)::int END"
)
_EPOCH_SQL = "floor(extract(epoch FROM {col}))::bigint"

# The columns of the inserted-rows table (and of RETURNING): what the roll-ups need.
_NEW_COLUMNS = FACT_FIELDS


@dataclass
class BulkResult:
    rows: int = 0
    inserted: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    chunks: int = 0

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


@dataclass
class PreparedRows:
    """Rows ready for `bulk_load` (EVENT_COLUMNS order), and the events refused."""

    rows: list[tuple] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    duplicates: int = 0


def event_row(event: CleanEvent, organization_id: int, token_id: int | None, now) -> tuple:
    """One validated, resolved and priced event as a row in EVENT_COLUMNS order."""
    return _row(event, organization_id, token_id, now)


def rows_from_events(*, organization, token, events: list[Any], now: datetime) -> PreparedRows:
    """Validate, resolve and price raw events exactly as `ingest_batch` does (same
    functions), without storing them. The first event of a repeated request id wins."""
    out = PreparedRows()
    clean: dict[str, CleanEvent] = {}
    for index, raw in enumerate(events):
        checked = validate_event(raw, index, now)
        if isinstance(checked, Rejection):
            out.rejected.append(checked)
        elif checked.request_id in clean:
            out.duplicates += 1
        else:
            clean[checked.request_id] = checked
    candidates = [clean[key] for key in sorted(clean)]
    if candidates:
        out.rejected.extend(_resolve(candidates, organization, token))
    token_id = token.id if token is not None else None
    out.rows = [event_row(e, organization.id, token_id, now) for e in candidates]
    return out


class Resolved:
    """Cheap resolution for generated events whose people already exist (the benchmark):
    the same attribution rules as ingest._resolve (token owner, token defaults, then the
    membership's team/project), computed once per (organization, token)."""

    def __init__(self, organization, token, users: dict[str, int], defaults: dict[int, tuple]):
        self.organization, self.token = organization, token
        self.users, self.defaults = users, defaults
        self.book = PriceBook(organization.id, _all_models(organization.id))

    def row(self, raw: dict, now: datetime) -> tuple | None:
        event = validate_event(raw, 0, now)
        if isinstance(event, Rejection):
            return None
        token = self.token
        event.user_id = self.users.get(event.user_email) if event.user_email else None
        if (
            event.user_id is None
            and token is not None
            and token.owner_id
            and not token.service_account
        ):
            event.user_id = token.owner_id
        team, project = self.defaults.get(event.user_id, (None, None))
        event.team_id = (token.default_team_id if token else None) or team
        event.project_id = (token.default_project_id if token else None) or project
        _price(event, self.book)
        return event_row(event, self.organization.id, token.id if token else None, now)


def _all_models(organization_id: int) -> set[str]:
    from .models import Price

    return set(Price.objects.values_list("model", flat=True))


# ---------------------------------------------------------------------------------------
# Loading


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def _prepare_session(cursor) -> None:
    """Temporary tables of this connection, emptied: staging (the event columns) and the
    rows a chunk really inserted. TRUNCATE, not ON COMMIT: a chunk inside an outer
    transaction (tests) must not see the previous chunk's rows."""
    event_table = _q(UsageEvent._meta.db_table)
    cursor.execute(
        "CREATE TEMP TABLE IF NOT EXISTS bulk_staging AS "
        f"SELECT {', '.join(_q(c) for c in EVENT_COLUMNS)} FROM {event_table} WITH NO DATA"
    )
    cursor.execute(
        "CREATE TEMP TABLE IF NOT EXISTS bulk_new AS "
        f"SELECT {', '.join(_q(c) for c in _NEW_COLUMNS)} FROM {event_table} WITH NO DATA"
    )
    cursor.execute("TRUNCATE bulk_staging, bulk_new")


def _rollup_sql() -> list[str]:
    epoch = _EPOCH_SQL.format(col='"timestamp"')
    bucket = f"({epoch} - {epoch} % {BUCKET_SECONDS})"
    hour = f"({epoch} - {epoch} % {HOUR_SECONDS})"
    day = f"({epoch} - {epoch} % {DAY_SECONDS})"
    measures = (
        "count(*), sum(input_tokens), sum(cached_input_tokens), sum(cache_write_tokens), "
        "sum(output_tokens), sum(reasoning_tokens), sum(quantity), sum(cost_nanos), "
        "sum(latency_ms), max(latency_ms), "
        f"count(*) FILTER (WHERE cost_source = '{CostSource.UNPRICED.value}')"
    )

    def upsert(table: str, keys: list[str], key_exprs: list[str], cols: tuple, values: str):
        update = ", ".join(
            f"{_q(m)} = GREATEST({table}.{_q(m)}, EXCLUDED.{_q(m)})"
            if m == "latency_ms_max"
            else f"{_q(m)} = {table}.{_q(m)} + EXCLUDED.{_q(m)}"
            for m in cols
        )
        n = len(keys)
        positions = ", ".join(str(i + 1) for i in range(n))
        return (
            f"INSERT INTO {table} ({', '.join(_q(k) for k in keys)}, "
            f"{', '.join(_q(m) for m in cols)}) "
            f"SELECT {', '.join(key_exprs)}, {values} FROM bulk_new "
            f"GROUP BY {positions} ORDER BY {positions} "
            f"ON CONFLICT ({', '.join(_q(k) for k in keys)}) DO UPDATE SET {update}"
        )

    def key_exprs(keys, time_expr):
        exprs = {"bucket": time_expr, "model": "model", "operation": "operation"}
        exprs |= {"status_code": "status_code", "assistant": "assistant", "workflow": "workflow"}
        exprs["organization_id"] = "organization_id"
        return [exprs.get(k, f"coalesce({k}, 0)") for k in keys]

    usage = [
        upsert(_q(model._meta.db_table), list(keys), key_exprs(keys, time_expr), MEASURES, measures)
        for model, keys, time_expr in (
            (OrgUsage15m, ORG_KEYS, bucket),
            (OrgUsageHourly, ORG_KEYS, hour),
            (OrgUsageDaily, ORG_KEYS, day),
            (ScopeUsage15m, SCOPE_KEYS, bucket),
            (ScopeUsageDaily, SCOPE_KEYS, day),
        )
    ]
    actor_values = f"{measures}, count(*) FILTER (WHERE status_code >= 400)"
    actors = [
        upsert(
            _q(model._meta.db_table),
            list(ACTOR_KEYS),
            key_exprs(ACTOR_KEYS, time_expr),
            ACTOR_MEASURES,
            actor_values,
        )
        for model, time_expr in ((OrgActorHourly, hour), (OrgActorDaily, day))
    ]
    hists = [
        upsert(
            _q(model._meta.db_table),
            list(HIST_KEYS),
            [
                "organization_id",
                time_expr,
                "operation",
                LATENCY_BUCKET_SQL.format(col="latency_ms"),
            ],
            ("count",),
            "count(*)",
        )
        for model, time_expr in ((LatencyHistogramHourly, hour), (LatencyHistogramDaily, day))
    ]
    scope_hist = upsert(
        _q(LatencyHistogramScopeDaily._meta.db_table),
        list(SCOPE_HIST_KEYS),
        [
            "organization_id",
            day,
            "coalesce(team_id, 0)",
            "coalesce(project_id, 0)",
            "coalesce(api_token_id, 0)",
            "coalesce(user_id, 0)",
            "operation",
            LATENCY_BUCKET_SQL.format(col="latency_ms"),
        ],
        ("count",),
        "count(*)",
    )
    spend_table = _q(BudgetSpend15m._meta.db_table)
    subjects = " UNION ALL ".join(
        f"SELECT organization_id, '{subject}' AS subject, {column} AS subject_id, "
        f"{bucket} AS bucket, cost_nanos FROM bulk_new WHERE cost_nanos <> 0"
        + (f" AND {column} IS NOT NULL" if column != "organization_id" else "")
        for subject, column in (
            ("org", "organization_id"),
            ("user", "user_id"),
            ("team", "team_id"),
            ("project", "project_id"),
            ("token", "api_token_id"),
        )
    )
    spend = (
        f"INSERT INTO {spend_table} (organization_id, subject, subject_id, bucket, cost_nanos) "
        f"SELECT organization_id, subject, subject_id, bucket, sum(cost_nanos) FROM ({subjects}) s "
        "GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 "
        "ON CONFLICT (organization_id, subject, subject_id, bucket) "
        f"DO UPDATE SET cost_nanos = {spend_table}.cost_nanos + EXCLUDED.cost_nanos"
    )
    return [*usage, *actors, *hists, scope_hist, spend]


def _insert_sql() -> str:
    table = _q(UsageEvent._meta.db_table)
    columns = ", ".join(_q(c) for c in EVENT_COLUMNS)
    returning = ", ".join(_q(c) for c in _NEW_COLUMNS)
    return (
        f"WITH ins AS (INSERT INTO {table} ({columns}) "
        f"SELECT {columns} FROM bulk_staging ORDER BY organization_id, request_id "
        "ON CONFLICT (organization_id, request_id) DO NOTHING "
        f"RETURNING {returning}) "
        f"INSERT INTO bulk_new ({returning}) SELECT {returning} FROM ins"
    )


def _check_no_pools(org_ids: set[int]) -> None:
    pooled = set(
        Pool.objects.filter(organization_id__in=org_ids).values_list("organization_id", flat=True)
    )
    if pooled:
        raise ValueError(
            f"Organizations {sorted(pooled)} have resource pools: load their events with "
            "ingest_batch (pool categories depend on the order of consumption)."
        )


def load_chunk(rows: list[tuple]) -> int:
    """Load one chunk in one transaction; returns how many rows were new."""
    if not rows:
        return 0
    if connection.vendor != "postgresql":
        raise NotImplementedError("bulk loading needs PostgreSQL (use ingest_batch)")
    _check_no_pools({r[0] for r in rows})
    columns = ", ".join(_q(c) for c in EVENT_COLUMNS)
    with transaction.atomic(), connection.cursor() as cursor:
        _prepare_session(cursor)
        raw = cursor.cursor  # the psycopg 3 cursor under Django's wrapper
        with raw.copy(f"COPY bulk_staging ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cursor.execute(_insert_sql())
        inserted = cursor.rowcount
        if inserted:
            for sql in _rollup_sql():
                cursor.execute(sql)
        cursor.execute("TRUNCATE bulk_staging, bulk_new")
    return max(inserted, 0)


def _chunks(rows: Iterable[tuple], size: int) -> Iterator[list[tuple]]:
    chunk: list[tuple] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def bulk_load(
    rows: Iterable[tuple],
    *,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Callable[[BulkResult], None] | None = None,
) -> BulkResult:
    """Load rows (EVENT_COLUMNS order, validated and priced) chunk by chunk."""
    result = BulkResult()
    started = time.monotonic()
    for chunk in _chunks(rows, chunk_size):
        inserted = load_chunk(chunk)
        result.rows += len(chunk)
        result.inserted += inserted
        result.duplicates += len(chunk) - inserted
        result.chunks += 1
        result.seconds = time.monotonic() - started
        if progress:
            progress(result)
    result.seconds = time.monotonic() - started
    return result
