"""The events log: raw usage events, filtered, sorted, paged and counted, and exported.

Every read starts from the gate (`visible_events`) through `EventLogFilter`, the global
filter bar plus the filters only raw events can answer (resource type, pool category,
request id, amount range).

Paging is keyset ("seek") paging on (sort value, id): the next page is "the rows after
this one in this order", so it costs the same on page 2 and on page 40,000, and events
arriving between two clicks neither repeat a row nor skip one. A page number ("go to
page 3") walks the narrow (sort value, id) pairs once to find where that page starts,
then seeks from there.

Counting is bounded: counting every row of a large selection would read millions of
rows for one number, so the log counts up to `COUNT_CAP` and beyond that asks the
roll-ups (exact and cheap, when the filter uses only dimensions they have) or says
"more than 10,000".
"""

import base64
import binascii
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import django_filters
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.db.models import (
    BigIntegerField,
    Case,
    Count,
    F,
    Max,
    Min,
    Q,
    QuerySet,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce
from django.http import QueryDict

from accounts.models import User
from metering.models import NANOS_PER_USD, PoolCategory, ResourceType, UsageEvent

from .exports import csv_rows
from .filters import FILTER_PARAMS, Period, UsageFilter
from .queries import totals
from .visibility import viewer_scope, visible_event_parts, visible_events

logger = logging.getLogger(__name__)

PAGE_SIZE = 25
COUNT_CAP = 10_000

IO_CHOICES = [("", "Input + output"), ("input", "Input"), ("output", "Output")]
NO_POOL = "none"
POOL_CHOICES = [*PoolCategory.choices, (NO_POOL, "No pool")]
# The log's own parameters, on top of the global filter bar's.
EXTRA_FILTER_PARAMS = ("resource", "pool", "io", "request_id", "amount_min", "amount_max")
LOG_FILTER_PARAMS = (*FILTER_PARAMS, *EXTRA_FILTER_PARAMS)
# Filters the roll-ups cannot answer: with any of them the count cannot be estimated.
RAW_ONLY_PARAMS = (
    "resource",
    "pool",
    "request_id",
    "amount_min",
    "amount_max",
    "session",
    "end_user",
)


# ---------------------------------------------------------------------------------------
# Amounts: what the "amount" column shows depends on the resource type and the I/O choice


def amount_expression(io: str = ""):
    """Tokens (input, output or both, per `io`) for token events; the quantity otherwise
    (bytes for storage, pages for OCR)."""
    tokens = {
        "input": F("input_tokens"),
        "output": F("output_tokens"),
    }.get(io, F("input_tokens") + F("output_tokens"))
    return Case(
        When(resource_type=ResourceType.TOKENS, then=tokens),
        default=F("quantity"),
        output_field=BigIntegerField(),
    )


def event_amount(event: UsageEvent, io: str = "") -> int:
    if event.resource_type != ResourceType.TOKENS:
        return event.quantity
    if io == "input":
        return event.input_tokens
    if io == "output":
        return event.output_tokens
    return event.input_tokens + event.output_tokens


def format_bytes(value: int) -> str:
    """Decimal units, as storage is billed: 1 KB = 1,000 bytes."""
    if value < 1000:
        return f"{value:,} B"
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if value >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,} B"  # pragma: no cover - unreachable


def format_amount(value: int, resource_type: str) -> str:
    if resource_type == ResourceType.STORAGE:
        return format_bytes(value)
    if resource_type == ResourceType.OCR:
        return f"{value:,} page" + ("" if value == 1 else "s")
    return f"{value:,} token" + ("" if value == 1 else "s")


def format_event_cost(nanos: int) -> str:
    """A single call's cost: cheap calls keep their digits ($0.000042, not $0.00)."""
    sign = "-" if nanos < 0 else ""
    usd = abs(nanos) / NANOS_PER_USD
    if usd == 0:
        return "$0"
    if usd < 0.01:
        return f"{sign}${usd:.6f}"
    return f"{sign}${usd:,.4f}"


