"""Reads of usage totals: one engine that picks the cheapest exact source per question.

A question is a `Selection` (the viewer's scope plus filters and a time range) and a
grouping (dimensions and an optional time bucket width in a time zone). The answer is
exact whatever the source:

- the range's whole 15-minute buckets come from a roll-up: the narrow org one when the
  viewer sees whole organizations and no filter needs a scope dimension, else the wide
  one (narrowed by its per-dimension indexes);
- the partial buckets at either edge (under 15 minutes each) come from raw events;
- short ranges, and filters no roll-up has (session, end user), read raw events.

Local time buckets are computed in SQL from integer epochs, per stretch of constant UTC
offset, so days and hours are right across DST changes and in +05:30 / +05:45 zones.
"""

import heapq
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import combinations, pairwise
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.exceptions import EmptyResultSet, FullResultSet
from django.db import connection, connections
from django.db.models import (
    Aggregate,
    BigIntegerField,
    Case,
    CharField,
    Count,
    ExpressionWrapper,
    F,
    FloatField,
    Q,
    QuerySet,
    Sum,
    Value,
    When,
)
from django.db.models.expressions import RawSQL

from metering.aggregates import (
    HIST_PARTS,
    LATENCY_BUCKET_SQL,
    MEASURES,
    latency_bucket,
    latency_bucket_value,
)
from metering.models import (
    BUCKET_SECONDS,
    CostSource,
    LatencyHistogramDaily,
    LatencyHistogramHourly,
    LatencyHistogramModelDaily,
    LatencyHistogramPartDaily,
    LatencyHistogramScopeDaily,
    Operation,
    OrgLabelDaily,
    OrgLabelHourly,
    OrgPeopleDaily,
    OrgPeopleHourly,
    OrgUsage15m,
    OrgUsageDaily,
    OrgUsageHourly,
    ScopeActorDaily,
    ScopeUsage15m,
    ScopeUsageDaily,
    UsageEvent,
    ViewerActorDaily,
    ViewerActorHourly,
    ViewerHistogramDaily,
    ViewerUsageDaily,
    ViewerUsageHourly,
)
from metering.viewers import WHOLE_ORGANIZATION, local_day_start, viewer_rows_ready

from .visibility import Scope, rollup_scope_q, scope_columns, scope_disjoint_parts, scope_q

MINUTE, HOUR, DAY = 60, 3600, 86400
WIDTHS = {"1m": MINUTE, "1h": HOUR, "1d": DAY}
# Ranges up to this long are read from raw events (they are small and exact to the second).
RAW_RANGE_LIMIT = timedelta(hours=6)

# Dimensions a selection can group or filter by, with the column in each source.
NARROW_DIMS = {"organization_id", "model", "operation", "status_code"}
SCOPE_DIMS = NARROW_DIMS | {
    "team_id",
    "project_id",
    "user_id",
    "api_token_id",
    "assistant",
    "workflow",
}
# Who used it: what the people and label roll-ups group by (no model, operation or
# status column), and, for distinct counts, the two together.
PEOPLE_DIMS = {"organization_id", "user_id", "api_token_id"}
LABEL_DIMS = {"organization_id", "assistant", "workflow"}
ACTOR_DIMS = PEOPLE_DIMS | LABEL_DIMS
# What the scope actor roll-up groups by (every column of the gate; no model or status).
SCOPE_ACTOR_DIMS = ACTOR_DIMS | {"team_id", "project_id", "operation"}
RAW_ONLY_DIMS = {"end_user", "session_id"}


@dataclass(frozen=True)
class Selection:
    """What a reader may see and asked to see. Filters only narrow the scope."""

    scope: Scope
    start: datetime
    end: datetime
    org_ids: tuple[int, ...] = ()
    team_ids: tuple[int, ...] = ()
    project_ids: tuple[int, ...] = ()
    user_ids: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    models: tuple[str, ...] = ()
    operations: tuple[str, ...] = ()
    status: str = "all"  # all | ok | failed
    session_ids: tuple[str, ...] = ()
    end_users: tuple[str, ...] = ()

    def shifted_back(self) -> "Selection":
        """The previous period of the same length (for deltas)."""
        length = self.end - self.start
        return replace(self, start=self.start - length, end=self.start)

    @property
    def needs_raw(self) -> bool:
        return bool(self.session_ids or self.end_users)

    @property
    def needs_scope_dims(self) -> bool:
        return bool(self.team_ids or self.project_ids or self.user_ids or self.token_ids)


@dataclass
class Totals:
    """Summed measures of one group."""

    requests: int = 0
    failed_requests: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    quantity: int = 0
    cost_nanos: int = 0
    latency_ms_sum: int = 0
    unpriced_requests: int = 0

    # Every measure is a sum, so totals add and subtract exactly (a roll-up row that
    # straddles two chart buckets is counted in one and its other piece moved).
    def add(self, other: "Totals", sign: int = 1) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + sign * getattr(other, name))

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def latency_ms_avg(self) -> float | None:
        return self.latency_ms_sum / self.requests if self.requests else None

    @property
    def failure_rate(self) -> float | None:
        return self.failed_requests / self.requests if self.requests else None


@dataclass
class Grouped:
    """Totals per group key; a key is (time bucket or None, *dimension values)."""

    dims: tuple[str, ...]
    rows: dict[tuple, Totals] = field(default_factory=dict)

    def add(self, key: tuple, totals: Totals, sign: int = 1) -> None:
        if key in self.rows:
            self.rows[key].add(totals, sign)
        elif sign == 1:
            self.rows[key] = totals
        else:
            self.rows[key] = Totals()
            self.rows[key].add(totals, sign)

    def prune(self) -> None:
        """Drop groups left empty by moving pieces out of them."""
        self.rows = {key: t for key, t in self.rows.items() if t.requests}

    def total(self) -> Totals:
        out = Totals()
        for totals in self.rows.values():
            out.add(totals)
        return out


# ---------------------------------------------------------------------------------------
# Time buckets


def _offset_segments(tz: ZoneInfo, start: int, end: int) -> list[tuple[int, int]]:
    """[(from_epoch, utc_offset_seconds)] covering [start, end): where the offset changes."""
    segments: list[tuple[int, int]] = []
    step = 6 * HOUR
    t = start
    previous = None
    while t < end + step:
        offset = int(datetime.fromtimestamp(t, tz).utcoffset().total_seconds())
        if offset != previous:
            if previous is not None:
                # Find the exact change instant by bisection (to the 15-minute grain).
                lo, hi = t - step, t
                while hi - lo > BUCKET_SECONDS:
                    mid = (lo + hi) // 2
                    mid -= mid % BUCKET_SECONDS
                    if mid <= lo:
                        break
                    if int(datetime.fromtimestamp(mid, tz).utcoffset().total_seconds()) == previous:
                        lo = mid
                    else:
                        hi = mid
                segments.append((hi, offset))
            else:
                segments.append((start, offset))
            previous = offset
        t += step
    return segments


_OFFSETS: dict[tuple[str, int], int] = {}


@lru_cache(maxsize=65536)
def _local_day_start(tz: ZoneInfo, local_day: int) -> int:
    """UTC epoch of local midnight starting day number `local_day` in `tz`."""
    day = datetime(1970, 1, 1) + timedelta(days=local_day)
    return int(day.replace(tzinfo=tz).timestamp())


@dataclass(frozen=True)
class Bucketing:
    """Local time buckets of `width` seconds in zone `tz`.

    A bucket is identified by the UTC epoch of its start. Hours and minutes are real
    elapsed hours (a repeated DST hour is two buckets); days are local calendar days.
    """

    width: int
    tz: ZoneInfo

    def key_of(self, epoch: int) -> int:
        # UTC offsets change at most on the quarter hour: cache them per 15 minutes.
        quarter = epoch - epoch % BUCKET_SECONDS
        offset = _OFFSETS.get((self.tz.key, quarter))
        if offset is None:
            offset = int(datetime.fromtimestamp(quarter, self.tz).utcoffset().total_seconds())
            if len(_OFFSETS) > 200_000:
                _OFFSETS.clear()
            _OFFSETS[(self.tz.key, quarter)] = offset
        if self.width == DAY:
            local_day = (epoch + offset) // DAY
            return self._day_start(local_day)
        sub = offset % self.width
        return (epoch + sub) // self.width * self.width - sub

    def _day_start(self, local_day: int) -> int:
        return _local_day_start(self.tz, local_day)

    def expression(self, column: str, start: int, end: int):
        """SQL expression mapping an epoch column to a bucket id (see key_from_sql)."""
        whens = []
        segments = _offset_segments(self.tz, start, end)
        for i, (_seg_start, offset) in enumerate(segments):
            if self.width == DAY:
                value = ExpressionWrapper(
                    (F(column) + Value(offset)) / Value(DAY), output_field=BigIntegerField()
                )
            else:
                sub = offset % self.width
                value = ExpressionWrapper(
                    (F(column) + Value(sub)) / Value(self.width) * Value(self.width) - Value(sub),
                    output_field=BigIntegerField(),
                )
            if i + 1 < len(segments):
                whens.append(When(**{f"{column}__lt": segments[i + 1][0]}, then=value))
            else:
                default = value
        if not whens:
            return default
        return Case(*whens, default=default, output_field=BigIntegerField())

    def aligned(self, grain: int, start: int, end: int) -> bool:
        """True when every bucket boundary in [start, end) is a multiple of `grain` (a
        UTC hour or day), so rows of that grain fall wholly inside one bucket."""
        if self.width < grain or (self.width != DAY and self.width % grain):
            return False
        return all(offset % grain == 0 for _, offset in _offset_segments(self.tz, start, end))

    def key_from_sql(self, value: int) -> int:
        return self._day_start(value) if self.width == DAY else value

    def keys(self, start: int, end: int, limit: int | None = None) -> list[int]:
        """Every bucket start overlapping [start, end), in order (the first may begin
        before `start`); only the first `limit` when given."""
        keys = []
        key = self.key_of(start)
        while key < end and (limit is None or len(keys) < limit):
            keys.append(key)
            if self.width == DAY:
                local = datetime.fromtimestamp(key, self.tz).replace(tzinfo=None)
                key = int((local + timedelta(days=1)).replace(tzinfo=self.tz).timestamp())
                key = self.key_of(key)  # local midnight may not exist (rare DST at 00:00)
            else:
                key += self.width
        return keys


def auto_width(start: datetime, end: datetime) -> int:
    """1-minute buckets up to 3 hours, hourly up to 3 days, daily beyond."""
    length = end - start
    if length <= timedelta(hours=3):
        return MINUTE
    if length <= timedelta(days=3):
        return HOUR
    return DAY


# ---------------------------------------------------------------------------------------
# Sources


def _epoch(dt: datetime) -> int:
    return int(dt.timestamp())


