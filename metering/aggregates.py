"""Roll-up maintenance: increments at ingest, and a full recomputation to check them.

Roll-ups, each chosen for the widgets and filters it can serve (see
docs/architecture.md):

- OrgUsage15m / OrgUsageHourly / OrgUsageDaily: org x time x model x operation x status
  (org-wide widgets; a range reads its whole days, then hours, then quarters),
- ScopeUsage15m / ScopeUsageDaily: the same plus team, project, user, token, assistant,
  workflow (scoped viewers and scope filters),
- LatencyHistogramHourly / LatencyHistogramDaily: org x hour or day x operation x
  log-latency bucket (org-wide p95),
- LatencyHistogramScopeDaily: org x UTC day x team x project x token x user x operation
  x log-latency bucket (p95 for partial scopes and scope filters),
- LatencyHistogramModelDaily: org x UTC day x team x model x operation x log-latency
  bucket (p95 under a model filter, with or without a team filter),
- LatencyHistogramPartDaily: org x part (team, project, user or token) x UTC day x
  operation x log-latency bucket (p95 for partial scopes, by inclusion-exclusion),
- ScopeKeyDaily: org x UTC day x team x project x user x token (option lists of
  partial scopes),
- ScopeActorDaily: org x UTC day x team x project x user x token x operation x
  assistant x workflow (partial scopes and scope filters without a model or status:
  metrics, series, top users, ranked tokens, distinct users / assistants / workflows),
- OrgPeopleHourly / OrgPeopleDaily: org x hour or day x user x token (org-wide active
  users, top users, ranked tokens), and OrgLabelHourly / OrgLabelDaily: org x hour or
  day x assistant x workflow (org-wide active assistants and workflows).

Increments are upserts `ON CONFLICT ... DO UPDATE SET x = x + EXCLUDED.x`, sent in
key order so that concurrent writers lock rows in the same order. On PostgreSQL live
ingestion lists its new events in RollupPending and `rollups_fold` counts them (a worker
right after the batch, or the next reader first): one fold of many batches upserts each
roll-up row once, where every batch would have upserted it again.
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
    BudgetSpend15m,
    CostSource,
    HistogramPart,
    LatencyHistogramDaily,
    LatencyHistogramHourly,
    LatencyHistogramModelDaily,
    LatencyHistogramPartDaily,
    LatencyHistogramScopeDaily,
    OrgLabelDaily,
    OrgLabelHourly,
    OrgPeopleDaily,
    OrgPeopleHourly,
    OrgUsage15m,
    OrgUsageDaily,
    OrgUsageHourly,
    RollupPending,
    ScopeActorDaily,
    ScopeKeyDaily,
    ScopeUsage15m,
    ScopeUsageDaily,
)
from .viewers import rebuild_range, reconcile_range, table_keys, viewer_maps, viewer_rollup_sql
from .viewers import viewer_rollups as _viewer_rollups

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
PEOPLE_KEYS = ("organization_id", "bucket", "user_id", "api_token_id")
LABEL_KEYS = ("organization_id", "bucket", "assistant", "workflow")
# The roll-ups of who (people, scope actors, viewer actors) have no status column, so
# they count failed requests themselves.
ACTOR_MEASURES = (*MEASURES, "failed_requests")
HIST_KEYS = ("organization_id", "bucket", "operation", "latency_bucket")
SCOPE_KEY_KEYS = ("organization_id", "bucket", "team_id", "project_id", "user_id", "api_token_id")
SCOPE_ACTOR_KEYS = (*SCOPE_KEY_KEYS, "operation", "assistant", "workflow")
MODEL_HIST_KEYS = ("organization_id", "bucket", "team_id", "model", "operation", "latency_bucket")
PART_HIST_KEYS = ("organization_id", "part", "part_id", "bucket", "operation", "latency_bucket")
# (part, event column) of the part histogram: every column of the visibility predicate.
HIST_PARTS = (
    (HistogramPart.TEAM.value, "team_id"),
    (HistogramPart.PROJECT.value, "project_id"),
    (HistogramPart.USER.value, "user_id"),
    (HistogramPart.TOKEN.value, "api_token_id"),
)
SCOPE_HIST_KEYS = (
    "organization_id",
    "bucket",
    "team_id",
    "project_id",
    "api_token_id",
    "user_id",
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


# Positions of the max-measures: the same in MEASURES and ACTOR_MEASURES (which only adds
# a column at the end), and never position 0 (a histogram row's one count).
_MAX_POSITIONS = frozenset(MEASURES.index(m) for m in _MAX_MEASURES)


def _add(acc: list[int], values) -> None:
    for i, value in enumerate(values):
        if i in _MAX_POSITIONS:
            acc[i] = max(acc[i], value)
        else:
            acc[i] += value


@dataclass(frozen=True)
class Rollup:
    """One roll-up table: its key columns and what it adds up."""

    model: type
    keys: tuple[str, ...]
    measures: tuple[str, ...]
    label: str


ROLLUPS = (
    Rollup(OrgUsage15m, ORG_KEYS, MEASURES, "org roll-up (15 min)"),
    Rollup(OrgUsageHourly, ORG_KEYS, MEASURES, "org roll-up (hour)"),
    Rollup(OrgUsageDaily, ORG_KEYS, MEASURES, "org roll-up (day)"),
    Rollup(ScopeUsage15m, SCOPE_KEYS, MEASURES, "scope roll-up (15 min)"),
    Rollup(ScopeUsageDaily, SCOPE_KEYS, MEASURES, "scope roll-up (day)"),
    Rollup(LatencyHistogramHourly, HIST_KEYS, ("count",), "latency histogram (hour)"),
    Rollup(LatencyHistogramDaily, HIST_KEYS, ("count",), "latency histogram (day)"),
    Rollup(LatencyHistogramScopeDaily, SCOPE_HIST_KEYS, ("count",), "scope latency histogram"),
    Rollup(LatencyHistogramModelDaily, MODEL_HIST_KEYS, ("count",), "model latency histogram"),
    Rollup(LatencyHistogramPartDaily, PART_HIST_KEYS, ("count",), "part latency histogram"),
    Rollup(ScopeKeyDaily, SCOPE_KEY_KEYS, ("requests",), "scope keys (day)"),
    Rollup(ScopeActorDaily, SCOPE_ACTOR_KEYS, ACTOR_MEASURES, "scope actor roll-up (day)"),
    Rollup(OrgPeopleHourly, PEOPLE_KEYS, ACTOR_MEASURES, "people roll-up (hour)"),
    Rollup(OrgPeopleDaily, PEOPLE_KEYS, ACTOR_MEASURES, "people roll-up (day)"),
    Rollup(OrgLabelHourly, LABEL_KEYS, ("requests",), "label roll-up (hour)"),
    Rollup(OrgLabelDaily, LABEL_KEYS, ("requests",), "label roll-up (day)"),
)


def _fold(rows: dict, grain: int) -> dict:
    """Rows of a finer grain summed into `grain` buckets (bucket is the key's 2nd column)."""
    out: dict[tuple, list[int]] = {}
    for key, values in rows.items():
        folded = (key[0], key[1] - key[1] % grain, *key[2:])
        if folded in out:
            _add(out[folded], values)
        else:
            out[folded] = list(values)
    return out


def compute_rollups(
    facts: Iterable[EventFacts], viewers: dict | None = None
) -> dict[type, dict[tuple, list[int]]]:
    """Group events into every roll-up's rows: {model: {key tuple: measures}}; with
    `viewers` ({organization id: viewers.ViewerMap}), the viewer roll-ups' rows too."""
    if viewers:
        facts = list(facts)
    org_rows: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(MEASURES))
    scope_rows: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(MEASURES))
    hist_rows: dict[tuple, list[int]] = defaultdict(lambda: [0])
    scope_hist_rows: dict[tuple, list[int]] = defaultdict(lambda: [0])
    people_rows: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(ACTOR_MEASURES))
    label_rows: dict[tuple, list[int]] = defaultdict(lambda: [0])
    model_hist_rows: dict[tuple, list[int]] = defaultdict(lambda: [0])
    part_hist_rows: dict[tuple, list[int]] = defaultdict(lambda: [0])
    scope_key_rows: dict[tuple, list[int]] = defaultdict(lambda: [0])
    scope_actor_rows: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(ACTOR_MEASURES))
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
        hist_rows[(f.organization_id, hour, f.operation, lb)][0] += 1
        day = ts - ts % DAY_SECONDS
        scope_hist_key = (
            f.organization_id,
            day,
            f.team_id or 0,
            f.project_id or 0,
            f.api_token_id or 0,
            f.user_id or 0,
            f.operation,
            lb,
        )
        scope_hist_rows[scope_hist_key][0] += 1
        model_hist_rows[(f.organization_id, day, f.team_id or 0, f.model, f.operation, lb)][0] += 1
        for part, column in HIST_PARTS:
            part_id = getattr(f, column)
            if part_id:
                part_hist_rows[(f.organization_id, part, part_id, day, f.operation, lb)][0] += 1
        scope_key_rows[scope_hist_key[:6]][0] += 1  # org, day, team, project, token, user
        failed = 1 if f.status_code >= 400 else 0
        org, _, team, project, token, user = scope_hist_key[:6]
        scope_actor = scope_actor_rows[
            (org, day, team, project, user, token, f.operation, f.assistant, f.workflow)
        ]
        _add(scope_actor, values)
        scope_actor[-1] += failed
        people = people_rows[(f.organization_id, hour, f.user_id or 0, f.api_token_id or 0)]
        _add(people, values)
        people[-1] += failed
        label_rows[(f.organization_id, hour, f.assistant, f.workflow)][0] += 1
    out = {
        OrgUsage15m: org_rows,
        OrgUsageHourly: _fold(org_rows, HOUR_SECONDS),
        OrgUsageDaily: _fold(org_rows, DAY_SECONDS),
        ScopeUsage15m: scope_rows,
        ScopeUsageDaily: _fold(scope_rows, DAY_SECONDS),
        LatencyHistogramHourly: hist_rows,
        LatencyHistogramDaily: _fold(hist_rows, DAY_SECONDS),
        LatencyHistogramScopeDaily: scope_hist_rows,
        LatencyHistogramModelDaily: model_hist_rows,
        LatencyHistogramPartDaily: part_hist_rows,
        ScopeKeyDaily: {
            (org, day, team, project, user, token): n
            for (org, day, team, project, token, user), n in scope_key_rows.items()
        },
        ScopeActorDaily: scope_actor_rows,
        OrgPeopleHourly: people_rows,
        OrgPeopleDaily: _fold(people_rows, DAY_SECONDS),
        OrgLabelHourly: label_rows,
        OrgLabelDaily: _fold(label_rows, DAY_SECONDS),
    }
    if viewers:
        out |= _viewer_rollups(facts, viewers, _measures)
    return out