def usd_text(nanos: int) -> str:
    """Exact decimal dollars from integer nano-dollars (no float on the way)."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


# ---------------------------------------------------------------------------------------
# The filter


class EventLogFilter(UsageFilter):
    """The global filter bar plus the events log's raw-only filters."""

    resource = django_filters.ChoiceFilter(
        field_name="resource_type",
        choices=ResourceType.choices,
        label="Resource",
        empty_label="All resources",
    )
    pool = django_filters.ChoiceFilter(
        choices=POOL_CHOICES, method="filter_pool", label="Pool", empty_label="All pools"
    )
    io = django_filters.ChoiceFilter(
        choices=IO_CHOICES[1:], method="filter_nothing", label="Amount", empty_label="In + out"
    )
    request_id = django_filters.CharFilter(method="filter_request_id", label="Request ID")
    amount_min = django_filters.NumberFilter(method="filter_nothing", min_value=0)
    amount_max = django_filters.NumberFilter(method="filter_nothing", min_value=0)

    def __init__(self, data=None, *args, period: Period | None = None, **kwargs):
        super().__init__(data, *args, **kwargs)
        if period is not None:
            # An export running later must read the same window the person asked for.
            self._period = period

    def filter_nothing(self, queryset, name, value):
        return queryset  # applied together in filter_queryset

    def filter_pool(self, queryset, name, value):
        return queryset.filter(pool_category="" if value == NO_POOL else value)

    def filter_request_id(self, queryset, name, value):
        # A prefix search: a pasted id matches itself, and the unique (organization,
        # request_id) index can answer it.
        term = value.strip()
        return queryset.filter(request_id__startswith=term) if term else queryset

    def filter_queryset(self, queryset):
        queryset = super().filter_queryset(queryset)
        low = self.form.cleaned_data.get("amount_min")
        high = self.form.cleaned_data.get("amount_max")
        if low is None and high is None:
            return queryset
        queryset = queryset.alias(_amount=amount_expression(self.amount_io))
        if low is not None:
            queryset = queryset.filter(_amount__gte=low)
        if high is not None:
            queryset = queryset.filter(_amount__lte=high)
        return queryset

    @property
    def amount_io(self) -> str:
        if self.is_bound and self.is_valid():
            return self.form.cleaned_data.get("io") or ""
        return ""

    @property
    def raw_only(self) -> bool:
        """True when a chosen filter is one the roll-ups do not have."""
        return any(self.data.get(name) for name in RAW_ONLY_PARAMS)

    def describe(self) -> str:
        extra = []
        data = self.form.cleaned_data if self.is_bound and self.is_valid() else {}
        if data.get("resource"):
            extra.append(f"{data['resource']} events")
        if data.get("pool"):
            extra.append("no pool" if data["pool"] == NO_POOL else f"pool {data['pool']}")
        low, high = data.get("amount_min"), data.get("amount_max")
        if low is not None or high is not None:
            what = {"input": "input", "output": "output"}.get(self.amount_io, "total")
            if low is not None and high is not None:
                bounds = f"{low:,}–{high:,}"
            else:
                bounds = f"at least {low:,}" if low is not None else f"at most {high:,}"
            extra.append(f"{what} amount {bounds}")
        if data.get("request_id"):
            extra.append(f"request id starting {data['request_id']!r}")
        base = super().describe()
        return f"{', '.join(extra)} {base}".strip() if extra else base


def log_filter(data, user, *, period: Period | None = None, request=None) -> EventLogFilter:
    """The events log's filter over what `user` may see (the gate, always)."""
    return EventLogFilter(
        data,
        queryset=visible_events(user),
        request=request if request is not None else SimpleNamespace(user=user),
        period=period,
    )


# ---------------------------------------------------------------------------------------
# Columns and sorting