def _ceil(epoch: int, grain: int) -> int:
    return -(-epoch // grain) * grain


def _reading_scope(sel: Selection) -> Scope:
    """The viewer's scope, reduced to what the selection can reach.

    When the viewer sees the whole of every selected organization (an org admin), "in my
    scope and in these organizations" is just "in these organizations": one predicate the
    planner can match to the (organization, ...) indexes, instead of an OR over every part
    of the scope (own events, own tokens) that would make it scan.
    """
    if not sel.scope.everything and sel.org_ids and _reads_whole(sel):
        return Scope(org_ids=frozenset(sel.org_ids))
    return sel.scope


def _reads_whole(sel: Selection) -> bool:
    """True when every row the filters reach is visible: the viewer sees the selected
    organizations whole, or filters on teams they lead or projects they administer (a
    team lead's "my team": all of the team's events, whoever sent them)."""
    if sel.scope.covers_whole_orgs(sel.org_ids):
        return True
    if sel.team_ids and set(sel.team_ids) <= sel.scope.team_ids:
        return True
    return bool(sel.project_ids) and set(sel.project_ids) <= sel.scope.project_ids


def _event_filters(sel: Selection) -> Q:
    q = scope_q(_reading_scope(sel))
    q &= _dimension_filters(sel)
    if sel.session_ids:
        q &= Q(session_id__in=sel.session_ids)
    if sel.end_users:
        q &= Q(end_user__in=sel.end_users)
    return q


def _latency_parts(sel: Selection) -> list[QuerySet]:
    """The selection's raw events as querysets no event is in twice, for latency counts
    added up across them: a partial scope part by part (`scope_disjoint_parts`), each
    read from its (organization, part, time) index alone, which carries the operation,
    the latency and the other scope columns; one queryset otherwise. Each part narrows
    the gated query, so it stays inside the gate; the OR alone would be a bitmap scan
    that visits the table's pages of every event in range."""
    gated = UsageEvent.objects.filter(_event_filters(sel))
    parts = scope_disjoint_parts(_reading_scope(sel))
    return [gated] if parts is None else [gated.filter(part) for part in parts]


def _dimension_filters(sel: Selection, *, organizations: bool = True) -> Q:
    """The selection's filters on roll-up columns; without the organizations when the
    caller has already written that condition as the gate."""
    q = Q()
    for column, values in (
        ("organization_id", sel.org_ids if organizations else ()),
        ("team_id", sel.team_ids),
        ("project_id", sel.project_ids),
        ("user_id", sel.user_ids),
        ("api_token_id", sel.token_ids),
        ("model", sel.models),
        ("operation", sel.operations),
    ):
        if values:
            q &= Q(**{f"{column}__in": values})
    if sel.status == "ok":
        q &= Q(status_code__lt=400)
    elif sel.status == "failed":
        q &= Q(status_code__gte=400)
    return q


def _rollup_aggregates(model, measures: tuple[str, ...] | None = None) -> dict:
    """The Totals sums of a roll-up table (only `measures` when given); failed requests
    from its failed_requests column where it has one (the actor roll-ups have no status
    column), else from the status. Tiers of one family may differ in this, so each read
    asks of its own table."""
    # Annotation names get a prefix: an aggregate named like a column ("requests") would
    # shadow that column in the failed_requests expression below.
    wanted = measures or tuple(Totals.__dataclass_fields__)
    aggs = {f"t_{m}": Sum(m) for m in MEASURES if m in wanted}
    if "failed_requests" not in wanted:
        return aggs
    if any(f.name == "failed_requests" for f in model._meta.concrete_fields):
        aggs["t_failed_requests"] = Sum("failed_requests")
        return aggs
    aggs["t_failed_requests"] = Sum(
        Case(When(status_code__gte=400, then=F("requests")), default=Value(0)),
        output_field=BigIntegerField(),
    )
    return aggs


def _aggregate_sql(model, measures: tuple[str, ...] | None = None) -> dict[str, str]:
    """`_rollup_aggregates` of `model` as SQL text, for reads written without the ORM's
    expressions (`_TierReads`): the same names, sums and failed-requests rule."""
    quote = connection.ops.quote_name
    table = quote(model._meta.db_table)
    wanted = measures or tuple(Totals.__dataclass_fields__)
    out = {f"t_{m}": f"SUM({table}.{quote(m)})" for m in MEASURES if m in wanted}
    if "failed_requests" not in wanted:
        return out
    if any(f.name == "failed_requests" for f in model._meta.concrete_fields):
        out["t_failed_requests"] = f"SUM({table}.{quote('failed_requests')})"
    else:
        out["t_failed_requests"] = (
            f"SUM(CASE WHEN {table}.{quote('status_code')} >= 400 "
            f"THEN {table}.{quote('requests')} ELSE 0 END)"
        )
    return out


# Plain lookups of `_NarrowRows` and their SQL operators.
_PLAIN_OPERATORS = {"exact": "=", "in": "IN", "gte": ">=", "gt": ">", "lt": "<", "lte": "<="}


class _NarrowRows:
    """Rows of an org-wide roll-up or histogram (no gate predicate but the organization)
    under plain lookups (`column`, `column__in`, `__gte`, `__gt`, `__lt`, `__lte`), read by
    `_select` with the WHERE written here. Those tables' reads only ever filter so, and
    the ORM's building and compiling of each read cost more than the read (a metrics
    widget makes two dozen). Only `_rollup_rows` and `_histogram_rows` make them, for a
    viewer who sees the whole organizations read (the gate's answer for those tables)."""

    def __init__(self, model, lookups: tuple[tuple[str, object], ...] = ()):
        self.model = model
        self.lookups = lookups

    def filter(self, *conditions: Q, **lookups) -> "_NarrowRows":
        found = list(self.lookups)
        for condition in conditions:
            found += _plain_lookups(condition)
        found += lookups.items()
        return _NarrowRows(self.model, tuple(found))

    def queryset(self) -> QuerySet:
        """The same rows as a queryset, for a read that needs the ORM (`models_seen`)."""
        return self.model.objects.filter(*(Q((key, value)) for key, value in self.lookups))

    def where(self) -> tuple[str, list] | None:
        """(" WHERE ..." or "", params), or None when a lookup matches nothing."""
        quote = connection.ops.quote_name
        table = quote(self.model._meta.db_table)
        columns = {f.attname: f.column for f in self.model._meta.concrete_fields}
        columns |= {f.name: f.column for f in self.model._meta.concrete_fields}
        parts, params = [], []
        for key, value in self.lookups:
            name, _, lookup = key.partition("__")
            operator = _PLAIN_OPERATORS[lookup or "exact"]
            column = f"{table}.{quote(columns[name])}"
            if operator == "IN":
                values = list(value)
                if not values:
                    return None
                parts.append(f"{column} IN ({', '.join(['%s'] * len(values))})")
                params += values
            else:
                parts.append(f"{column} {operator} %s")
                params.append(value)
        return (f" WHERE {' AND '.join(parts)}" if parts else ""), params


def _narrow_rows(model, sel: Selection) -> _NarrowRows:
    """An org-wide table's rows of the selected organizations. Callers use these tables
    only where the scope covers those organizations whole (`_narrow_ok`, `_hist_family`),
    so this one condition is both the gate and the filter."""
    rows = _NarrowRows(model)
    if not sel.scope.everything or sel.org_ids:
        rows = rows.filter(organization_id__in=sel.org_ids)
    return rows


def _plain_lookups(condition: Q) -> list[tuple[str, object]]:
    """The (lookup, value) pairs of a Q that only ANDs them (`_dimension_filters`)."""
    if condition.negated or (condition.connector != Q.AND and len(condition.children) > 1):
        raise ValueError("only ANDed plain lookups")
    out = []
    for child in condition.children:
        out += _plain_lookups(child) if isinstance(child, Q) else [child]
    return out


def _where_sql(qs: QuerySet):
    """(query, compiler, " WHERE ..." or "", params) of a filtered one-table queryset, by
    the ORM's own compiler (the gate's predicates included), or None when it matches no
    row. `_NarrowRows` write their own WHERE (query and compiler then serve only the
    select list's expressions)."""
    if isinstance(qs, _NarrowRows):
        found = qs.where()
        if found is None:
            return None
        query = qs.model._default_manager.all().query
        return query, _LazyCompiler(query), found[0], found[1]
    query = qs.query
    compiler = query.get_compiler(connection=connection)
    try:
        sql, params = compiler.compile(query.where)
    except EmptyResultSet:
        return None
    except FullResultSet:
        sql, params = "", []
    if sum(1 for n in query.alias_refcount.values() if n) > 1:  # pragma: no cover
        raise ValueError("a roll-up read with a join")  # roll-up reads never join
    return query, compiler, f" WHERE {sql}" if sql else "", list(params)


class _Sql(str):
    """A fragment of SQL written in this module (constants, never input), for `_select`."""


class _LazyCompiler:
    """A query's compiler made on first use: most selects have no expression to compile."""

    def __init__(self, query):
        self.query = query
        self.compiler = None

    def compile(self, node):
        if self.compiler is None:
            self.compiler = self.query.get_compiler(connection=connection)
        return self.compiler.compile(node)


def _select(qs: QuerySet, items, group=(), *, distinct: bool = False, also=None):
    """(sql, params) of `SELECT items FROM <qs's table> WHERE <qs's filters>` grouped by
    the items at `group` (1-based positions), or None when the filters match no row.

    The filters (the gate's predicates among them) are compiled by the ORM; the select
    list is written here. An item is (alias, spec): a column name, an `_Sql` fragment, or
    an expression the ORM compiles. Building it through annotate and values cost the ORM
    about ten times what it costs here, and a widget makes tens of such reads. `also`,
    (sql, params) or None, is one more condition ANDed to the filters."""
    found = _where_sql(qs)
    if found is None:
        return None
    query, compiler, where, params = found
    if also is not None:
        where = f"{where} AND {also[0]}" if where else f" WHERE {also[0]}"
        params = [*params, *also[1]]
    quote = connection.ops.quote_name
    table = quote(qs.model._meta.db_table)
    parts, item_params = [], []
    for alias, spec in items:
        if isinstance(spec, _Sql):
            sql, extra = str(spec), []
        elif isinstance(spec, str):
            sql, extra = f"{table}.{quote(spec)}", []
        else:
            sql, extra = compiler.compile(spec.resolve_expression(query, allow_joins=False))
        parts.append(f"{sql} AS {quote(alias)}")
        item_params += list(extra)
    text = f"SELECT {'DISTINCT ' if distinct else ''}{', '.join(parts)} FROM {table}{where}"
    if group:
        text += " GROUP BY " + ", ".join(str(i) for i in group)
    return text, [*item_params, *params]


def _union(branches) -> "_Statement":
    """One UNION ALL statement of `_select` results (those matching nothing left out)."""
    found = [b for b in branches if b is not None]
    return _Statement(
        " UNION ALL ".join(sql for sql, _ in found), [p for _, ps in found for p in ps]
    )


def _raw_aggregate_sql(measures: tuple[str, ...] | None = None) -> dict[str, _Sql]:
    """The Totals sums of raw events as SQL text over the events table, for `_select`
    (the same names as `_aggregate_sql`'s)."""
    quote = connection.ops.quote_name
    table = quote(UsageEvent._meta.db_table)

    def col(name: str) -> str:
        return f"{table}.{quote(name)}"

    sums = (
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "output_tokens",
        "reasoning_tokens",
        "quantity",
        "cost_nanos",
    )
    out = {
        "t_requests": "COUNT(*)",
        "t_failed_requests": f"SUM(CASE WHEN {col('status_code')} >= 400 THEN 1 ELSE 0 END)",
        **{f"t_{m}": f"SUM({col(m)})" for m in sums},
        "t_latency_ms_sum": f"SUM({col('latency_ms')})",
        "t_unpriced_requests": (
            f"SUM(CASE WHEN {col('cost_source')} = '{CostSource.UNPRICED.value}' THEN 1 ELSE 0 END)"
        ),
    }
    wanted = measures or tuple(Totals.__dataclass_fields__)
    return {name: _Sql(sql) for name, sql in out.items() if name[2:] in wanted}


def _minute_sql() -> _Sql:
    """The UTC minute of an event as epoch seconds."""
    column = f'{connection.ops.quote_name(UsageEvent._meta.db_table)}."timestamp"'
    if connection.vendor == "postgresql":
        return _Sql(f"(floor(extract(epoch FROM {column}))::bigint / 60 * 60)")
    return _Sql(f"(CAST(strftime('%%s', {column}) AS INTEGER) / 60 * 60)")


def _to_totals(row: dict) -> Totals:
    return Totals(**{name: int(row.get(f"t_{name}") or 0) for name in Totals.__dataclass_fields__})


# Each roll-up family from the coarsest grain to the finest: a range reads its whole UTC
# days, then whole hours, then quarters, then raw seconds at the two edges.
NARROW_TIERS = ((DAY, OrgUsageDaily), (HOUR, OrgUsageHourly), (BUCKET_SECONDS, OrgUsage15m))
PEOPLE_TIERS = ((DAY, OrgPeopleDaily), (HOUR, OrgPeopleHourly))
LABEL_TIERS = ((DAY, OrgLabelDaily), (HOUR, OrgLabelHourly))
WIDE_TIERS = ((DAY, ScopeUsageDaily), (BUCKET_SECONDS, ScopeUsage15m))
# Partial scopes without a model or status: whole days from the scope actor roll-up, the
# partial days at the edges from the wide 15-minute one (both behind the gate).
SCOPE_ACTOR_TIERS = ((DAY, ScopeActorDaily), (BUCKET_SECONDS, ScopeUsage15m))
FAMILIES = {
    "org": NARROW_TIERS,
    "people": PEOPLE_TIERS,
    "labels": LABEL_TIERS,
    "scope": WIDE_TIERS,
    "scope_actor": SCOPE_ACTOR_TIERS,
}
GATED_FAMILIES = {"scope", "scope_actor"}


def _whole_orgs(sel: Selection) -> bool:
    """No scope-dimension filter, and the viewer sees all of every selected organization."""
    return not sel.needs_scope_dims and sel.scope.covers_whole_orgs(sel.org_ids)


def _narrow_ok(sel: Selection, dims: tuple[str, ...]) -> bool:
    """The org-wide roll-up answers exactly: no scope dimension asked, whole orgs seen."""
    return set(dims) <= NARROW_DIMS and _whole_orgs(sel)


def _family(sel: Selection, dims: tuple[str, ...]) -> str:
    """The smallest roll-up family that answers `dims` of `sel` exactly: "org" (model,
    operation, status), "people" (who: user, token) or "labels" (assistant, workflow),
    for whole organizations without a model, operation or status filter ("actor": both,
    for distinct counts, which read each column from its own family), "scope_actor" (who
    and which operation inside a partial scope or under scope filters, without a model
    or status filter; behind the gate) or "scope" (every dimension, behind the gate)."""
    if _narrow_ok(sel, dims):
        return "org"
    plain = not (sel.models or sel.operations or sel.status != "all")
    if plain and set(dims) <= ACTOR_DIMS and _whole_orgs(sel):
        if set(dims) <= PEOPLE_DIMS:
            return "people"
        return "labels" if set(dims) <= LABEL_DIMS else "actor"
    if not (sel.models or sel.status != "all") and set(dims) <= SCOPE_ACTOR_DIMS:
        return "scope_actor"
    return "scope"


def _rollup_rows(sel: Selection, family: str, grain: int) -> "QuerySet | _NarrowRows":
    """The selection's rows of `family`'s roll-up of `grain`: the org-wide families only
    where the scope covers the whole selected organizations, else the wide one behind
    the gate."""
    model = dict(FAMILIES[family])[grain]
    if family not in GATED_FAMILIES:
        return _narrow_rows(model, sel).filter(_dimension_filters(sel, organizations=False))
    dims = _dimension_filters(sel)
    return model.objects.filter(rollup_scope_q(_reading_scope(sel))).filter(dims)


def rollup_source(sel: Selection, dims: tuple[str, ...], grain: int = BUCKET_SECONDS) -> QuerySet:
    """The narrow roll-up of `grain` when it can answer exactly, else the wide one."""
    family = "org" if _narrow_ok(sel, dims) and grain in dict(NARROW_TIERS) else "scope"
    rows = _rollup_rows(sel, family, grain)
    return rows.queryset() if isinstance(rows, _NarrowRows) else rows


def _plan_tiers(
    grains: tuple[int, ...], start: int, end: int, bucketing: Bucketing | None
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """Split [start, end) into roll-up reads [(grain, a, b)], coarsest first, and the raw
    ranges left at the edges. A grain is used only where its buckets never straddle a
    chart bucket (UTC days for UTC-day charts, hours in whole-hour zones)."""
    pending = [(start, end)]
    reads = []
    for grain in grains:
        if bucketing is not None and not bucketing.aligned(grain, start, end):
            continue
        left = []
        for a, b in pending:
            core_start, core_end = _ceil(a, grain), b - b % grain
            if core_start < core_end:
                reads.append((grain, core_start, core_end))
                left += [(a, core_start), (core_end, b)]
            else:
                left.append((a, b))
        pending = [(a, b) for a, b in left if a < b]
    return reads, pending


def _day_complements(
    grains: tuple[int, ...], reads: list[tuple[int, int, int]]
) -> list[tuple[int, int, int, int]]:
    """`_plan_tiers`' reads as [(grain, a, b, sign)], where a read of finer rows covering
    more than half of one UTC day becomes that day's row less the finer rows of the rest
    of the day: the same sums (a day's row is the sum of its hours and quarters) from
    fewer rows. Most ranges end now, late in today: today's hours so far are today's row
    less the current hour. Only for sums over the whole range, not per chart bucket."""
    if DAY not in grains:
        return [(grain, a, b, 1) for grain, a, b in reads]
    out = []
    for grain, a, b in reads:
        day = a - a % DAY
        if grain < DAY and b <= day + DAY and (b - a) * 2 > DAY:
            out.append((DAY, day, day + DAY, 1))
            out += [(grain, x, y, -1) for x, y in ((day, a), (b, day + DAY)) if x < y]
        else:
            out.append((grain, a, b, 1))
    return out


def _range_qs(ranges) -> list[Q]:
    """One `timestamp in [a, b)` predicate per non-empty epoch range.

    Each range is read by its own query: ORed time ranges would keep PostgreSQL from using
    the time column of the (org, scope column, time) indexes and scan the whole scope.
    """
    return [
        Q(
            timestamp__gte=datetime.fromtimestamp(a, UTC),
            timestamp__lt=datetime.fromtimestamp(b, UTC),
        )
        for a, b in ranges
        if a < b
    ]


def _raw_grouped_ranges(
    sel: Selection,
    ranges,
    dims: tuple[str, ...],
    bucketing: Bucketing | None,
    measures: tuple[str, ...] | None = None,
) -> Grouped:
    """Raw totals over several time ranges (the two edges of a range): one UNION ALL
    statement of one indexed query per range."""
    out = Grouped(dims)
    # With no dimension, group by the organization: a GROUP BY the sums do not depend on,
    # so every branch has the same columns (and an empty range gives no row).
    values = list(dims) or ["organization_id"]
    items = [(v, v) for v in values]
    if bucketing is not None:
        items.append(("_minute", _minute_sql()))
    group = range(1, len(items) + 1)
    items += list(_raw_aggregate_sql(measures).items())
    branches = [
        _select(UsageEvent.objects.filter(_event_filters(sel)).filter(in_range), items, group)
        for in_range in _range_qs(ranges)
    ]
    names = [alias for alias, _ in items]
    for found in _tuples(_union(branches)):
        row = dict(zip(names, found, strict=True))
        key_time = bucketing.key_of(int(row["_minute"])) if bucketing else None
        out.add((key_time, *(row[d] for d in dims)), _to_totals(row))
    return out


class _TierReads:
    """Roll-up reads of one family answered by one UNION ALL statement: each read is
    grouped by the dimensions and a time key of its own (`_k`), tagged with its place
    (`_part`), and its rows go to its own handler."""

    def __init__(self, dims: tuple[str, ...], measures: tuple[str, ...] | None = None):
        self.dims = dims
        self.measures = measures
        self.fields = list(dims) or ["organization_id"]
        self.names: list[str] = []  # the aggregates' names, the same for every table
        self.branches: list[QuerySet] = []
        self.handlers: list = []

    def add(self, qs: QuerySet, key, on_row) -> None:
        """One read: `qs` (a roll-up table, filtered) grouped by the dimensions and `key`
        (an expression of its columns, or None), summed by `_rollup_aggregates`. The
        filters are compiled by the ORM; the select list, written here, is the same for
        every read and costs the ORM more than the read costs the database."""
        self._add(qs, key, _aggregate_sql(qs.model, self.measures), on_row)

    def add_raw(self, sel: Selection, ranges, bucketing: Bucketing | None, grouped) -> None:
        """The raw events of `ranges` (the seconds at a range's edges) in the same
        statement, one indexed branch per range (`_raw_grouped_ranges`), added to
        `grouped` under the chart bucket of their UTC minute (None without `bucketing`)."""
        aggregates = _raw_aggregate_sql(self.measures)
        key = _minute_sql() if bucketing is not None else None

        def on_row(row, group, totals):
            at = bucketing.key_of(int(row["_k"])) if bucketing is not None else None
            grouped.add((at, *group), totals)

        for in_range in _range_qs(ranges):
            rows = UsageEvent.objects.filter(_event_filters(sel)).filter(in_range)
            self._add(rows, key, aggregates, on_row)

    def _add(self, qs, key, aggregates: dict, on_row) -> None:
        part = len(self.handlers)
        self.handlers.append(on_row)
        # One order for every branch of the UNION: the tables' sums and the raw ones.
        self.names = [f"t_{m}" for m in Totals.__dataclass_fields__ if f"t_{m}" in aggregates]
        items = [(f, f) for f in self.fields]
        items += [("_part", _Sql(str(part))), ("_k", key if key is not None else _Sql("0"))]
        items += [(name, _Sql(aggregates[name])) for name in self.names]
        group = [*range(1, len(self.fields) + 1), len(self.fields) + 2]
        self.branches.append(_select(qs, items, group))

    def run(self) -> None:
        if not self.branches:
            return
        union = _union(self.branches)
        names = [*self.fields, "_part", "_k", *self.names]
        for values in _tuples(union):
            row = dict(zip(names, values, strict=True))
            group = tuple(_rollup_value(d, row[d]) for d in self.dims)
            self.handlers[row["_part"]](row, group, _to_totals(row))


_memo: ContextVar[dict | None] = ContextVar("usage_query_memo", default=None)


@contextmanager
def shared_reads():
    """Within this block, the same question is asked of the database once.

    The full dashboard page renders several widgets over the same selection (requests,
    tokens, cost and latency all start from the same per-bucket totals).
    """
    token = _memo.set({})
    try:
        yield
    finally:
        _memo.reset(token)


# The side thread: one per process, with its own database connections (Django's are per
# thread), for a second independent read while the request's thread does the first.
_side: ThreadPoolExecutor | None = None
_side_pid = 0
_side_busy = threading.Lock()


def _side_thread() -> ThreadPoolExecutor:
    global _side, _side_pid
    if _side is None or _side_pid != os.getpid():  # none yet, or forked (gunicorn)
        _side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="side-read")
        _side_pid = os.getpid()
    return _side


def _tidy_side_connections() -> None:
    """What Django does around a request, for the side thread: drop a connection that
    broke or outlived CONN_MAX_AGE."""
    for conn in connections.all(initialized_only=True):
        conn.close_if_unusable_or_obsolete()


def _on_side(context, call):
    try:
        _tidy_side_connections()
        return context.run(call)
    finally:
        _tidy_side_connections()
        _side_busy.release()


def side_by_side[A, B](first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
    """(first(), second()) for two independent reads: on PostgreSQL the second runs on the
    side thread's own connection while this thread runs the first, so their statements
    overlap (the metrics bar's two periods). One after the other where that cannot help
    or would be wrong: SQLite, DASHBOARD_PARALLEL_READS off, the side thread busy with
    another request's read, or a transaction open here (another connection would not
    see its writes, nor share its snapshot). Both see the same `shared_reads` memo."""
    parallel = (
        settings.DASHBOARD_PARALLEL_READS
        and connection.vendor == "postgresql"
        and not connection.in_atomic_block
    )
    if not parallel or not _side_busy.acquire(blocking=False):
        return first(), second()
    try:
        future = _side_thread().submit(_on_side, copy_context(), second)
    except BaseException:
        _side_busy.release()
        raise
    try:
        a = first()
    except BaseException:
        future.exception()  # let it finish; this error is the one to report
        raise
    return a, future.result()


def close_side_connections() -> None:
    """Close the side thread's database connections (before a test database is dropped)."""
    if _side is not None and _side_pid == os.getpid():
        _side.submit(connections.close_all).result()


def grouped_totals(
    sel: Selection,
    dims: tuple[str, ...] = (),
    bucketing: Bucketing | None = None,
    measures: tuple[str, ...] | None = None,
) -> Grouped:
    """Exact totals of `sel`, grouped by `dims` and (optionally) local time buckets; only
    `measures` (Totals fields, the others left 0) when given: each sum costs the database
    a pass over every row read."""
    memo = _memo.get()
    if memo is None:
        return _grouped_totals(sel, dims, bucketing, measures)
    key = (sel, dims, bucketing, measures)
    if key not in memo:
        memo[key] = _grouped_totals(sel, dims, bucketing, measures)
    return memo[key]


def _grouped_totals(
    sel: Selection,
    dims: tuple[str, ...],
    bucketing: Bucketing | None,
    measures: tuple[str, ...] | None = None,
) -> Grouped:
    read = _viewer_read(sel, bucketing)
    viewer_table = _viewer_table(sel, dims) if read else None
    if viewer_table is not None:
        return _viewer_totals(sel, read, viewer_table, dims, bucketing, measures)
    start, end = _epoch(sel.start), _epoch(sel.end)
    raw_only = (
        sel.needs_raw
        or bool(set(dims) & RAW_ONLY_DIMS)
        or sel.end - sel.start <= RAW_RANGE_LIMIT
        or (bucketing is not None and bucketing.width < BUCKET_SECONDS)
    )
    family = _family(sel, dims)
    if family in ("people", "labels", "actor") and bucketing is not None:
        family = "scope"  # charts may need quarters, which only the wide family has
    elif family == "actor":
        family = "scope_actor"  # who and which label at once: only the distinct counts
    grains = tuple(dict(FAMILIES[family]))
    if raw_only:
        reads, raw_ranges = [], [(start, end)]
    else:
        reads, raw_ranges = _plan_tiers(grains, start, end, None)
    out = Grouped(dims)
    tiers = _TierReads(dims, measures)

    def rows(grain: int) -> QuerySet:
        return _rollup_rows(sel, family, grain)

    def at(key_of, sign: int = 1):
        return lambda row, group, totals: out.add((key_of(row), *group), totals, sign)

    tiers.add_raw(sel, raw_ranges, bucketing, out)  # the seconds at the edges
    if bucketing is None:
        for grain, a, b, sign in _day_complements(grains, reads):
            qs = rows(grain).filter(bucket__gte=a, bucket__lt=b)
            tiers.add(qs, None, at(lambda row: None, sign))
        reads = []
    for grain, a, b in reads:
        qs = rows(grain).filter(bucket__gte=a, bucket__lt=b)
        aligned = bucketing.aligned(grain, a, b)
        split = None if aligned else _split_rows(bucketing, a, b, grain)
        if split is None:
            if not aligned:
                # Read the range from the 15-minute rows, which every zone's buckets fit.
                qs = rows(BUCKET_SECONDS).filter(bucket__gte=a, bucket__lt=b)
            key = bucketing.expression("bucket", a, b)
            tiers.add(qs, key, at(lambda row: bucketing.key_from_sql(row["_k"])))
            continue
        # Each row to the chart bucket holding most of it; its other pieces, read from the
        # coarsest finer rows that fit them (hours in Berlin, quarters in Kolkata), one
        # read per grain, are moved from there to their own buckets.
        home, moved = split
        tiers.add(qs, F("bucket"), at(lambda row, home=home: home[row["_k"]]))
        finer = tuple(g for g in grains if g < grain)
        pieces: dict[int, dict[int, tuple[int, int]]] = defaultdict(dict)
        for home_key, pa, pb in moved:
            target = bucketing.key_of(pa)  # a piece lies within one chart bucket
            piece_reads, rest = _plan_tiers(finer, pa, pb, None)
            for g, ra, rb in piece_reads:
                for bucket in range(ra, rb, g):
                    pieces[g][bucket] = (home_key, target)
            for ra, rb in rest:  # never on quarter marks; kept exact all the same
                moved_rows = _raw_grouped_ranges(sel, [(ra, rb)], dims, None, measures).rows
                for key, t in moved_rows.items():
                    out.add((home_key, *key[1:]), t, -1)
                    out.add((target, *key[1:]), t)
        for g, buckets in pieces.items():

            def move(row, group, totals, buckets=buckets):
                home_key, target = buckets[row["_k"]]
                out.add((home_key, *group), totals, -1)
                out.add((target, *group), totals)

            tiers.add(rows(g).filter(bucket__in=sorted(buckets)), F("bucket"), move)
    tiers.run()
    out.prune()
    return out


# ---------------------------------------------------------------------------------------
# Viewer roll-ups: a partial scope's own rows (metering.viewers)

# What each viewer roll-up groups by, besides the organization and the day.
VIEWER_USAGE_DIMS = {"model", "operation", "status_code"}
# The hourly table of each daily one: the whole hours of a range's partial days.
VIEWER_HOURLY = {ViewerUsageDaily: ViewerUsageHourly, ViewerActorDaily: ViewerActorHourly}
VIEWER_ACTOR_DIMS = {"user_id", "api_token_id", "assistant", "workflow"}


@dataclass(frozen=True)
class _ViewerRead:
    """The whole local days [a, b) of a selection that the reading viewer's own roll-up
    rows answer (none when a == b: a day or less, all of it edges), only made by
    `_viewer_read`, once their links equal the viewer's scope in the organization (the
    gate's parts, counted once per event)."""

    org_id: int
    viewer_id: int
    a: int
    b: int

    def rows(self, model, a: int | None = None, b: int | None = None) -> QuerySet:
        """The viewer's rows of `model` in [a, b) (default: the whole local days)."""
        a, b = (self.a, self.b) if a is None else (a, b)
        return model.objects.filter(
            organization_id=self.org_id, viewer_id=self.viewer_id, bucket__gte=a
        ).filter(bucket__lt=b)

    def edges(self, sel: Selection) -> list[tuple[int, int, int, int]]:
        """[(start, end, first whole hour, end of the last)] of the partial local days at
        either end of `sel`: their whole hours come from the viewer's hourly rows, the
        seconds around them from raw events."""
        out = []
        for a, b in ((_epoch(sel.start), self.a), (self.b, _epoch(sel.end))):
            if a < b:
                ha, hb = _ceil(a, HOUR), b - b % HOUR
                out.append((a, b, ha, hb) if ha < hb else (a, b, b, b))
        return out


def _viewer_zone(sel: Selection, org_id: int, viewer: int) -> str | None:
    """The zone of the viewer's roll-up days when their rows in `org_id` count exactly
    their scope there (remembered within `shared_reads`), else None."""
    memo = _memo.get()
    key = ("viewer zone", sel.scope, org_id, viewer)
    if memo is not None and key in memo:
        return memo[key]
    links = set() if viewer == WHOLE_ORGANIZATION else sel.scope.links_in(org_id)
    zone = viewer_rows_ready(org_id, viewer, links)
    if memo is not None:
        memo[key] = zone
    return zone


def _viewer_read(sel: Selection, bucketing: Bucketing | None = None) -> _ViewerRead | None:
    """The whole local days of `sel` from the viewer roll-ups, or None: a partial scope
    (a team lead, project admin or member) in one organization, or, for charts, one
    whole organization (its WHOLE_ORGANIZATION rows: local days that move no pieces,
    where otherwise the org roll-ups' UTC days answer as well), with no team, project,
    user, token, session or end-user filter, over more than RAW_RANGE_LIMIT; charts only
    of local days in the zone the rows are counted in."""
    scope = sel.scope
    if (
        len(sel.org_ids) != 1
        or sel.needs_scope_dims
        or sel.needs_raw
        or sel.end - sel.start <= RAW_RANGE_LIMIT
        or (bucketing is not None and bucketing.width != DAY)
    ):
        return None
    if scope.covers_whole_orgs(sel.org_ids):
        if bucketing is None:
            return None
        viewer = WHOLE_ORGANIZATION
    elif scope.user_id:
        viewer = scope.user_id
    else:
        return None
    zone = _viewer_zone(sel, sel.org_ids[0], viewer)
    if zone is None or (bucketing is not None and bucketing.tz.key != zone):
        return None
    tz = ZoneInfo(zone)
    a = local_day_start(sel.start, tz)
    if a < _epoch(sel.start):  # the next local midnight
        following = sel.start.astimezone(tz).date() + timedelta(days=1)
        a = int(datetime(following.year, following.month, following.day, tzinfo=tz).timestamp())
    b = local_day_start(sel.end, tz)
    if a > b:  # the range lies within one local day: one edge, no whole day
        a = b = _epoch(sel.end)
    return _ViewerRead(sel.org_ids[0], viewer, a, b)


def _viewer_table(sel: Selection, dims: tuple[str, ...]):
    """The viewer roll-up that has `dims` and the selection's filters, or None."""
    if set(dims) <= VIEWER_USAGE_DIMS:
        return ViewerUsageDaily
    plain = not (sel.models or sel.operations or sel.status != "all")
    if plain and set(dims) <= VIEWER_ACTOR_DIMS:
        return ViewerActorDaily
    return None


def _viewer_totals(
    sel: Selection,
    read: _ViewerRead,
    model,
    dims: tuple[str, ...],
    bucketing: Bucketing | None,
    measures: tuple[str, ...] | None,
) -> Grouped:
    """Totals from the viewer's own rows for the whole local days, and the partial days
    at the edges as before (the wide 15-minute roll-up and raw seconds, behind the gate)."""
    out = Grouped(dims)
    tiers = _TierReads(dims, measures)
    filters = _dimension_filters(sel)
    hourly = VIEWER_HOURLY[model]

    def at_key(row, group, totals):
        out.add((row["_k"] if bucketing is not None else None, *group), totals)

    # Each daily row is one local day of the chart's zone: its bucket is the chart's key;
    # each edge lies within one local day, the chart bucket its hours go to.
    if read.a < read.b:
        tiers.add(read.rows(model).filter(filters), F("bucket") if bucketing else None, at_key)
    raw_ranges = []
    for a, b, ha, hb in read.edges(sel):
        if ha < hb:
            key = Value(bucketing.key_of(a), output_field=BigIntegerField()) if bucketing else None
            tiers.add(read.rows(hourly, ha, hb).filter(filters), key, at_key)
        raw_ranges += [(a, ha), (hb, b)]
    tiers.add_raw(sel, raw_ranges, bucketing, out)
    tiers.run()
    out.prune()
    return out


def _rollup_value(dim: str, value):
    """The roll-ups key a missing team/project/user/token as 0; raw events say None."""
    return None if value == 0 and dim.endswith("_id") else value


def totals(sel: Selection) -> Totals:
    return grouped_totals(sel).total()


def top(sel: Selection, dim: str, n: int = 5, by: str = "total_tokens") -> list[tuple]:
    """The n largest groups of `dim` by a Totals attribute: [(value, Totals)]."""
    grouped = grouped_totals(sel, (dim,))
    items = [(key[1], t) for key, t in grouped.rows.items()]
    return heapq.nlargest(n, items, key=lambda item: (getattr(item[1], by), str(item[0])))


def distinct_counts(sel: Selection, columns: tuple[str, ...]) -> dict[str, int]:
    """How many distinct non-empty values of each of `columns` (user_id, assistant,
    workflow), exact: counted in SQL over a union of the distinct values of the tiers of
    the smallest family that has them (whole days, hours, quarters) and of the raw seconds
    at the edges, one statement for every column (a month of an organization's actors is
    tens of thousands of rows, too many to send to Python to count)."""
    branches = _distinct_branches(sel, columns)
    if not branches:
        return dict.fromkeys(columns, 0)
    # Missing ids are NULL in events and 0 in roll-ups; missing labels are "" in both.
    names = {f"_d{i}": column for i, column in enumerate(columns)}
    quote = connection.ops.quote_name

    def shaped(qs) -> list:
        table = quote(qs.model._meta.db_table)
        present = {f.attname for f in qs.model._meta.concrete_fields}
        out = []
        for name, column in names.items():
            if column not in present:  # a people or a label roll-up: the other's column
                out.append((name, _Sql("0" if column.endswith("_id") else "''")))
            elif column.endswith("_id"):
                out.append((name, _Sql(f"COALESCE({table}.{quote(column)}, 0)")))
            else:
                out.append((name, column))
        return out

    union = _union([_select(qs, shaped(qs), distinct=True, also=g) for qs, g in branches])
    if not union.sql:
        return dict.fromkeys(columns, 0)
    sql, params = union.sql, union.params
    counts = ", ".join(
        f"COUNT(DISTINCT CASE WHEN {quote(name)} <> {0 if column.endswith('_id') else "''"} "
        f"THEN {quote(name)} END)"
        for name, column in names.items()
    )
    with connection.cursor() as cursor:
        # Our own compiled SQL and quoted aliases; the values travel as parameters.
        cursor.execute(f"SELECT {counts} FROM ({sql}) AS distinct_values", params)
        row = cursor.fetchone()
    return {column: int(n or 0) for column, n in zip(columns, row, strict=True)}


def _exists(qs: QuerySet) -> tuple[str, list]:
    """`EXISTS (a row of qs)` as a condition for `_select`'s `also`: uncorrelated, so the
    database evaluates it once ("1 = 0" when the filters match nothing)."""
    found = _select(qs, [("one", _Sql("1"))])
    return (f"EXISTS ({found[0]})", found[1]) if found is not None else ("1 = 0", [])


def _distinct_branches(sel: Selection, columns: tuple[str, ...]) -> list[tuple]:
    """[(rows, condition)] whose distinct values of `columns` make `distinct_counts`: the
    viewer's own actor rows for whole local days (a partial scope, with no model,
    operation or status filter), else the tiers of the smallest family, and raw events
    for the seconds no tier fits. A range that ends now reads its last bucket's rows
    while no event lies beyond the end in that bucket (the rest of the current hour is
    still to come), its raw events otherwise: each under its (sql, params) condition, or
    None."""
    read = _viewer_read(sel)
    if read is not None and _viewer_table(sel, columns) is ViewerActorDaily:
        branches = [read.rows(ViewerActorDaily)] if read.a < read.b else []
        raw_ranges = []
        for a, b, ha, hb in read.edges(sel):
            if ha < hb:
                branches.append(read.rows(ViewerActorHourly, ha, hb))
            raw_ranges += [(a, ha), (hb, b)]
        return [(qs, None) for qs in branches] + [
            (UsageEvent.objects.filter(_event_filters(sel)).filter(in_range), None)
            for in_range in _range_qs(raw_ranges)
        ]
    start, end = _epoch(sel.start), _epoch(sel.end)
    raw_only = sel.needs_raw or sel.end - sel.start <= RAW_RANGE_LIMIT
    family = _family(sel, columns)
    # People and labels of whole organizations: each column from its own family (same
    # grains), the columns a family lacks left empty (`distinct_counts`).
    families = ("people", "labels") if family == "actor" else (family,)
    grains = tuple(dict(FAMILIES[families[0]]))
    reads, raw_ranges = ([], [(start, end)]) if raw_only else _plan_tiers(grains, start, end, None)
    branches = [
        (_rollup_rows(sel, name, grain).filter(bucket__gte=a, bucket__lt=b), None)
        for grain, a, b in reads
        for name in families
    ]
    grain = min(grains)
    for a, b in raw_ranges:
        events = UsageEvent.objects.filter(_event_filters(sel))
        h = a - a % grain
        if reads and b == end and end >= _now() and a < b < h + grain:
            beyond, params = _exists(events.filter(*_range_qs([(end, h + grain)])))
            branches += [
                (_rollup_rows(sel, name, grain).filter(bucket=h), (f"NOT ({beyond})", params))
                for name in families
            ]
            branches.append((events.filter(*_range_qs([(a, b)])), (beyond, params)))
        else:
            branches += [(events.filter(in_range), None) for in_range in _range_qs([(a, b)])]
    return branches


# ---------------------------------------------------------------------------------------
# Latency percentiles


def _percentile_from_histogram(counts: dict[int, int], q: float) -> float | None:
    n = sum(counts.values())
    if not n:
        return None
    rank = q * n
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= rank:
            return latency_bucket_value(index)
    return latency_bucket_value(max(counts))


class PercentileDisc(Aggregate):
    """PostgreSQL's nearest-rank percentile: one pass, no OFFSET walk."""

    function = "percentile_disc"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression, fraction: float, **extra):
        super().__init__(expression, fraction=float(fraction), **extra)


# Latency histograms, coarsest first: org-wide ones by day and hour; the scoped one (every
# column of the visibility predicate) by day.
HIST_NARROW_TIERS = ((DAY, LatencyHistogramDaily), (HOUR, LatencyHistogramHourly))
HIST_WIDE_TIERS = ((DAY, LatencyHistogramScopeDaily),)
HIST_MODEL_TIERS = ((DAY, LatencyHistogramModelDaily),)
HIST_PART_TIERS = ((DAY, LatencyHistogramPartDaily),)
HIST_FAMILIES = {
    "org": HIST_NARROW_TIERS,
    "scope": HIST_WIDE_TIERS,
    "model": HIST_MODEL_TIERS,
    "parts": HIST_PART_TIERS,
}
# The part histogram's part for each column of the visibility predicate.
PART_OF_COLUMN = {column: part for part, column in HIST_PARTS}


def _hist_family(sel: Selection) -> str | None:
    """The histogram that holds `sel`'s latencies, or None (raw events answer): "org"
    for whole organizations, "scope" for partial scopes and scope filters (it has every
    column of the visibility predicate), "model" for a model filter, alone or with teams
    whose every event the viewer sees; "parts" for a partial scope with no scope filter
    (its parts' histograms by inclusion-exclusion, see `_part_reads`)."""
    if sel.needs_raw or sel.status != "all" or sel.end - sel.start <= RAW_RANGE_LIMIT:
        return None
    if sel.models:
        if sel.project_ids or sel.user_ids or sel.token_ids:
            return None
        whole = sel.scope.covers_whole_orgs(sel.org_ids)
        own_teams = bool(sel.team_ids) and set(sel.team_ids) <= sel.scope.team_ids
        return "model" if whole or own_teams else None
    if _whole_orgs(sel):
        return "org"
    if not sel.needs_scope_dims and scope_columns(sel.scope):
        return "parts"
    return "scope"


@dataclass(frozen=True)
class _HistogramPlan:
    """How a latency question splits between histograms and raw events: `reads` are
    histogram rows, each with the [a, b) range it covers; raw events answer `raw_ranges`,
    the edges no histogram bucket fits in."""

    reads: tuple[tuple[QuerySet, int, int, int, int], ...]  # rows, a, b, grain, sign
    raw_ranges: tuple[tuple[int, int], ...]
    family: str = ""  # HIST_FAMILIES' name, or "viewer" (the viewer's own rows)
    raw_less: tuple[tuple[int, int], ...] = ()  # raw ranges whose counts are subtracted

    def raw_querysets(self, sel: Selection, less: bool = False) -> list[QuerySet]:
        """The raw events of the edges (or, with `less`, of the ranges subtracted), one
        indexed query per range and part (their latency counts add up: `_latency_parts`)."""
        in_ranges = _range_qs(self.raw_less if less else self.raw_ranges)
        if not in_ranges:
            return []
        return [part.filter(q) for q in in_ranges for part in _latency_parts(sel)]


def _histogram_rows(sel: Selection, family: str, grain: int) -> "QuerySet | _NarrowRows":
    """A histogram's rows of the selection: the org-wide and model ones only where every
    row they hold for the filters is visible (`_hist_family`), else the scoped one behind
    the gate's predicate."""
    model = dict(HIST_FAMILIES[family])[grain]
    if family != "scope":
        rows = _narrow_rows(model, sel)
        if family == "model":
            rows = rows.filter(model__in=sel.models)
            if sel.team_ids:
                rows = rows.filter(team_id__in=sel.team_ids)
    else:
        rows = model.objects.filter(rollup_scope_q(_reading_scope(sel)))
        for column, values in (
            ("organization_id", sel.org_ids),
            ("team_id", sel.team_ids),
            ("project_id", sel.project_ids),
            ("user_id", sel.user_ids),
            ("api_token_id", sel.token_ids),
        ):
            if values:
                rows = rows.filter(**{f"{column}__in": values})
    if sel.operations:
        rows = rows.filter(operation__in=sel.operations)
    return rows


def _part_reads(sel: Selection, grain: int) -> list[tuple[QuerySet, int]]:
    """[(rows, sign)] whose signed sum is the histogram of a partial scope (the union of
    its parts: teams, projects, own events, own tokens), by inclusion-exclusion over the
    kinds of part: each kind alone from the part histogram (small: one team's or one
    token's rows), each overlap of two or more kinds (a team's events sent with an own
    token) from the scope histogram, where an overlap is few rows. Parts of one kind never
    overlap: an event has one team, one project, one user and one token."""
    columns = scope_columns(sel.scope)
    part_model = dict(HIST_PART_TIERS)[grain]
    scope_model = dict(HIST_WIDE_TIERS)[grain]
    reads = []
    for size in range(1, len(columns) + 1):
        for kinds in combinations(sorted(columns), size):
            if size == 1:
                (column,) = kinds
                rows = part_model.objects.filter(
                    part=PART_OF_COLUMN[column], part_id__in=sorted(columns[column])
                )
            else:
                rows = scope_model.objects.filter(
                    **{f"{column}__in": sorted(columns[column]) for column in kinds}
                )
            if sel.org_ids:
                rows = rows.filter(organization_id__in=sel.org_ids)
            if sel.operations:
                rows = rows.filter(operation__in=sel.operations)
            reads.append((rows, 1 if size % 2 else -1))
    return reads


def _histogram_reads(sel: Selection, family: str, grain: int) -> list[tuple[QuerySet, int]]:
    """[(rows, sign)] of `family`'s histogram of `grain` that add up to the selection's."""
    if family == "parts":
        return _part_reads(sel, grain)
    return [(_histogram_rows(sel, family, grain), 1)]


def _signed_sum(sign: int) -> tuple[str, "_Sql"]:
    """The `n` item of a histogram read for `_select`: its counts summed, times `sign`."""
    return ("n", _Sql('SUM("count")' if sign == 1 else f'(SUM("count") * {int(sign)})'))


def _histogram_plan(
    sel: Selection,
    bucketing: Bucketing | None = None,
    *,
    viewer: bool = True,
    complement: bool = False,
) -> _HistogramPlan | None:
    """The histograms that answer `sel`'s p95 within ~2 % (per chart bucket of
    `bucketing`, whose buckets they must not straddle), or None: raw events only, for
    short ranges and for the filters the histograms lack (model, status, session). A
    partial scope's whole local days come from the viewer's own histogram where it is
    counted (unless not `viewer`: its local days are not the UTC grains that pieces are
    moved between), the partial days at the edges from raw events. With `complement` (a
    count over the whole range, no chart), most of a UTC day is read as the day less the
    rest of it (`_day_complements`)."""
    read = _viewer_read(sel, bucketing) if viewer and sel.status == "all" else None
    if read is not None and not sel.models:
        rows = read.rows(ViewerHistogramDaily)
        if sel.operations:
            rows = rows.filter(operation__in=sel.operations)
        reads = [(rows, read.a, read.b, DAY, 1)] if read.a < read.b else []
        raw = []
        for a, b, ha, hb in read.edges(sel):
            if read.viewer_id == WHOLE_ORGANIZATION and ha < hb:
                # The whole organization's partial days: its hourly histogram, as ever.
                hours = _histogram_rows(sel, "org", HOUR).filter(bucket__gte=ha, bucket__lt=hb)
                reads.append((hours, ha, hb, HOUR, 1))
                raw += [(a, ha), (hb, b)]
            else:
                raw.append((a, b))
        edges = tuple((a, b) for a, b in raw if a < b)
        return _HistogramPlan(tuple(reads), edges, "viewer")
    family = _hist_family(sel)
    if family is None:
        return None
    tiers = tuple(dict(HIST_FAMILIES[family]))
    start, end = _epoch(sel.start), _epoch(sel.end)
    grains, raw_ranges = _plan_tiers(tiers, start, end, bucketing)
    if not grains:
        return None
    raw_less = []
    if complement and bucketing is None:
        bucket_reads, raw_ranges, raw_less = _edge_complements(min(tiers), raw_ranges, _now())
        signed = _day_complements(tiers, _joined(grains + bucket_reads))
    else:
        signed = [(grain, a, b, 1) for grain, a, b in grains]
    reads = tuple(
        (rows.filter(bucket__gte=a, bucket__lt=b), a, b, grain, sign * whole)
        for grain, a, b, whole in signed
        for rows, sign in _histogram_reads(sel, family, grain)
    )
    return _HistogramPlan(reads, tuple(raw_ranges), family, tuple(raw_less))


def _now() -> float:
    """The time now (an epoch), for plans that weigh the part of a range still to come."""
    return time.time()


def _joined(reads: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Tier reads [(grain, a, b)] with the adjacent reads of one grain made one."""
    out: list[tuple[int, int, int]] = []
    for grain, a, b in sorted(reads, key=lambda read: (-read[0], read[1])):
        if out and out[-1][0] == grain and out[-1][2] == a:
            out[-1] = (grain, out[-1][1], b)
        else:
            out.append((grain, a, b))
    return out


def _edge_complements(
    grain: int, ranges: list[tuple[int, int]], now: float
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """`ranges` (raw edges) as ([(grain, a, b)] bucket reads, [(a, b)] raw ranges added,
    [(a, b)] raw ranges subtracted): an edge inside one bucket of `grain` is read as the
    bucket less the raw events of the rest of it where the rest holds less time before
    `now` than the edge (an edge of 50 minutes is its hour less 10 minutes of events; at
    a range that ends now, the rest of the hour is still to come and holds next to no
    events, so the current hour so far costs one row). Only for counts over the whole
    range (histograms add and subtract); a count of distinct values cannot subtract."""

    def past(a: int, b: int) -> float:
        return max(0.0, min(b, now) - a)

    reads, added, less = [], [], []
    for a, b in ranges:
        h = a - a % grain
        rest = [(x, y) for x, y in ((h, a), (b, h + grain)) if x < y]
        if b <= h + grain and sum(past(x, y) for x, y in rest) < past(a, b):
            reads.append((grain, h, h + grain))
            less += rest
        else:
            added.append((a, b))
    return reads, added, less


# A chart whose buckets roll-up rows straddle (local days in a zone that is not UTC, over
# daily rows) still reads the rows: each row goes to the chart bucket that holds most of
# it, and its other pieces (an hour a day in Berlin) are read from finer data and moved.
# Sums and histogram counts are exact, so the answer is what aligned rows would give.
# Beyond this many pieces, or a quarter of the time, the finer data alone is cheaper.
MAX_MOVED_PIECES = 120


def _split_rows(
    bucketing: Bucketing, a: int, b: int, grain: int
) -> tuple[dict[int, int], list[tuple[int, int, int]]] | None:
    """Roll-up rows of `grain` in [a, b) against the chart's buckets: ({row bucket: the
    chart bucket holding most of it}, [(that chart bucket, start, end) of each other
    piece]), or None when the pieces would be too many or too much of the time."""
    home: dict[int, int] = {}
    moved: list[tuple[int, int, int]] = []
    starts = [k for k in bucketing.keys(a, b) if a < k < b]
    for d in range(a, b, grain):
        cuts = [k for k in starts if d < k < d + grain]
        if not cuts:
            home[d] = bucketing.key_of(d)
            continue
        pieces = list(pairwise([d, *cuts, d + grain]))
        biggest = max(pieces, key=lambda piece: piece[1] - piece[0])
        home[d] = bucketing.key_of(biggest[0])
        moved += [(home[d], pa, pb) for pa, pb in pieces if (pa, pb) != biggest]
        if len(moved) > MAX_MOVED_PIECES:
            return None
    if sum(pb - pa for _key, pa, pb in moved) * 4 > b - a:
        return None  # e.g. hourly charts over daily rows: most of it would move
    return home, moved


def _straddles(
    plan: _HistogramPlan, bucketing: Bucketing
) -> tuple[dict[int, int], list[tuple[int, int, int]]] | None:
    """`_split_rows` over every read of `plan`."""
    home: dict[int, int] = {}
    moved: list[tuple[int, int, int]] = []
    # Each time range once: a signed sum has several reads of the same range.
    for a, b, grain in dict.fromkeys((a, b, grain) for _rows, a, b, grain, _sign in plan.reads):
        split = _split_rows(bucketing, a, b, grain)
        if split is None:
            return None
        home |= split[0]
        moved += split[1]
    if len(moved) > MAX_MOVED_PIECES:
        return None
    return home, moved


def _raw_percentile(qs: QuerySet, q: float) -> float | None:
    if connection.vendor == "postgresql":
        value = qs.aggregate(p=PercentileDisc("latency_ms", q))["p"]
        return float(value) if value is not None else None
    n = qs.count()
    if not n:
        return None
    # Nearest-rank percentile: the smallest value with at least q*n values at or below it.
    rank = max(1, -(-int(q * n * 1000) // 1000))
    return float(qs.order_by("latency_ms").values_list("latency_ms", flat=True)[rank - 1])


def latency_percentile(sel: Selection, q: float = 0.95) -> float | None:
    """p-quantile latency in ms: from a histogram where one holds the selection (within
    ~2 %), exact from raw events otherwise."""
    plan = _histogram_plan(sel, complement=True)
    if plan is None:
        raw_qs = UsageEvent.objects.filter(_event_filters(sel))
        return _raw_percentile(raw_qs.filter(timestamp__gte=sel.start, timestamp__lt=sel.end), q)
    return _hist_percentiles(sel, plan, {o: "all" for o in _all_operations(sel)}, q)["all"]


def _all_operations(sel: Selection) -> tuple[str, ...]:
    return sel.operations or tuple(Operation.values)


def _wanted_groups(sel: Selection, groups: dict[str, tuple[str, ...]]) -> dict:
    """The groups' operations within the selection's operation filter (groups left
    empty by it are dropped)."""
    wanted = {
        name: tuple(o for o in ops if not sel.operations or o in sel.operations)
        for name, ops in groups.items()
    }
    return {name: ops for name, ops in wanted.items() if ops}


def _union_all(branches: list[QuerySet]):
    """One UNION ALL statement of querysets of the same columns (nothing for none)."""
    if not branches:
        return []
    first, *rest = branches
    return first.union(*rest, all=True) if rest else first


def _tuples(qs) -> list[tuple]:
    """The rows of a values_list() queryset (or a UNION ALL of them) as the database
    sends them: its compiled SQL on a cursor, without the ORM's per-row work (a 90-day
    chart reads tens of thousands of histogram rows). Only for columns that need no
    conversion (integers, text); sums of integers come back as numbers to int()."""
    if isinstance(qs, _Statement):
        if not qs.sql:
            return []
        sql, params = qs.sql, qs.params
    elif not isinstance(qs, QuerySet):
        return list(qs)
    else:
        try:
            sql, params = qs.query.sql_with_params()
        except EmptyResultSet:
            return []
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _summed_tuples(qs, keys: int) -> list[tuple]:
    """`_tuples` of a UNION ALL whose rows are `keys` key columns and a count, with the
    counts of equal keys summed by the database: the signed parts of a scope's histogram
    come back as one row per key instead of one per part."""
    if isinstance(qs, _Statement):
        if not qs.sql:
            return []
        sql, params = qs.sql, qs.params
    elif not isinstance(qs, QuerySet):
        return list(qs)
    else:
        try:
            sql, params = qs.query.sql_with_params()
        except EmptyResultSet:
            return []
    columns = [f"c{i}" for i in range(keys + 1)]
    key_list = ", ".join(columns[:keys])
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH u ({', '.join(columns)}) AS ({sql}) "
            f"SELECT {key_list}, SUM({columns[-1]}) FROM u GROUP BY {key_list}",
            params,
        )
        return cursor.fetchall()


def _hist_percentiles(
    sel: Selection, plan: _HistogramPlan, group_of: dict[str, str], q: float
) -> dict[str, float | None]:
    """p-quantile per group of operations from one read of each histogram tier and of
    the raw edges (`sel` already narrowed to every operation of `group_of`)."""
    counts: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    tiers = [
        _select(
            rows,
            [("operation", "operation"), ("latency_bucket", "latency_bucket"), _signed_sum(sign)],
            (1, 2),
        )
        for rows, _a, _b, _grain, sign in plan.reads
    ]
    edges, less = plan.raw_querysets(sel), plan.raw_querysets(sel, less=True)
    if connection.vendor == "postgresql":
        # The raw edges' counts in the same statement, rows of the same shape.
        tiers += _raw_latency_selects(edges) + _raw_latency_selects(less, sign=-1)
        edges, less = [], []
    for operation, index, n in _tuples(_union(tiers)):
        if operation in group_of:
            counts[group_of[operation]][index] += int(n)
    for parts, sign in ((edges, 1), (less, -1)):
        for _quarter, operation, index, n in _tuples(_raw_edge_counts(parts, by_quarter=False)):
            if operation in group_of:
                counts[group_of[operation]][index] += sign * n
    return {
        name: _percentile_from_histogram(counts.get(name, {}), q) for name in set(group_of.values())
    }


def latency_percentiles(
    sel: Selection, groups: dict[str, tuple[str, ...]], q: float = 0.95
) -> dict[str, float | None]:
    """p-quantile latency per group of operations (groups must not overlap): every group
    from one read of each histogram, or, where only raw events can answer, on PostgreSQL
    one scan for all groups (elsewhere each group is one `latency_percentile`)."""
    out: dict[str, float | None] = {name: None for name in groups}
    wanted = _wanted_groups(sel, groups)
    if not wanted:
        return out
    every_op = tuple(o for ops in wanted.values() for o in ops)
    narrowed = replace(sel, operations=every_op)
    plan = _histogram_plan(narrowed, complement=True)
    if plan is not None:
        group_of = {op: name for name, ops in wanted.items() for op in ops}
        return out | _hist_percentiles(narrowed, plan, group_of, q)
    if connection.vendor != "postgresql":
        for name, ops in wanted.items():
            out[name] = latency_percentile(replace(sel, operations=ops), q)
        return out
    qs = UsageEvent.objects.filter(_event_filters(narrowed)).filter(
        timestamp__gte=sel.start, timestamp__lt=sel.end
    )
    group = Case(
        *(When(operation__in=ops, then=Value(name)) for name, ops in wanted.items()),
        output_field=CharField(),
    )
    rows = qs.annotate(_group=group).values("_group").annotate(p=PercentileDisc("latency_ms", q))
    for row in rows.order_by():
        out[row["_group"]] = float(row["p"]) if row["p"] is not None else None
    return out


def _quantile_sorted(values: list[int], q: float) -> float | None:
    if not values:
        return None
    rank = max(1, -(-int(q * len(values) * 1000) // 1000))
    return float(values[rank - 1])


def _latency_index_sql():
    """The latency bucket of a raw event, in SQL where the database has ln() (PostgreSQL:
    aggregates.LATENCY_BUCKET_SQL, equal to aggregates.latency_bucket), else None."""
    if connection.vendor != "postgresql":
        return None
    column = f'"{UsageEvent._meta.db_table}"."latency_ms"'
    return RawSQL(  # noqa: S611 - constant SQL, no user input
        LATENCY_BUCKET_SQL.format(col=column), [], output_field=BigIntegerField()
    )


def _piece_latencies(parts: list[QuerySet], pieces: list[tuple[int, int]]):
    """(piece index, operation, latency bucket, events) of the raw events in each [a, b)
    piece, over `parts` (`_latency_parts`: a key may come once per part, to be added up):
    one statement, the list of pieces joined laterally to one indexed read per part, so
    each piece is an index range of each part (an OR of the ranges would keep the planner
    from using the time column of the scope's indexes)."""
    index = _latency_index_sql()
    if index is None:
        counts: dict[tuple, int] = defaultdict(int)
        for raw_qs in parts:
            for i, (a, b) in enumerate(pieces):
                for in_range in _range_qs(((a, b),)):
                    rows = raw_qs.filter(in_range).values_list("operation", "latency_ms")
                    for operation, latency in rows:
                        counts[(i, operation, latency_bucket(latency))] += 1
        return [(*key, n) for key, n in counts.items()]

    def branch(rows: QuerySet, number: int) -> QuerySet:
        return (
            rows.annotate(_piece=Value(number, output_field=BigIntegerField()), _index=index)
            .values_list("_piece", "operation", "_index")
            .annotate(n=Count("id"))
            .order_by()
        )

    # Every piece of a part has the same shape: compile the part's branch once, with
    # marker values where the piece number and bounds go, and join it laterally to the
    # pieces' list, so the database plans each part once (a 90-day chart in Berlin has 90
    # pieces; planning or compiling a branch per piece costs more than running it).
    number, start, end = _PIECE_MARKERS
    markers = dict(zip(_PIECE_MARKERS, ("p.i", "p.a", "p.b"), strict=True))
    branches, values = [], []
    for raw_qs in parts:
        template = branch(raw_qs.filter(timestamp__gte=start, timestamp__lt=end), number)
        try:
            sql, params = template.query.sql_with_params()
        except EmptyResultSet:
            continue
        pieces_sql, kept = _bind_markers(sql, params, markers)
        if pieces_sql is None:  # a filter value equal to a marker: one branch per piece
            return _union_all(
                [
                    branch(raw_qs.filter(in_range), i)
                    for raw_qs in parts
                    for i, (a, b) in enumerate(pieces)
                    for in_range in _range_qs(((a, b),))
                ]
            )
        branches.append(f"({pieces_sql})")
        values += kept
    listed = [(i, a, b) for i, (a, b) in enumerate(pieces) if a < b]
    if not branches or not listed:
        return []
    rows = ", ".join(
        ["(CAST(%s AS bigint), CAST(%s AS timestamptz), CAST(%s AS timestamptz))"] * len(listed)
    )
    pieces_params = [
        v
        for i, a, b in listed
        for v in (i, datetime.fromtimestamp(a, UTC), datetime.fromtimestamp(b, UTC))
    ]
    return _Statement(
        f"SELECT s.* FROM (VALUES {rows}) AS p (i, a, b) "
        f"CROSS JOIN LATERAL ({' UNION ALL '.join(branches)}) AS s",
        pieces_params + values,
    )


_PLACEHOLDER = re.compile(r"%[%s]")


def _bind_markers(sql: str, params, columns: dict) -> tuple[str | None, list]:
    """`sql` with each parameter equal to a key of `columns` replaced by that column's
    name, and the parameters left; (None, []) when a marker is not found exactly once."""
    found = {marker: 0 for marker in columns}
    out, kept, position = [], [], 0
    index = iter(params)
    for match in _PLACEHOLDER.finditer(sql):
        out.append(sql[position : match.start()])
        position = match.end()
        if match.group() == "%%":
            out.append("%%")
            continue
        value = next(index)
        marker = next((m for m in columns if value == m), None)
        if marker is not None:
            found[marker] += 1
            out.append(columns[marker])
        else:
            out.append("%s")
            kept.append(value)
    out.append(sql[position:])
    if any(n != 1 for n in found.values()):
        return None, []
    return "".join(out), kept


# The piece number and bounds of `_piece_latencies`' template: values no filter holds.
_PIECE_MARKERS = (
    -7_270_001,
    datetime(1901, 2, 3, 4, 5, 6, 7, tzinfo=UTC),
    datetime(1901, 2, 3, 4, 5, 6, 8, tzinfo=UTC),
)


@dataclass(frozen=True)
class _Statement:
    """Compiled SQL and its parameters, for `_tuples`."""

    sql: str
    params: list


def _finer_histogram_grains(sel: Selection, grain: int) -> tuple[int, ...]:
    """The histogram tiers of `sel`'s family finer than `grain` (org-wide: hours)."""
    family = _hist_family(sel)
    tiers = HIST_FAMILIES[family] if family else ()
    return tuple(g for g, _model in tiers if g < grain)


def _raw_latency_selects(parts: list[QuerySet], sign: int = 1) -> list:
    """(operation, latency bucket, events times `sign`) of raw querysets as `_select`s,
    one per part (PostgreSQL), for a histogram read's UNION."""
    column = f'"{UsageEvent._meta.db_table}"."latency_ms"'
    index = _Sql(LATENCY_BUCKET_SQL.format(col=column))
    n = _Sql("COUNT(*)" if sign == 1 else f"(COUNT(*) * {int(sign)})")
    items = [("operation", "operation"), ("latency_bucket", index), ("n", n)]
    return [_select(part, items, (1, 2)) for part in parts]


def _raw_edge_counts(parts: list[QuerySet], by_quarter: bool = True, tags=None):
    """(quarter-hour epoch, operation, latency bucket, events) of raw querysets (with 0
    for the quarter unless `by_quarter`: a percentile over the whole range needs no
    time, and one row per quarter is 30 times the rows; or, with `tags`, each part's tag
    in its place: the chart bucket a part lies in): grouped in SQL on PostgreSQL (one
    UNION ALL statement), row by row elsewhere."""
    tags = tags or [None] * len(parts)
    if connection.vendor != "postgresql":
        counts: dict[tuple, int] = defaultdict(int)
        for part, tag in zip(parts, tags, strict=True):
            rows = part.values_list("timestamp", "operation", "latency_ms")
            for ts, operation, latency in rows.iterator(chunk_size=5000):
                epoch = _epoch(ts)
                quarter = epoch - epoch % BUCKET_SECONDS if by_quarter else 0
                counts[(quarter if tag is None else tag, operation, latency_bucket(latency))] += 1
        return [(*key, n) for key, n in counts.items()]
    table = UsageEvent._meta.db_table
    epoch = f'floor(extract(epoch FROM "{table}"."timestamp"))::bigint'
    quarter = _Sql(f"({epoch} - {epoch} %% {BUCKET_SECONDS})" if by_quarter else "0")
    index = _Sql(LATENCY_BUCKET_SQL.format(col=f'"{table}"."latency_ms"'))
    branches = [
        _select(
            part,
            [
                ("_quarter", quarter if tag is None else _Sql(str(int(tag)))),
                ("operation", "operation"),
                ("_index", index),
                ("n", _Sql("COUNT(*)")),
            ],
            (1, 2, 3),
        )
        for part, tag in zip(parts, tags, strict=True)
    ]
    return _union(branches)


def _hist_series(
    sel: Selection, bucketing: Bucketing, group_of: dict[str, str], q: float
) -> dict[str, dict[int, float | None]] | None:
    """{group: {chart bucket: p-quantile}} from the histograms, or None where they cannot
    answer. `sel` is already narrowed to every operation of `group_of`.

    Whole-day rows in a zone whose days are not UTC days (Berlin) go to the chart bucket
    holding most of them; their other pieces (an hour a day) are moved, read from the
    finer histogram where one fits them (hours, org-wide) and from raw events otherwise,
    all pieces in one statement per source."""
    aligned = _histogram_plan(sel, bucketing)
    plan = _histogram_plan(sel, viewer=False)
    coarsest = max((read[3] for read in plan.reads), default=None) if plan else None
    uses_coarsest = aligned is not None and any(read[3] == coarsest for read in aligned.reads)
    split = None
    if plan is not None and not uses_coarsest:
        split = _straddles(plan, bucketing)
    if split is None and aligned is None:
        return None
    per_bucket: dict[tuple[str, int], dict[int, int]] = defaultdict(lambda: defaultdict(int))

    def count(group_key, index, n):
        per_bucket[group_key][index] += n

    family = _hist_family(sel)
    # Every histogram read is one branch of one UNION ALL statement, grouped by a time
    # key of its own (`_k`) and tagged with its handler (`_part`): a function from that
    # key to the chart buckets its counts go to, with their signs (a moved piece leaves
    # its row's bucket and joins its own). The statement sums the branches of one handler
    # (the signed parts of a scope) per key.
    branches: list[QuerySet] = []
    handlers: list = []

    def handler(targets) -> int:
        handlers.append(targets)
        return len(handlers) - 1

    def read(rows: QuerySet, key, tag: int, sign: int = 1) -> None:
        items = [
            ("_part", _Sql(str(int(tag)))),
            ("_k", key),
            ("operation", "operation"),
            ("latency_bucket", "latency_bucket"),
            _signed_sum(sign),
        ]
        branches.append(_select(rows, items, (2, 3, 4)))

    out: dict[str, dict[int, float | None]] = defaultdict(dict)
    if split is None:
        plan = aligned
        if plan.family == "viewer":
            # The viewer's daily rows are local days of the chart's zone, each one chart
            # bucket that no other read adds to: the database ranks them itself. The
            # hours of a partial day (the whole organization's) go to the day they lie
            # in, with the raw seconds around them.
            for rows, a, _b, grain, sign in plan.reads:
                if grain == DAY:
                    for key, group, value in _bucket_quantiles(rows, group_of, q):
                        out[group][key] = value
                else:
                    key = Value(bucketing.key_of(a), output_field=BigIntegerField())
                    read(rows, key, handler(lambda k: ((k, 1),)), sign)
        else:
            local = handler(lambda k: ((bucketing.key_from_sql(k), 1),))
            for rows, a, b, _grain, sign in plan.reads:
                # Local buckets computed in SQL: a few thousand rows, not one per hour.
                read(rows, bucketing.expression("bucket", a, b), local, sign)
    else:
        home, moved = split
        at_home = handler(lambda k: ((home[k], 1),))
        for rows, _a, _b, _grain, sign in plan.reads:
            read(rows, F("bucket"), at_home, sign)
        # Each moved piece: from the finest histogram rows that fit it, raw for the rest.
        grain = max(read[3] for read in plan.reads)
        finer = _finer_histogram_grains(sel, grain)
        fine_rows: dict[int, dict[int, tuple[int, int]]] = defaultdict(dict)  # grain: bucket
        raw_pieces: list[tuple[int, int, int, int]] = []  # home, target, a, b
        for home_key, a, b in moved:
            target = bucketing.key_of(a)  # a piece lies within one chart bucket
            reads, rest = _plan_tiers(finer, a, b, None)
            for g, ra, rb in reads:
                for bucket in range(ra, rb, g):
                    fine_rows[g][bucket] = (home_key, target)
            raw_pieces += [(home_key, target, ra, rb) for ra, rb in rest if ra < rb]
        for g, buckets in fine_rows.items():
            moving = handler(lambda k, buckets=buckets: ((buckets[k][0], -1), (buckets[k][1], 1)))
            for rows, sign in _histogram_reads(sel, family, g):
                read(rows.filter(bucket__in=sorted(buckets)), F("bucket"), moving, sign)
        pieces = [(a, b) for _home, _target, a, b in raw_pieces]
        for piece, operation, index, n in _tuples(_piece_latencies(_latency_parts(sel), pieces)):
            if operation in group_of:
                home_key, target, _a, _b = raw_pieces[piece]
                group = group_of[operation]
                count((group, home_key), index, -n)  # its row counted them at home
                count((group, target), index, n)
    # Sum in SQL only the signed parts of a scope (the same keys from several reads):
    # elsewhere each key comes from one read, and grouping would cost more than it saves.
    union = _union(branches)
    rows = _summed_tuples(union, 4) if plan.family == "parts" else _tuples(union)
    targets: dict[tuple[int, int], tuple] = {}
    for part, k, operation, index, n in rows:
        group = group_of.get(operation)
        if group is None or not n:
            continue
        found = targets.get((part, k))
        if found is None:
            found = targets[(part, k)] = handlers[part](k)
        n = int(n)
        for key, sign in found:
            per_bucket[(group, key)][index] += sign * n
    if plan.family == "viewer":
        # Each edge is the part of one local day (chart bucket) the rows do not hold:
        # counted per bucket, not per quarter hour.
        parts = _latency_parts(sel)
        edges = [
            (part.filter(in_range), bucketing.key_of(a))
            for a, b in plan.raw_ranges
            for in_range in _range_qs(((a, b),))
            for part in parts
        ]
        edge_rows = _raw_edge_counts([e for e, _ in edges], tags=[k for _, k in edges])
    else:
        edge_rows = _raw_edge_counts(plan.raw_querysets(sel))
    quarters: dict[int, int] = {}
    for quarter, operation, index, n in _tuples(edge_rows):
        group = group_of.get(operation)
        if group is not None:
            # Chart buckets start on quarter hours: a quarter lies within one of them.
            key = quarters.get(quarter)
            if key is None:
                key = quarters[quarter] = bucketing.key_of(quarter)
            per_bucket[(group, key)][index] += n
    for (group, key), counts in per_bucket.items():
        out[group][key] = _percentile_from_histogram(counts, q)
    return out


def _bucket_quantiles(rows: QuerySet, group_of: dict[str, str], q: float) -> list[tuple]:
    """[(bucket, group, p-quantile)] of histogram `rows` whose buckets are chart buckets
    (the viewer's local days). On PostgreSQL each bucket and group of operations comes as
    two arrays, latency buckets in order and their counts (a few hundred rows, not one per
    latency bucket); elsewhere as rows in that order. The nearest rank is
    `_percentile_from_histogram`'s."""
    if not group_of:
        return []
    names = sorted(set(group_of.values()))
    grouped = rows.filter(operation__in=sorted(group_of)).annotate(
        _g=Case(
            *(When(operation=op, then=Value(names.index(g))) for op, g in group_of.items()),
            output_field=BigIntegerField(),
        )
    )
    if connection.vendor == "postgresql":
        from django.contrib.postgres.aggregates import ArrayAgg

        arrays = (
            grouped.values_list("bucket", "_g")
            .annotate(
                i=ArrayAgg("latency_bucket", order_by="latency_bucket"),
                n=ArrayAgg("count", order_by="latency_bucket"),
            )
            .order_by()
        )
        series = [(key, g, zip(i, n, strict=True)) for key, g, i, n in _tuples(arrays)]
    else:
        plain = grouped.values_list("bucket", "_g", "latency_bucket", "count").order_by(
            "bucket", "_g", "latency_bucket"
        )
        found: dict[tuple, list] = defaultdict(list)
        for key, g, i, n in plain:
            found[(key, g)].append((i, n))
        series = [(key, g, pairs) for (key, g), pairs in found.items()]
    out = []
    for key, g, pairs in series:
        pairs = list(pairs)
        total = sum(n for _i, n in pairs)
        if not total:
            continue
        rank, seen = q * total, 0
        for index, n in pairs:
            seen += n
            if seen >= rank:
                out.append((key, names[g], latency_bucket_value(index)))
                break
    return out


def _averages(
    sel: Selection, bucketing: Bucketing, group_of: dict[str, str]
) -> dict[str, dict[int, float | None]]:
    """{group: {chart bucket: average latency}} from one grouped read of the totals."""
    sums: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    measures = ("requests", "latency_ms_sum")
    for key, totals in grouped_totals(sel, ("operation",), bucketing, measures).rows.items():
        if key[1] in group_of:
            acc = sums[(group_of[key[1]], key[0])]
            acc[0] += totals.latency_ms_sum
            acc[1] += totals.requests
    out: dict[str, dict[int, float | None]] = defaultdict(dict)
    for (group, key), (total, n) in sums.items():
        if n:
            out[group][key] = total / n
    return out


def latency_series(
    sel: Selection, bucketing: Bucketing, q: float = 0.95
) -> dict[int, tuple[float | None, float | None]]:
    """{bucket key: (average ms, p-quantile ms)} for the selection's calls."""
    ops = _all_operations(sel)
    return latency_series_groups(sel, bucketing, {"all": ops}, q).get("all", {})


def latency_series_groups(
    sel: Selection, bucketing: Bucketing, groups: dict[str, tuple[str, ...]], q: float = 0.95
) -> dict[str, dict[int, tuple[float | None, float | None]]]:
    """`latency_series` per group of operations (groups must not overlap).

    Histograms answer p95 (within ~2 %), every group from one read of each source; where
    they cannot, raw events answer exactly (on PostgreSQL one scan for every group)."""
    wanted = _wanted_groups(sel, groups)
    if not wanted:
        return {}
    every_op = tuple(o for ops in wanted.values() for o in ops)
    narrowed = replace(sel, operations=every_op)
    group_of = {op: name for name, ops in wanted.items() for op in ops}
    averages = _averages(narrowed, bucketing, group_of)
    quantiles = _hist_series(narrowed, bucketing, group_of, q)
    if quantiles is None:
        quantiles = _raw_series(narrowed, bucketing, group_of, q)
    return {
        name: {key: (avg, quantiles.get(name, {}).get(key)) for key, avg in averages[name].items()}
        for name in wanted
        if name in averages
    }


def _raw_series(
    sel: Selection, bucketing: Bucketing, group_of: dict[str, str], q: float
) -> dict[str, dict[int, float | None]]:
    """Exact p-quantiles per group and chart bucket from raw events: on PostgreSQL one
    percentile_disc scan grouped by bucket and group, elsewhere sorted in Python."""
    start, end = _epoch(sel.start), _epoch(sel.end)
    qs = UsageEvent.objects.filter(_event_filters(sel)).filter(
        timestamp__gte=sel.start, timestamp__lt=sel.end
    )
    out: dict[str, dict[int, float | None]] = defaultdict(dict)
    if connection.vendor != "postgresql":
        values: dict[tuple[str, int], list[int]] = defaultdict(list)
        rows = qs.values_list("timestamp", "operation", "latency_ms")
        for ts, operation, latency in rows.iterator(chunk_size=5000):
            if operation in group_of:
                values[(group_of[operation], bucketing.key_of(_epoch(ts)))].append(latency)
        for (group, key), latencies in values.items():
            out[group][key] = _quantile_sorted(sorted(latencies), q)
        return out
    names = defaultdict(list)
    for op, name in group_of.items():
        names[name].append(op)
    qs = qs.annotate(
        _ep=RawSQL(  # noqa: S611 - a constant expression, no user input
            f"EXTRACT(EPOCH FROM {UsageEvent._meta.db_table}.timestamp)::bigint",
            [],
            output_field=BigIntegerField(),
        ),
        _group=Case(
            *(When(operation__in=ops, then=Value(name)) for name, ops in names.items()),
            output_field=CharField(),
        ),
    )
    qs = qs.annotate(_tkey=bucketing.expression("_ep", start, end))
    rows = qs.values("_tkey", "_group").annotate(p=PercentileDisc("latency_ms", q)).order_by()
    for row in rows:
        value = row["p"]
        out[row["_group"]][bucketing.key_from_sql(row["_tkey"])] = (
            float(value) if value is not None else None
        )
    return out


def models_seen(sel: Selection, days: int = 90) -> set[str]:
    """Models used within the viewer's scope over the last `days` days (for zero rows),
    from whole UTC days of the daily roll-up (today's row grows with ingestion)."""
    end = _epoch(sel.end)
    since = end - days * DAY
    since -= since % DAY
    source = replace(sel, models=(), status="all")
    read = _viewer_read(replace(source, start=datetime.fromtimestamp(since, UTC)))
    if read is not None and read.viewer_id != WHOLE_ORGANIZATION:
        # A partial scope: its own daily rows, not the union of its parts' wide rows.
        qs = read.rows(ViewerUsageDaily).filter(_dimension_filters(source))
    else:
        qs = rollup_source(source, ("model",), DAY).filter(bucket__gte=since, bucket__lt=end)
    return set(qs.values_list("model", flat=True).distinct().order_by())