def _upsert(model, keys: tuple, measures: tuple, rows: list[tuple]) -> None:
    """Multi-row VALUES upserts: the Python path (SQLite). PostgreSQL counts events in
    SQL from the inserted rows themselves (rollup_sql)."""
    if not rows:
        return
    table = model._meta.db_table
    quote = connection.ops.quote_name
    greatest = "MAX" if connection.vendor == "sqlite" else "GREATEST"
    columns = keys + measures
    updates = ", ".join(
        f"{quote(m)} = {greatest}({quote(table)}.{quote(m)}, EXCLUDED.{quote(m)})"
        if m in _MAX_MEASURES
        else f"{quote(m)} = {quote(table)}.{quote(m)} + EXCLUDED.{quote(m)}"
        for m in measures
    )
    column_list = ", ".join(quote(c) for c in columns)
    conflict = f" ON CONFLICT ({', '.join(quote(k) for k in keys)}) DO UPDATE SET {updates}"
    with connection.cursor() as cursor:
        placeholders = "(" + ", ".join(["%s"] * len(columns)) + ")"
        chunk_size = max(1, 30000 // len(columns))
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start : start + chunk_size]
            sql = (
                f"INSERT INTO {quote(table)} ({column_list}) VALUES "
                + ", ".join([placeholders] * len(chunk))
                + conflict
            )
            cursor.execute(sql, [v for row in chunk for v in row])


