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

from accounts.models import Organization

from .aggregates import DAY_SECONDS, FACT_FIELDS, count_day_sql, epoch, rollup_sql
from .ingest import (
    EVENT_COLUMNS,
    CleanEvent,
    Rejection,
    _price,
    _resolve,
    _row,
    validate_event,
)
from .models import Pool, UsageEvent
from .pricing import PriceBook

DEFAULT_CHUNK = 50_000

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


def _insert_sql(*, keep_new: bool = True) -> str:
    """Insert the staged rows; with `keep_new`, copy the rows really inserted (what the
    roll-ups need) into bulk_new."""
    table = _q(UsageEvent._meta.db_table)
    columns = ", ".join(_q(c) for c in EVENT_COLUMNS)
    insert = (
        f"INSERT INTO {table} ({columns}) "
        f"SELECT {columns} FROM bulk_staging ORDER BY organization_id, request_id "
        "ON CONFLICT (organization_id, request_id) DO NOTHING"
    )
    if not keep_new:
        return insert
    returning = ", ".join(_q(c) for c in _NEW_COLUMNS)
    return (
        f"WITH ins AS ({insert} RETURNING {returning}) "
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


def load_chunk(rows: list[tuple], *, count: bool = True) -> int:
    """Load one chunk in one transaction; returns how many rows were new.

    With `count=False` the events are stored and nothing else: the caller must then count
    every day it loaded with `count_days` before anyone reads (a first load into days that
    hold nothing yet, like the benchmark's, which counts each day once instead of touching
    every roll-up row with every chunk)."""
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
        cursor.execute(_insert_sql(keep_new=count))
        inserted = cursor.rowcount
        if inserted and count:
            for sql in rollup_sql("bulk_new"):
                cursor.execute(sql)
        cursor.execute("TRUNCATE bulk_staging, bulk_new")
    return max(inserted, 0)


def loaded_days() -> list[tuple[int, int]]:
    """(organization id, UTC day start) of every UTC day from each organization's first
    event to its last, in order: two index lookups per organization."""
    table = _q(UsageEvent._meta.db_table)
    out = []
    with connection.cursor() as cursor:
        for org_id in Organization.objects.order_by("id").values_list("id", flat=True):
            cursor.execute(
                f'SELECT min("timestamp"), max("timestamp") FROM {table} '
                "WHERE organization_id = %s",
                [org_id],
            )
            first, last = cursor.fetchone()
            if first is None:
                continue
            first, last = epoch(first), epoch(last)
            start = first - first % DAY_SECONDS
            out += [(org_id, day) for day in range(start, last + 1, DAY_SECONDS)]
    return out


def count_days(org_days: Iterable[tuple[int, int]]) -> int:
    """Count the events of each (organization, UTC day) into every roll-up and the spend
    counters, one transaction per day, after a `load_chunk(count=False)` load. The days
    must hold nothing in the roll-ups yet (use `aggregates.rebuild_day` for days that do).
    Days are independent: several processes may count disjoint days at once. Returns the
    number of days counted."""
    done = 0
    for org_id, day in org_days:
        with transaction.atomic(), connection.cursor() as cursor:
            for sql in count_day_sql(org_id, day, pending=False):
                cursor.execute(sql)
        done += 1
    return done


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