@dataclass(frozen=True)
class LogColumn:
    key: str
    label: str
    kind: str  # time | text | int | amount | ms | status | money
    expression: Callable[[str], object]  # io -> sort expression
    numeric: bool = False

    @property
    def default_descending(self) -> bool:
        return self.numeric or self.kind == "time"


def _field(name: str):
    return lambda io: F(name)


def _name(path: str):
    # Events without a user/team/project sort as "" (first ascending, last descending).
    return lambda io: Coalesce(F(path), Value(""))


COLUMNS: dict[str, LogColumn] = {
    c.key: c
    for c in (
        LogColumn("time", "Time", "time", _field("timestamp")),
        LogColumn("user", "User", "user", _name("user__email")),
        LogColumn("team", "Team", "text", _name("team__name")),
        LogColumn("project", "Project", "text", _name("project__name")),
        LogColumn("model", "Model", "text", _field("model")),
        LogColumn("operation", "Operation", "text", _field("operation")),
        LogColumn("input", "Input", "int", _field("input_tokens"), numeric=True),
        LogColumn("cached", "Cached", "int", _field("cached_input_tokens"), numeric=True),
        LogColumn("output", "Output", "int", _field("output_tokens"), numeric=True),
        LogColumn("amount", "Amount", "amount", amount_expression, numeric=True),
        LogColumn("resource", "Resource", "text", _field("resource_type")),
        LogColumn("pool", "Pool", "text", _field("pool_category")),
        LogColumn("latency", "Latency", "ms", _field("latency_ms"), numeric=True),
        LogColumn("status", "Status", "status", _field("status_code"), numeric=True),
        LogColumn("cost", "Cost", "money", _field("cost_nanos"), numeric=True),
        LogColumn("request_id", "Request ID", "text", _field("request_id")),
        LogColumn("endpoint", "Endpoint", "text", _field("endpoint")),
        LogColumn("session", "Session", "text", _field("session_id")),
    )
}
DEFAULT_SORT = "time"


@dataclass(frozen=True)
class Ordering:
    column: str = DEFAULT_SORT
    descending: bool = True
    io: str = ""

    @classmethod
    def parse(cls, sort: str | None, direction: str | None, io: str = "") -> "Ordering":
        column = COLUMNS.get(sort or "") or COLUMNS[DEFAULT_SORT]
        if direction in ("asc", "desc"):
            descending = direction == "desc"
        else:
            descending = column.default_descending
        return cls(column.key, descending, io)

    @property
    def direction(self) -> str:
        return "desc" if self.descending else "asc"

    @property
    def token(self) -> str:
        """What a cursor must have been made under to be used with this ordering."""
        io = self.io if self.column == "amount" else ""
        return f"{self.column}.{self.direction}.{io}"

    def apply(self, qs: QuerySet, *, reverse: bool = False) -> QuerySet:
        qs = qs.annotate(_sort=COLUMNS[self.column].expression(self.io))
        descending = self.descending != reverse
        if descending:
            return qs.order_by(F("_sort").desc(), F("id").desc())
        return qs.order_by(F("_sort").asc(), F("id").asc())

    def seek(self, value, pk: int, *, backwards: bool = False) -> Q:
        """Rows strictly after (value, pk) in this order (before it when `backwards`).

        The redundant inclusive bound lets an index on the sort column start its scan at
        the cursor instead of filtering its way there.
        """
        if self.descending != backwards:
            return Q(_sort__lte=value) & (Q(_sort__lt=value) | Q(_sort=value, id__lt=pk))
        return Q(_sort__gte=value) & (Q(_sort__gt=value) | Q(_sort=value, id__gt=pk))