def write_rollups(rows: dict[type, dict[tuple, list[int]]]) -> None:
    """Add grouped rows to the roll-up tables (and the viewer roll-ups, when `rows` has
    them), in key order (no deadlocks)."""
    tables = [(r.model, r.keys, r.measures) for r in ROLLUPS] + list(table_keys())
    for model, keys, measures in tables:
        found = rows.get(model)
        if found:
            _upsert(model, keys, measures, [k + tuple(v) for k, v in sorted(found.items())])


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
    write_rollups(compute_rollups(facts, viewer_maps([organization_id])))


# ---------------------------------------------------------------------------------------
# The same roll-ups in SQL (PostgreSQL): live ingestion and the bulk path


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


# SQL twin of aggregates.latency_bucket: ceil(ln(ms) / ln(gamma) - 1e-9), 0 up to 1 ms.
# float8 ln() is the C library's log(), like Python's math.log, so the two agree exactly
# (tests/metering/test_bulk.py compares them over every value up to 10^6 and beyond).
LATENCY_BUCKET_SQL = (
    "CASE WHEN {col} <= 1 THEN 0 "
    f"ELSE ceil(ln(({{col}})::float8) / ln({LATENCY_GAMMA}::float8) - 1e-9)::int END"
)
_EPOCH_SQL = "floor(extract(epoch FROM {col}))::bigint"


def _update_clause(table: str, measures: tuple) -> str:
    """`x = x + EXCLUDED.x` (the greatest for maxima) for each measure of `table`."""
    return ", ".join(
        f"{_q(m)} = GREATEST({table}.{_q(m)}, EXCLUDED.{_q(m)})"
        if m in _MAX_MEASURES
        else f"{_q(m)} = {table}.{_q(m)} + EXCLUDED.{_q(m)}"
        for m in measures
    )


def upsert_select_sql(model, keys: tuple, measures: tuple, select: str) -> str:
    """INSERT the rows of `select` (the key columns, then the measures, one row per key,
    in key order) into `model`'s table, adding them to the rows already there."""
    table = _q(model._meta.db_table)
    return (
        f"INSERT INTO {table} ({', '.join(_q(k) for k in keys)}, "
        f"{', '.join(_q(m) for m in measures)}) {select} "
        f"ON CONFLICT ({', '.join(_q(k) for k in keys)}) "
        f"DO UPDATE SET {_update_clause(table, measures)}"
    )


def rollup_sql(source: str, *, spend: bool = True, viewers: bool = True) -> list[str]:
    """The SQL twin of `compute_rollups` + `write_rollups` (+ the budget spend counters
    unless `spend` is false): one `INSERT ... SELECT ... FROM source GROUP BY key ORDER
    BY key ON CONFLICT DO UPDATE SET x = x + EXCLUDED.x` per table, over the rows of
    `source` (a table or a WITH query holding FACT_FIELDS of freshly inserted events).
    PostgreSQL only."""
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

    def upsert(
        table: str, keys: list[str], key_exprs: list[str], cols: tuple, values: str, rows=source
    ):
        update = _update_clause(table, cols)
        n = len(keys)
        positions = ", ".join(str(i + 1) for i in range(n))
        return (
            f"INSERT INTO {table} ({', '.join(_q(k) for k in keys)}, "
            f"{', '.join(_q(m) for m in cols)}) "
            f"SELECT {', '.join(key_exprs)}, {values} FROM {rows} "
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
            list(keys),
            key_exprs(keys, time_expr),
            ACTOR_MEASURES,
            actor_values,
        )
        for model, keys, time_expr in (
            (OrgPeopleHourly, PEOPLE_KEYS, hour),
            (OrgPeopleDaily, PEOPLE_KEYS, day),
            (ScopeActorDaily, SCOPE_ACTOR_KEYS, day),
        )
    ]
    labels = [
        upsert(
            _q(model._meta.db_table),
            list(LABEL_KEYS),
            key_exprs(LABEL_KEYS, time_expr),
            ("requests",),
            "count(*)",
        )
        for model, time_expr in ((OrgLabelHourly, hour), (OrgLabelDaily, day))
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
    model_hist = upsert(
        _q(LatencyHistogramModelDaily._meta.db_table),
        list(MODEL_HIST_KEYS),
        [
            "organization_id",
            day,
            "coalesce(team_id, 0)",
            "model",
            "operation",
            LATENCY_BUCKET_SQL.format(col="latency_ms"),
        ],
        ("count",),
        "count(*)",
    )
    # One row per event and part (team, project, user, token) it has.
    parts = " UNION ALL ".join(
        f"SELECT organization_id, '{part}' AS part, {column} AS part_id, operation, "
        f'latency_ms, "timestamp" FROM {source} WHERE {column} IS NOT NULL'
        for part, column in HIST_PARTS
    )
    part_hist = upsert(
        _q(LatencyHistogramPartDaily._meta.db_table),
        list(PART_HIST_KEYS),
        [
            "organization_id",
            "part",
            "part_id",
            day,
            "operation",
            LATENCY_BUCKET_SQL.format(col="latency_ms"),
        ],
        ("count",),
        "count(*)",
        rows=f"({parts}) p",
    )
    scope_keys = upsert(
        _q(ScopeKeyDaily._meta.db_table),
        list(SCOPE_KEY_KEYS),
        key_exprs(SCOPE_KEY_KEYS, day),
        ("requests",),
        "count(*)",
    )
    counts = [*usage, *actors, *labels, *hists, scope_hist, model_hist, part_hist, scope_keys]
    if viewers:
        counts += viewer_rollup_sql(source)
    return [*counts, spend_sql(source)] if spend else counts


def spend_sql(source: str) -> str:
    """The budget spend counters' upsert over the rows of `source` (see rollup_sql)."""
    epoch = _EPOCH_SQL.format(col='"timestamp"')
    bucket = f"({epoch} - {epoch} % {BUCKET_SECONDS})"
    spend_table = _q(BudgetSpend15m._meta.db_table)
    subjects = " UNION ALL ".join(
        f"SELECT organization_id, '{subject}' AS subject, {column} AS subject_id, "
        f"{bucket} AS bucket, cost_nanos FROM {source} WHERE cost_nanos <> 0"
        + (f" AND {column} IS NOT NULL" if column != "organization_id" else "")
        for subject, column in (
            ("org", "organization_id"),
            ("user", "user_id"),
            ("team", "team_id"),
            ("project", "project_id"),
            ("token", "api_token_id"),
        )
    )
    return (
        f"INSERT INTO {spend_table} (organization_id, subject, subject_id, bucket, cost_nanos) "
        f"SELECT organization_id, subject, subject_id, bucket, sum(cost_nanos) FROM ({subjects}) s "
        "GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 "
        "ON CONFLICT (organization_id, subject, subject_id, bucket) "
        f"DO UPDATE SET cost_nanos = {spend_table}.cost_nanos + EXCLUDED.cost_nanos"
    )


# ---------------------------------------------------------------------------------------
# Folding what live ingestion listed as pending (PostgreSQL)

# pg_advisory_xact_lock(class, organization id): held by a fold, a rebuild and a check of
# one organization's roll-ups, so they never interleave.
_FOLD_LOCK_CLASS = 7270


def _lock_org(cursor, org_id: int) -> None:
    cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [_FOLD_LOCK_CLASS, int(org_id)])