def encode_cursor(ordering: Ordering, value, pk: int) -> str:
    if isinstance(value, datetime):
        value = {"t": value.astimezone(UTC).isoformat()}
    raw = json.dumps([ordering.token, value, pk], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()


def decode_cursor(token: str | None, ordering: Ordering) -> tuple | None:
    """(value, pk), or None for a missing, malformed or other-ordering cursor."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        made_for, value, pk = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        return None
    if made_for != ordering.token or not isinstance(pk, int):
        return None
    if isinstance(value, dict) and "t" in value:
        try:
            value = datetime.fromisoformat(value["t"])
        except (TypeError, ValueError):
            return None
    column = COLUMNS[ordering.column]
    expected = datetime if column.kind == "time" else int if column.numeric else str
    if not isinstance(value, expected) or isinstance(value, bool):
        return None
    if isinstance(value, datetime) and value.tzinfo is None:
        return None
    return value, pk


# ---------------------------------------------------------------------------------------
# Pages


@dataclass
class LogPage:
    rows: list[UsageEvent]
    number: int
    has_next: bool
    has_previous: bool
    next_cursor: str | None = None
    previous_cursor: str | None = None


def _finish(qs, ordering, keys, number, has_next, has_previous) -> LogPage:
    """The page of `keys` [(sort value, id)], loaded in that order."""
    return LogPage(
        rows=_load(qs, keys),
        number=number,
        has_next=has_next,
        has_previous=has_previous,
        next_cursor=encode_cursor(ordering, *keys[-1]) if keys and has_next else None,
        previous_cursor=encode_cursor(ordering, *keys[0]) if keys and has_previous else None,
    )


def _load(qs: QuerySet, keys: list[tuple]) -> list[UsageEvent]:
    # Two steps: the ordering and the seek read only the events table (and a name for
    # the user/team/project sorts); the 25 rows found are then loaded by primary key with
    # their names. Joining first would join every row of the range before the sort.
    wanted = [pk for _, pk in keys]
    loaded = qs.filter(pk__in=wanted).select_related("user", "team", "project").defer("metadata")
    by_id = {event.pk: event for event in loaded}
    return [by_id[pk] for pk in wanted if pk in by_id]


def _keyed(rows: QuerySet, ordering: Ordering, seek: tuple | None, backwards: bool) -> QuerySet:
    """(sort value, id) of `rows` in `ordering` (reversed when `backwards`), after `seek`."""
    rows = ordering.apply(rows, reverse=backwards)
    if seek is not None:
        rows = rows.filter(ordering.seek(*seek, backwards=backwards))
    return rows.values_list("_sort", "id")


def _keys(
    qs: QuerySet,
    ordering: Ordering,
    parts: list[QuerySet] | None,
    *,
    seek: tuple | None = None,
    backwards: bool = False,
    offset: int = 0,
    limit: int,
) -> list[tuple]:
    """(sort value, id) of rows offset .. offset + limit of `qs` in `ordering` (reversed
    when `backwards`), after `seek` when given.

    With `parts` (`log_parts`: `qs` read part by part of the gate), the parts are read
    merged in index order (`_merged`)."""
    if not parts or len(parts) == 1:
        return list(_keyed(qs, ordering, seek, backwards)[offset : offset + limit])
    merged, params = _merged(parts, ordering, offset + limit, seek=seek, backwards=backwards)
    direction = "DESC" if ordering.descending != backwards else "ASC"
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT _sort, id FROM ({merged}) m "
            f"ORDER BY _sort {direction}, id {direction} OFFSET %s",
            [*params, offset],
        )
        return [tuple(row) for row in cursor.fetchall()]


def fetch_page(
    qs: QuerySet,
    ordering: Ordering,
    *,
    after: str | None = None,
    before: str | None = None,
    page: int = 1,
    size: int = PAGE_SIZE,
    parts: list[QuerySet] | None = None,
) -> LogPage:
    """One page of `qs` in `ordering`: after a cursor, before one, or page number `page`.

    `parts`: see `_keys` (PostgreSQL only; `log_parts` says when they help)."""
    number = max(page, 1)
    if (position := decode_cursor(after, ordering)) is not None:
        keys = _keys(qs, ordering, parts, seek=position, limit=size + 1)
        return _finish(qs, ordering, keys[:size], max(number, 2), len(keys) > size, True)
    if (position := decode_cursor(before, ordering)) is not None:
        keys = _keys(qs, ordering, parts, seek=position, backwards=True, limit=size + 1)
        if len(keys) > size:
            return _finish(qs, ordering, keys[:size][::-1], max(number, 1), True, True)
        # Reached the top: show the first page as it is now (newer rows may have arrived).
        number = 1
    if number > 1:
        # The offset walks only the narrow (sort value, id) pairs; from then on the
        # Older/Newer links seek from this page's cursors.
        offset = (number - 1) * size
        keys = _keys(qs, ordering, parts, offset=offset, limit=size + 1)
        if not keys:
            return LogPage(rows=[], number=number, has_next=False, has_previous=True)
        return _finish(qs, ordering, keys[:size], number, len(keys) > size, True)
    keys = _keys(qs, ordering, parts, limit=size + 1)
    return _finish(qs, ordering, keys[:size], 1, len(keys) > size, False)


def log_parts(flt: "EventLogFilter") -> list[QuerySet] | None:
    """The viewer's scope in parts for `fetch_page`, or None where one query is best: the
    log's filters and period over each part of the gate (`visible_event_parts`).

    An org admin's log is one indexed predicate (the organization). A member's or team
    lead's is an OR (own events, own tokens, the team): read as one query, PostgreSQL
    would sort every row of the scope for each page; read part by part, each part walks
    its own index in order and stops after the page.
    """
    if connection.vendor != "postgresql" or not flt.is_bound or not flt.is_valid():
        return None
    scope = viewer_scope(flt.viewer)
    org = flt.selected_org()
    if scope.everything or (org is not None and scope.covers_whole_orgs((org.id,))):
        return None
    parts = visible_event_parts(flt.viewer, (org.id,) if org is not None else ())
    if len(parts) < 2:
        return None
    period = flt.period
    return [
        flt.filter_queryset(part).filter(timestamp__gte=period.start, timestamp__lt=period.end)
        for part in parts
    ]


# ---------------------------------------------------------------------------------------
# Counting


@dataclass(frozen=True)
class LogCount:
    value: int
    kind: str  # exact | estimate | at_least

    @property
    def exact(self) -> bool:
        return self.kind == "exact"

    def pages(self, size: int = PAGE_SIZE) -> int:
        return max(1, -(-self.value // size))

    @property
    def label(self) -> str:
        noun = "event" if self.value == 1 else "events"
        if self.kind == "exact":
            return f"{self.value:,} {noun}"
        if self.kind == "estimate":
            return f"about {about(self.value)} {noun}"
        return f"more than {self.value:,} {noun}"


def about(n: int) -> str:
    """1234567 -> '1.2 million'; 45678 -> '46,000'."""
    if n >= 10**9:
        return f"{n / 10**9:.1f} billion"
    if n >= 10**6:
        return f"{n / 10**6:.1f} million"
    if n >= 1000:
        digits = len(str(n)) - 2
        return f"{round(n, -digits):,}"
    return f"{n:,}"


def count_events(flt: EventLogFilter, cap: int | None = None) -> LogCount:
    """Exact up to `cap`; beyond, the roll-ups' count when they can answer, else a floor."""
    cap = COUNT_CAP if cap is None else cap
    estimate = _rollup_estimate(flt, cap)
    if estimate is not None:
        return estimate
    return _counted(bounded_count(flt.qs, cap, log_parts(flt)), cap)


def _rollup_estimate(flt: EventLogFilter, cap: int) -> LogCount | None:
    """The roll-ups' count when they can answer and it is over `cap`, else None.

    The roll-ups answer first (a few rows): a large selection is then never counted row
    by row, and only a small one is counted exactly from its events."""
    selection = flt.selection() if not flt.raw_only else None
    if selection is not None:
        estimate = totals(selection).requests
        if estimate > cap:
            return LogCount(estimate, "estimate")
    return None


def _counted(seen: int, cap: int) -> LogCount:
    if seen <= cap:
        return LogCount(seen, "exact")
    return LogCount(cap, "at_least")  # raw-only filters, or events arrived meanwhile


def log_page(
    flt: EventLogFilter,
    ordering: Ordering,
    *,
    after: str | None = None,
    before: str | None = None,
    page: int = 1,
    size: int = PAGE_SIZE,
) -> tuple[LogCount, LogPage]:
    """The log's count (`count_events`) and one page of it (`fetch_page`), a page number
    past the end showing the last page.

    A partial scope's numbered page past the first is read with its count in one
    statement (`_keys_and_count`): both take each part's first rows in one order, so one
    read of the longer run of rows serves both."""
    parts = log_parts(flt)
    number = max(page, 1)
    cursor = decode_cursor(after, ordering) or decode_cursor(before, ordering)
    estimate = _rollup_estimate(flt, COUNT_CAP)
    if estimate is None and parts and number > 1 and cursor is None:
        keys, seen = _keys_and_count(
            flt.qs, ordering, parts, offset=(number - 1) * size, limit=size + 1, cap=COUNT_CAP
        )
        count = _counted(seen, COUNT_CAP)
        if keys:
            return count, _finish(flt.qs, ordering, keys[:size], number, len(keys) > size, True)
    else:
        count = estimate or _counted(bounded_count(flt.qs, COUNT_CAP, parts), COUNT_CAP)
    if count.exact:
        number = min(number, count.pages(size))
    kwargs = {"after": after, "before": before, "page": number, "size": size, "parts": parts}
    return count, fetch_page(flt.qs, ordering, **kwargs)


def _merged(
    parts: list[QuerySet],
    ordering: Ordering,
    n: int,
    *,
    seek: tuple | None = None,
    backwards: bool = False,
) -> tuple[str, list]:
    """SQL (and its parameters) of the first `n` distinct (_sort, id) rows of `parts` in
    `ordering` (reversed when `backwards`), after `seek` when given (PostgreSQL).

    Each part is read in its index order, up to `n` rows; the parts are merged in that
    order (Merge Append) and a row two parts share is dropped where the two copies meet
    (Unique). The merge stops after `n` distinct rows, so the parts together read about
    `n` rows, not `n` each, and nothing is hashed or sorted."""
    first, *rest = (_keyed(part, ordering, seek, backwards)[:n] for part in parts)
    sql, params = first.union(*rest, all=True).query.sql_with_params()
    direction = "DESC" if ordering.descending != backwards else "ASC"
    statement = (
        f"SELECT DISTINCT _sort, id FROM ({sql}) u "
        f"ORDER BY _sort {direction}, id {direction} LIMIT {int(n)}"
    )
    return statement, list(params)


def _keys_and_count(
    qs: QuerySet, ordering: Ordering, parts: list[QuerySet], *, offset: int, limit: int, cap: int
) -> tuple[list[tuple], int]:
    """`_keys(offset=offset, limit=limit)` and `bounded_count(cap)` of `qs` in `parts`,
    from one read of the first max(offset + limit, cap + 1) distinct rows of the parts
    merged in `ordering` (`_merged`, PostgreSQL).

    The count is exact up to `cap`: the merge brings `cap` + 1 distinct rows when there
    are more, and otherwise every row."""
    merged, params = _merged(parts, ordering, max(offset + limit, cap + 1))
    direction = "DESC" if ordering.descending else "ASC"
    statement = (
        f"WITH d AS MATERIALIZED ({merged}) "
        "(SELECT NULL, NULL, count(*), 0 FROM d) UNION ALL "
        f"(SELECT _sort, id, NULL, row_number() OVER (ORDER BY _sort {direction}, id {direction}) "
        f"FROM d ORDER BY _sort {direction}, id {direction} OFFSET %s LIMIT %s)"
    )
    with connection.cursor() as cursor:
        # Our own compiled SQL; the values travel as parameters.
        cursor.execute(statement, [*params, offset, limit])
        rows = cursor.fetchall()
    seen = next(n for _sort, _pk, n, _place in rows if n is not None)
    page = sorted((place, sort, pk) for sort, pk, n, place in rows if n is None)
    return [(sort, pk) for _place, sort, pk in page], seen


def bounded_count(qs: QuerySet, cap: int, parts: list[QuerySet] | None = None) -> int:
    """How many rows, reading at most cap + 1 of them (with `parts`, the first cap + 1
    distinct rows of the parts merged in the log's default order, `_merged`: exact up
    to `cap`, more than `cap` beyond)."""
    if not parts or len(parts) == 1:
        return qs.order_by()[: cap + 1].count()
    # In the log's default order, so each part walks its (org, part, time, id) index,
    # which holds the amount: the filters are checked without visiting the rows.
    merged, params = _merged(parts, Ordering(), cap + 1)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM ({merged}) m", params)
        return cursor.fetchone()[0]


# ---------------------------------------------------------------------------------------
# Sessions (the user detail page)


def sessions_of(qs: QuerySet, limit: int = 50) -> list[dict]:
    """Per-session totals of `qs` (already gated and period-bounded), latest first."""
    rows = (
        qs.exclude(session_id="")
        .values("session_id")
        .annotate(
            requests=Count("id"),
            failed=Count("id", filter=Q(status_code__gte=400)),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            cost_nanos=Sum("cost_nanos"),
            first=Min("timestamp"),
            last=Max("timestamp"),
        )
        .order_by("-last", "session_id")
    )
    return list(rows[:limit])


# ---------------------------------------------------------------------------------------
# CSV export


@dataclass(frozen=True)
class ExportColumn:
    header: str
    field: str
    convert: Callable | None = None


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


EXPORT_COLUMNS = (
    ExportColumn("timestamp (UTC, RFC 3339)", "timestamp", _rfc3339),
    ExportColumn("request_id", "request_id"),
    ExportColumn("organization", "organization__slug"),
    ExportColumn("user_email", "user__email"),
    ExportColumn("team", "team__slug"),
    ExportColumn("project", "project__slug"),
    ExportColumn("api_token_prefix", "api_token__prefix"),
    ExportColumn("model", "model"),
    ExportColumn("provider", "provider"),
    ExportColumn("operation", "operation"),
    ExportColumn("resource_type", "resource_type"),
    ExportColumn("input_tokens", "input_tokens"),
    ExportColumn("cached_input_tokens", "cached_input_tokens"),
    ExportColumn("cache_write_tokens", "cache_write_tokens"),
    ExportColumn("output_tokens", "output_tokens"),
    ExportColumn("reasoning_tokens", "reasoning_tokens"),
    ExportColumn("quantity (bytes for storage, pages for ocr)", "quantity"),
    ExportColumn("latency_ms", "latency_ms"),
    ExportColumn("status_code", "status_code"),
    ExportColumn("cost_usd", "cost_nanos", usd_text),
    ExportColumn("cost_source", "cost_source"),
    ExportColumn("pool_category", "pool_category"),
    ExportColumn("end_user", "end_user"),
    ExportColumn("session_id", "session_id"),
    ExportColumn("assistant", "assistant"),
    ExportColumn("workflow", "workflow"),
    ExportColumn("workflow_run_id", "workflow_run_id"),
    ExportColumn("workflow_status", "workflow_status"),
    ExportColumn("client", "client"),
    ExportColumn("endpoint", "endpoint"),
)
EXPORT_HEADER = [c.header for c in EXPORT_COLUMNS]
EXPORT_CHUNK = 2000


def export_rows(qs: QuerySet, ordering: Ordering) -> Iterator[list]:
    """The rows of `qs` for CSV, in the log's order, read through a server-side cursor.

    Only the exported columns are selected (values_list); the joined tables are small
    lookups. On PostgreSQL `.iterator()` streams with a named cursor, so memory stays
    flat whatever the row count.
    """
    fields = [c.field for c in EXPORT_COLUMNS]
    converters = [(i, c.convert) for i, c in enumerate(EXPORT_COLUMNS) if c.convert]
    rows = ordering.apply(qs).values_list(*fields).iterator(chunk_size=EXPORT_CHUNK)
    for row in rows:
        row = list(row)
        for i, convert in converters:
            if row[i] is not None:
                row[i] = convert(row[i])
        yield row


def export_filename(now: datetime | None = None) -> str:
    return f"events-{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}.csv"


# -- Background exports: progress lives in the cache, the file under DATA_DIR/exports ----

EXPORT_TTL = timedelta(days=1)
PROGRESS_EVERY = 5000


def _export_key(export_id: str) -> str:
    return f"events-export:v1:{export_id}"


def export_path(export_id: str) -> Path:
    return Path(settings.EXPORTS_DIR) / f"{uuid.UUID(export_id)}.csv"


def export_status(export_id: str) -> dict | None:
    return cache.get(_export_key(export_id))


def _save_status(job: dict) -> None:
    cache.set(_export_key(job["id"]), job, timeout=int(EXPORT_TTL.total_seconds()))


def export_request(
    *, user: User, params: str, period: Period, total: int, total_exact: bool = True
) -> dict:
    """Record a background export of the log `params` select for `user`; returns the job.

    The period is pinned to absolute instants now, so "last 7 days" means the same
    window when the worker runs.
    """
    job = {
        "id": str(uuid.uuid4()),
        "user_id": user.pk,
        "params": params,
        "start": period.start.isoformat(),
        "end": period.end.isoformat(),
        "tz": period.tz.key,
        "state": "queued",
        "done": 0,
        "total": total,
        # False when the count stopped at a floor ("more than 100,000"): no percentage.
        "total_known": total_exact,
        "filename": export_filename(),
        "error": "",
    }
    _save_status(job)
    return job


def export_write(*, export_id: str) -> dict:
    """Write the export `export_id` to its file, recording progress; returns the job."""
    job = export_status(export_id)
    if job is None:
        raise LookupError(f"No export {export_id} (expired?)")
    user = User.objects.get(pk=job["user_id"], is_active=True)
    data = QueryDict(job["params"])
    probe = log_filter(data, user)
    period = Period(
        start=datetime.fromisoformat(job["start"]),
        end=datetime.fromisoformat(job["end"]),
        preset="custom",
        label=probe.period.label,
        tz=probe.period.tz,
    )
    flt = log_filter(data, user, period=period)
    ordering = Ordering.parse(data.get("sort"), data.get("dir"), flt.amount_io)
    path = export_path(export_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_old_exports(path.parent)
    partial = path.with_suffix(".part")
    job.update(state="running", done=0)
    _save_status(job)
    done = 0
    try:
        with partial.open("w", newline="", encoding="utf-8") as out:
            for line in csv_rows(EXPORT_HEADER, export_rows(flt.qs, ordering)):
                out.write(line)
                done += 1
                if done % PROGRESS_EVERY == 0:
                    job["done"] = done - 1  # the header is not a row
                    _save_status(job)
        os.replace(partial, path)
    except Exception as exc:
        logger.exception("Events export %s failed", export_id)
        partial.unlink(missing_ok=True)
        job.update(state="failed", error=str(exc)[:200])
        _save_status(job)
        return job  # the progress page says so; eager mode must not fail the request
    job.update(state="done", done=done - 1, total=done - 1, total_known=True)
    _save_status(job)
    return job


def _remove_old_exports(folder: Path) -> None:
    """Exports are kept for a day (as their progress records are)."""
    limit = time.time() - EXPORT_TTL.total_seconds()
    for old in folder.glob("*.csv"):
        try:
            if old.stat().st_mtime < limit:
                old.unlink()
        except OSError:
            continue