def _not_pending(org_id: int, alias: str) -> str:
    """SQL condition: event `alias` of `org_id` is not listed as pending."""
    return (
        f"NOT EXISTS (SELECT 1 FROM {_q(RollupPending._meta.db_table)} p "
        f"WHERE p.organization_id = {int(org_id)} AND p.event_id = {alias}.id)"
    )


def fold_sql(org_id: int) -> str:
    """One statement: delete `org_id`'s pending rows and count their events in every
    roll-up (not the spend counters: ingestion counted those)."""
    from .models import UsageEvent

    org = int(org_id)
    events = _q(UsageEvent._meta.db_table)
    facts = ", ".join(f"e.{_q(c)}" for c in FACT_FIELDS)
    counted = ", ".join(f"r{i} AS ({sql})" for i, sql in enumerate(rollup_sql("src", spend=False)))
    return (
        f"WITH d AS (DELETE FROM {_q(RollupPending._meta.db_table)} "
        f"WHERE organization_id = {org} RETURNING event_id), "
        f"src AS (SELECT {facts} FROM {events} e JOIN d ON e.id = d.event_id "
        f"WHERE e.organization_id = {org}), {counted} "
        "SELECT count(*) FROM src"
    )


def pending_orgs(org_ids: Iterable[int] | None = None) -> list[int]:
    """Organizations (of `org_ids`, or all) with events not yet in the roll-ups."""
    if connection.vendor != "postgresql":
        return []
    table = _q(RollupPending._meta.db_table)
    with connection.cursor() as cursor:
        if org_ids is None:
            cursor.execute(f"SELECT DISTINCT organization_id FROM {table}")
        else:
            ids = sorted({int(i) for i in org_ids})
            if not ids:
                return []
            # One probe of the primary key per organization, never a scan of the list:
            # every read asks this, and a list folded and refilled thousands of times a
            # minute holds far more dead rows than live ones until it is vacuumed.
            cursor.execute(
                f"SELECT o FROM unnest(%s::bigint[]) AS o "
                f"WHERE EXISTS (SELECT 1 FROM {table} p WHERE p.organization_id = o)",
                [ids],
            )
        return sorted(row[0] for row in cursor.fetchall())


def rollups_fold(org_ids: Iterable[int] | None = None) -> int:
    """Count every pending event of `org_ids` (or of all organizations) in the roll-ups;
    returns how many. One transaction per organization, under its fold lock: a second
    fold waits for the first and then finds only what was listed since."""
    from django.db import transaction

    folded = 0
    for org_id in pending_orgs(org_ids):
        with transaction.atomic(), connection.cursor() as cursor:
            _lock_org(cursor, org_id)
            cursor.execute(fold_sql(org_id))
            folded += cursor.fetchone()[0]
    return folded


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

    from django.db import transaction
    from django.db.models import Exists, OuterRef

    from .models import UsageEvent

    day_end = day_start + DAY_SECONDS
    # Events still pending are not in the roll-ups yet: compare without them, with folds
    # of this organization held off until the comparison is done.
    pending = RollupPending.objects.filter(organization_id=org_id, event_id=OuterRef("id"))
    events = (
        UsageEvent.objects.filter(
            organization_id=org_id,
            timestamp__gte=datetime.fromtimestamp(day_start, UTC),
            timestamp__lt=datetime.fromtimestamp(day_end, UTC),
        )
        .exclude(Exists(pending))
        .values_list(*FACT_FIELDS)
    )
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                _lock_org(cursor, org_id)
        facts = (EventFacts(*row) for row in events.iterator(chunk_size=5000))
        expected = compute_rollups(facts)
        problems = []
        for rollup in ROLLUPS:
            stored = _stored(rollup.model, rollup.keys, rollup.measures, org_id, day_start, day_end)
            want = {key: list(values) for key, values in expected[rollup.model].items()}
            problems += _diff(rollup.label, want, stored)
        # The viewer roll-ups' local days overlapping this UTC day, from their own events.
        problems += reconcile_range(org_id, day_start, day_end)
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
    for rollup in ROLLUPS:
        qs = rollup.model.objects.filter(organization_id=org_id)
        if since is not None:
            qs = qs.filter(bucket__gte=since)
        day_numbers = qs.annotate(day=F("bucket") / DAY_SECONDS).values_list("day", flat=True)
        days |= {d * DAY_SECONDS for d in day_numbers.distinct().order_by()}
    events = UsageEvent.objects.filter(organization_id=org_id)
    if since is not None:
        events = events.filter(timestamp__gte=datetime.fromtimestamp(since, UTC))
    days |= {epoch(d) for d in events.datetimes("timestamp", "day", tzinfo=UTC)}
    return sorted(days), []


# ---------------------------------------------------------------------------------------
# Repair


def rebuild_day(org_id: int, day_start: int) -> None:
    """Recompute one organization's roll-ups and spend counters for one UTC day from its
    raw events (after check_aggregates found drift, or after events were removed).

    Every roll-up's buckets are a day or finer, so a UTC day's rows hold exactly that
    day's events: delete them and count the day again, in one transaction. Pool usage
    (PoolUsage15m, PoolCounter) is not recounted: how an event split between allocation
    and surplus depended on the events before it.
    """
    from datetime import UTC, datetime

    from django.db import transaction

    from .budgets import budget_spend_rebuild
    from .models import UsageEvent

    day_end = day_start + DAY_SECONDS
    start, end = (datetime.fromtimestamp(t, UTC) for t in (day_start, day_end))
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                _lock_org(cursor, org_id)
        for rollup in ROLLUPS:
            rollup.model.objects.filter(
                organization_id=org_id, bucket__gte=day_start, bucket__lt=day_end
            ).delete()
        events = UsageEvent.objects.filter(
            organization_id=org_id, timestamp__gte=start, timestamp__lt=end
        )
        # The viewer roll-ups by local day: every local day overlapping this UTC day,
        # recounted whole from its events.
        rebuild_range(org_id, day_start, day_end)
        if connection.vendor != "postgresql":
            facts = (EventFacts(*row) for row in events.values_list(*FACT_FIELDS).iterator())
            write_rollups(compute_rollups(facts))
            budget_spend_rebuild(organization_id=org_id, start=day_start, end=day_end)
            return
        BudgetSpend15m.objects.filter(
            organization_id=org_id, bucket__gte=day_start, bucket__lt=day_end
        ).delete()
        with connection.cursor() as cursor:
            for sql in count_day_sql(org_id, day_start, viewers=False):
                cursor.execute(sql)


def count_day_sql(
    org_id: int, day_start: int, *, pending: bool = True, viewers: bool = True
) -> list[str]:
    """The statements that count one organization's events of one UTC day into every
    roll-up and the spend counters, which must hold nothing of that day yet (PostgreSQL).

    The day's events are the source of the same SQL ingestion runs (all values are
    integers and instants computed here, never input). With `pending`, events still
    listed as pending are left to their fold (`rebuild_day` holds the organization's lock,
    so the fold waits); their spend was counted at ingest, so the spend counters take
    every event of the day. A bulk load that counts afterwards lists nothing: `pending=False`
    skips the check. The viewer roll-ups' local days straddle UTC days, so counting adds
    the day's events to them (a bulk load counts each day once); `viewers=False` leaves
    them to `viewers.rebuild_range`, which recounts their whole local days.
    """
    from datetime import UTC, datetime

    from .models import UsageEvent

    start, end = (datetime.fromtimestamp(t, UTC) for t in (day_start, day_start + DAY_SECONDS))
    table = _q(UsageEvent._meta.db_table)
    day = (
        f"SELECT * FROM {table} e WHERE organization_id = {int(org_id)} "
        f"AND \"timestamp\" >= '{start.isoformat()}' "
        f"AND \"timestamp\" < '{end.isoformat()}'"
    )
    counted = (
        f"({day} AND {_not_pending(org_id, 'e')}) AS day_events"
        if pending
        else f"({day}) AS day_events"
    )
    counts = rollup_sql(counted, spend=False, viewers=viewers)
    return [*counts, spend_sql(f"({day}) AS day_events")]
