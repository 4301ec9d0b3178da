"""Viewer roll-ups: every partial scope counted on its own.

A team lead, a project admin or a member sees the union of parts of an organization: their
own events, the teams they lead, the projects they administer, the API tokens they own.
The shared roll-ups hold each part, so a partial scope's totals are read behind the
visibility predicate and its latency histogram is the parts' histograms added and
subtracted (inclusion-exclusion): correct, but a project admin's 90 days are hundreds of
thousands of rows. The viewer roll-ups count each event once more for every viewer who
sees it (its sender, and every viewer linked to its team, project or token), by local day
in the organization's zone, so such a viewer reads a few thousand rows of their own:

- ViewerUsageDaily: model x operation x status (metrics, series, models, top models);
- ViewerActorDaily: user x token x assistant x workflow (active users / assistants /
  workflows, top users, ranked tokens);
- ViewerHistogramDaily: operation x latency bucket (p95);
- ViewerUsageHourly, ViewerActorHourly: the first two by UTC hour, for the partial days
  at a range's edges.

Viewer 0 (WHOLE_ORGANIZATION) counts every event of the organization: an org admin's
charts of local days read it and move no pieces between UTC days.

The same statements as the shared roll-ups keep them (ingest, fold, bulk load, day
rebuild: `viewer_rollup_sql`, and `ViewerMap` in Python for SQLite), fanning each event
out through ViewerLink, the links the rows were counted with. An organization's rows are
read once `build_organization` counted its stored events (ViewerCalendar.ready); a change
of roles or tokens makes a viewer's links differ from their scope, and then readers use
the shared roll-ups (`viewer_rows_ready` says so) until `rebuild_viewer` recounts that
viewer's rows. Builds and rebuilds count a local day per transaction under the
organization's fold lock, so they never interleave with a fold and never hold it long;
events still pending are left to their fold.
"""

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from django.core.cache import cache
from django.db import connection, transaction

from accounts.models import ApiToken, Membership, Organization, Role

from .models import (
    HOUR_SECONDS,
    RollupPending,
    UsageEvent,
    ViewerActorDaily,
    ViewerActorHourly,
    ViewerCalendar,
    ViewerHistogramDaily,
    ViewerLink,
    ViewerLinkKind,
    ViewerUsageDaily,
    ViewerUsageHourly,
)

log = logging.getLogger(__name__)

VIEWER_USAGE_KEYS = ("organization_id", "viewer_id", "bucket", "model", "operation", "status_code")
VIEWER_ACTOR_KEYS = (
    "organization_id",
    "viewer_id",
    "bucket",
    "user_id",
    "api_token_id",
    "assistant",
    "workflow",
)
VIEWER_HIST_KEYS = ("organization_id", "viewer_id", "bucket", "operation", "latency_bucket")
VIEWER_DAILY = (ViewerUsageDaily, ViewerActorDaily, ViewerHistogramDaily)
VIEWER_HOURLY = (ViewerUsageHourly, ViewerActorHourly)
VIEWER_TABLES = (*VIEWER_DAILY, *VIEWER_HOURLY)
# The viewer id of rows counting every event of the organization (readers who see it
# whole: the org roll-ups by local day, so their charts of local days move no pieces).
WHOLE_ORGANIZATION = 0
# The event column each kind of link matches.
LINK_COLUMNS = {
    ViewerLinkKind.TEAM.value: "team_id",
    ViewerLinkKind.PROJECT.value: "project_id",
    ViewerLinkKind.TOKEN.value: "api_token_id",
}


# ---------------------------------------------------------------------------------------
# Links: what each viewer sees of an organization besides their own events


def current_links(org_id: int, viewer_ids: Iterable[int] | None = None) -> set[tuple]:
    """{(kind, part id, viewer id)} from today's roles and token owners in `org_id`."""
    roles = Membership.objects.filter(
        organization_id=org_id, role__in=(Role.TEAM_LEAD, Role.PROJECT_ADMIN)
    )
    tokens = ApiToken.objects.filter(organization_id=org_id, owner__isnull=False)
    if viewer_ids is not None:
        viewer_ids = list(viewer_ids)
        roles = roles.filter(user_id__in=viewer_ids)
        tokens = tokens.filter(owner_id__in=viewer_ids)
    links = set()
    for role, team_id, project_id, user_id in roles.values_list(
        "role", "team_id", "project_id", "user_id"
    ):
        if role == Role.TEAM_LEAD and team_id:
            links.add((ViewerLinkKind.TEAM.value, team_id, user_id))
        elif role == Role.PROJECT_ADMIN and project_id:
            links.add((ViewerLinkKind.PROJECT.value, project_id, user_id))
    for token_id, owner_id in tokens.values_list("id", "owner_id"):
        links.add((ViewerLinkKind.TOKEN.value, token_id, owner_id))
    return links


def _building(org_id: int, viewer_id: int, zones: list, stored: set) -> bool:
    """Whether the organization's or the viewer's rows are being counted right now."""
    if zones:
        return any(kind == ViewerLinkKind.REBUILDING for kind, _part in stored)
    return ViewerCalendar.objects.filter(organization_id=org_id, ready=False).exists()


def stored_links(org_id: int, viewer_ids: Iterable[int] | None = None) -> set[tuple]:
    rows = ViewerLink.objects.filter(organization_id=org_id)
    if viewer_ids is not None:
        rows = rows.filter(viewer_id__in=list(viewer_ids))
    return set(rows.values_list("kind", "part_id", "viewer_id"))


def viewer_rows_ready(
    org_id: int, viewer_id: int, links: set[tuple[str, int]], *, _rechecked: bool = False
) -> str | None:
    """The zone of the viewer roll-ups' days when `viewer_id`'s rows in `org_id` were
    counted with exactly `links` ({(kind, part id)}: their scope in that organization
    today), else None: the rows are not built, or the viewer's roles or tokens changed
    since (a rebuild is then requested, and the shared roll-ups answer meanwhile). The
    WHOLE_ORGANIZATION rows have no links: they are ready once the organization's are."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT timezone, NULL, NULL FROM {ViewerCalendar._meta.db_table} "
            "WHERE organization_id = %s AND ready UNION ALL "
            f"SELECT NULL, kind, part_id FROM {ViewerLink._meta.db_table} "
            "WHERE organization_id = %s AND viewer_id = %s",
            [org_id, org_id, viewer_id],
        )
        rows = cursor.fetchall()
    zones = [tz for tz, _kind, _part in rows if tz is not None]
    stored = {(kind, part) for tz, kind, part in rows if tz is None}
    if zones and stored == set(links):
        return zones[0]
    if _rechecked or _building(org_id, viewer_id, zones, stored):
        return None  # being counted now: the shared roll-ups answer meanwhile
    if request_rebuild(org_id, viewer_id if zones else None):
        # Rebuilt here and now (eager tasks: the embedded default, tests): look again.
        return viewer_rows_ready(org_id, viewer_id, links, _rechecked=True)
    return None


# ---------------------------------------------------------------------------------------
# The fan-out in Python (SQLite's ingestion, reconciliation)


@dataclass
class ViewerMap:
    """An organization's viewer links and day zone, for counting events in Python."""

    tz: ZoneInfo
    by_column: dict[str, dict[int, set[int]]] = field(default_factory=dict)

    def viewers(self, fact) -> set[int]:
        found = {WHOLE_ORGANIZATION, fact.user_id} if fact.user_id else {WHOLE_ORGANIZATION}
        for column, parts in self.by_column.items():
            part_id = getattr(fact, column)
            if part_id in parts:
                found |= parts[part_id]
        return found

    def day(self, ts: datetime) -> int:
        return local_day_start(ts, self.tz)


def local_day_start(ts: datetime, tz: ZoneInfo) -> int:
    """UTC epoch of the local midnight starting `ts`'s day in `tz` (PostgreSQL's
    date_trunc('day', ts, zone): a midnight that does not exist is read in the offset
    before the change, like Python's fold=0)."""
    local = ts.astimezone(tz)
    return int(datetime(local.year, local.month, local.day, tzinfo=tz).timestamp())


def viewer_maps(org_ids: Iterable[int]) -> dict[int, ViewerMap]:
    """{organization id: ViewerMap} of the organizations whose viewer rows are kept."""
    maps = {
        org_id: ViewerMap(ZoneInfo(tz))
        for org_id, tz in ViewerCalendar.objects.filter(
            organization_id__in=list(org_ids)
        ).values_list("organization_id", "timezone")
    }
    if maps:
        links = ViewerLink.objects.filter(organization_id__in=list(maps)).values_list(
            "organization_id", "kind", "part_id", "viewer_id"
        )
        for org_id, kind, part_id, viewer_id in links:
            column = LINK_COLUMNS.get(kind)
            if column is None:
                continue  # the REBUILDING mark, not a part
            maps[org_id].by_column.setdefault(column, defaultdict(set))[part_id].add(viewer_id)
    return maps


def viewer_rollups(facts: Iterable, maps: dict[int, ViewerMap], measures) -> dict:
    """{model: {key: measures}} of the viewer roll-ups for `facts` (aggregates.EventFacts
    of organizations in `maps`); `measures(fact)` gives a fact's MEASURES values."""
    from .aggregates import _add, latency_bucket

    usage: dict[tuple, list[int]] = {}
    actors: dict[tuple, list[int]] = {}
    hist: dict[tuple, list[int]] = defaultdict(lambda: [0])
    usage_hours: dict[tuple, list[int]] = {}
    actor_hours: dict[tuple, list[int]] = {}
    for f in facts:
        found = maps.get(f.organization_id)
        if found is None:
            continue
        viewers = found.viewers(f)
        if not viewers:
            continue
        day = found.day(f.timestamp)
        ts = int(f.timestamp.timestamp())
        hour = ts - ts % HOUR_SECONDS
        values = measures(f)
        lb = latency_bucket(f.latency_ms)
        failed = 1 if f.status_code >= 400 else 0
        who = (f.user_id or 0, f.api_token_id or 0, f.assistant, f.workflow)
        for viewer in viewers:
            for bucket, by_model, by_actor in (
                (day, usage, actors),
                (hour, usage_hours, actor_hours),
            ):
                key = (f.organization_id, viewer, bucket, f.model, f.operation, f.status_code)
                _add(by_model.setdefault(key, [0] * len(values)), values)
                actor = by_actor.setdefault(
                    (f.organization_id, viewer, bucket, *who), [0] * (len(values) + 1)
                )
                _add(actor, values)
                actor[-1] += failed
            hist[(f.organization_id, viewer, day, f.operation, lb)][0] += 1
    return {
        ViewerUsageDaily: usage,
        ViewerActorDaily: actors,
        ViewerHistogramDaily: hist,
        ViewerUsageHourly: usage_hours,
        ViewerActorHourly: actor_hours,
    }


# ---------------------------------------------------------------------------------------
# The fan-out in SQL (PostgreSQL): ingestion, folds, bulk loads, rebuilds


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def viewer_rollup_sql(
    source: str, *, viewer_id: int | None = None, tables: tuple = VIEWER_TABLES
) -> list[str]:
    """Upserts adding the events of `source` (a table or a subquery with an alias, as for
    aggregates.rollup_sql) to the viewer roll-ups of organizations that keep them: each
    event once per viewer who sees it (or only for `viewer_id`). The events are first
    summed per (scope key, local day, table key), then each sum goes to the key's viewers,
    so a day of a large organization fans out a few thousand sums, not every event."""
    from .aggregates import LATENCY_BUCKET_SQL, upsert_select_sql

    calendar = _q(ViewerCalendar._meta.db_table)
    link = _q(ViewerLink._meta.db_table)
    day = "extract(epoch FROM date_trunc('day', e.\"timestamp\", c.timezone))::bigint"
    epoch = 'floor(extract(epoch FROM e."timestamp"))::bigint'
    hour = f"({epoch} - {epoch} % {HOUR_SECONDS})"
    scope = ["e.organization_id", "e.team_id", "e.project_id", "e.user_id", "e.api_token_id"]
    matches = " OR ".join(
        f"(l.kind = '{kind}' AND l.part_id = k.{column})" for kind, column in LINK_COLUMNS.items()
    )
    fan = (
        f"CROSS JOIN LATERAL (SELECT {WHOLE_ORGANIZATION}::bigint AS viewer_id "
        "UNION SELECT k.user_id WHERE k.user_id IS NOT NULL "
        f"UNION SELECT l.viewer_id FROM {link} l "
        f"WHERE l.organization_id = k.organization_id AND ({matches})) v"
    )
    only = f" WHERE v.viewer_id = {int(viewer_id)}" if viewer_id is not None else ""
    sums = {
        "requests": "count(*)",
        "input_tokens": "sum(e.input_tokens)",
        "cached_input_tokens": "sum(e.cached_input_tokens)",
        "cache_write_tokens": "sum(e.cache_write_tokens)",
        "output_tokens": "sum(e.output_tokens)",
        "reasoning_tokens": "sum(e.reasoning_tokens)",
        "quantity": "sum(e.quantity)",
        "cost_nanos": "sum(e.cost_nanos)",
        "latency_ms_sum": "sum(e.latency_ms)",
        "latency_ms_max": "max(e.latency_ms)",
        "unpriced_requests": "count(*) FILTER (WHERE e.cost_source = 'unpriced')",
        "failed_requests": "count(*) FILTER (WHERE e.status_code >= 400)",
        "count": "count(*)",
    }
    columns = {
        "model": "e.model",
        "operation": "e.operation",
        "status_code": "e.status_code",
        "user_id": "coalesce(e.user_id, 0)",
        "api_token_id": "coalesce(e.api_token_id, 0)",
        "assistant": "e.assistant",
        "workflow": "e.workflow",
        "latency_bucket": LATENCY_BUCKET_SQL.format(col="e.latency_ms"),
    }

    def positions(n: int) -> str:
        return ", ".join(str(i + 1) for i in range(n))

    def statement(model, keys: tuple, measures: tuple) -> str:
        own = [k for k in keys if k not in ("organization_id", "viewer_id", "bucket")]
        bucket = hour if model in VIEWER_HOURLY else day
        inner_keys = [*scope, f"{bucket} AS bucket", *(f"{columns[k]} AS k_{k}" for k in own)]
        inner = (
            f"SELECT {', '.join(inner_keys)}, "
            + ", ".join(f"{sums[m]} AS m_{m}" for m in measures)
            + f" FROM (SELECT * FROM {source}) e JOIN {calendar} c "
            f"ON c.organization_id = e.organization_id GROUP BY {positions(len(inner_keys))}"
        )
        totals = ", ".join(
            f"{'max' if m == 'latency_ms_max' else 'sum'}(k.m_{m})" for m in measures
        )
        select = (
            "SELECT k.organization_id, v.viewer_id, k.bucket, "
            + "".join(f"k.k_{k}, " for k in own)
            + f"{totals} FROM ({inner}) k {fan}{only} "
            f"GROUP BY {positions(len(keys))} ORDER BY {positions(len(keys))}"
        )
        return upsert_select_sql(model, keys, measures, select)

    return [
        statement(model, keys, measures)
        for model, keys, measures in table_keys()
        if model in tables
    ]


# ---------------------------------------------------------------------------------------
# Builds and rebuilds


def _events_source(org_id: int, where: str = "") -> str:
    """The stored events of `org_id` not pending for a fold, as a subquery with an alias
    (every value an integer or instant computed here, never input)."""
    from .aggregates import _not_pending

    table = _q(UsageEvent._meta.db_table)
    extra = f" AND ({where})" if where else ""
    return (
        f"(SELECT * FROM {table} ev WHERE ev.organization_id = {int(org_id)}{extra} "
        f"AND {_not_pending(org_id, 'ev')}) AS viewer_events"
    )


def _count_python(
    org_id: int, events, viewer_id: int | None = None, tables: tuple = VIEWER_TABLES
) -> None:
    """SQLite: count `events` (a queryset of the organization's events) into the viewer
    roll-ups (`tables`) with the stored links (only into `viewer_id`'s rows when given)."""
    from .aggregates import FACT_FIELDS, EventFacts, _measures, _upsert

    facts = (EventFacts(*row) for row in events.values_list(*FACT_FIELDS).iterator(2000))
    rows = viewer_rollups(facts, viewer_maps([org_id]), _measures)
    for model, keys, measures in table_keys():
        if model not in tables:
            continue
        found = sorted(
            key + tuple(values)
            for key, values in rows[model].items()
            if viewer_id is None or key[1] == viewer_id
        )
        _upsert(model, keys, measures, found)


def _lock(org_id: int) -> None:
    from .aggregates import _lock_org

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            _lock_org(cursor, org_id)


def refresh_organization(org_id: int) -> int:
    """Build `org_id`'s viewer roll-ups if it has none, else rebuild every viewer whose
    links differ from today's roles and tokens; returns how many viewers were rebuilt
    (-1 for a whole build)."""
    if not ViewerCalendar.objects.filter(organization_id=org_id, ready=True).exists():
        build_organization(org_id)
        return -1
    changed = sorted({v for _k, _p, v in current_links(org_id) ^ stored_links(org_id)})
    for viewer_id in changed:
        rebuild_viewer(org_id, viewer_id)
    return len(changed)


def _not_pending_q(org_id: int):
    from django.db.models import Exists, OuterRef

    pending = RollupPending.objects.filter(organization_id=org_id, event_id=OuterRef("id"))
    return ~Exists(pending)


def build_organization(org_id: int, *, count: bool = True) -> None:
    """(Re)count every stored event of `org_id` into the viewer roll-ups, with today's
    links and the organization's zone for the days: from then on they are kept.

    The calendar and links come first (unready), so every fold from then on counts its
    events too; then each local day is recounted in its own short transaction under the
    organization's fold lock (a large organization takes minutes, and folds, and the
    readers that fold first, wait for one day at a time, not for all of it); then the
    calendar is ready. With `count=False` it is ready at once, for a caller that counts
    every stored event itself before anyone reads (a bulk load's `bulk.count_days`)."""
    org = Organization.objects.filter(pk=org_id).first()
    if org is None:
        return
    with transaction.atomic():
        _lock(org_id)
        for model in (*VIEWER_TABLES, ViewerLink, ViewerCalendar):
            model.objects.filter(organization_id=org_id).delete()
        ViewerCalendar.objects.create(organization=org, timezone=org.timezone, ready=not count)
        ViewerLink.objects.bulk_create(
            ViewerLink(organization_id=org_id, kind=k, part_id=p, viewer_id=v)
            for k, p, v in sorted(current_links(org_id))
        )
    if not count:
        return
    for a, b in _local_days(org_id, ZoneInfo(org.timezone)):
        with transaction.atomic():
            _lock(org_id)
            _recount(org_id, a, b)
    ViewerCalendar.objects.filter(organization_id=org_id).update(ready=True)


def rebuild_viewer(org_id: int, viewer_id: int) -> None:
    """Recount one viewer's rows in `org_id` with their links of today (after a change of
    their roles or tokens), a local day per transaction like `build_organization`: the
    new links first, with a REBUILDING mark that keeps readers on the shared roll-ups
    until the last day is done. Builds the whole organization when it has no rows yet."""
    with transaction.atomic():
        _lock(org_id)
        calendar = ViewerCalendar.objects.filter(organization_id=org_id).first()
        links = current_links(org_id, [viewer_id])
        if calendar is not None and stored_links(org_id, [viewer_id]) == links:
            # Links are only ever replaced together with the rows they counted: equal
            # links mean an earlier request rebuilt them already.
            return
        if calendar is not None:
            ViewerLink.objects.filter(organization_id=org_id, viewer_id=viewer_id).delete()
            marked = {*links, (ViewerLinkKind.REBUILDING.value, 0, viewer_id)}
            ViewerLink.objects.bulk_create(
                ViewerLink(organization_id=org_id, kind=k, part_id=p, viewer_id=v)
                for k, p, v in sorted(marked)
            )
    if calendar is None:
        build_organization(org_id)
        return
    where = [f"ev.user_id = {int(viewer_id)}"]
    for kind, part_id, _viewer in links:
        where.append(f"ev.{LINK_COLUMNS[kind]} = {int(part_id)}")
    for a, b in _local_days(org_id, ZoneInfo(calendar.timezone)):
        with transaction.atomic():
            _lock(org_id)
            _recount(org_id, a, b, viewer_id=viewer_id, where=" OR ".join(where))
    ViewerLink.objects.filter(
        organization_id=org_id, viewer_id=viewer_id, kind=ViewerLinkKind.REBUILDING
    ).delete()


def _local_days(org_id: int, tz: ZoneInfo) -> list[tuple[int, int]]:
    """[(start, end)] of the local days covering every stored event of the organization
    (two index lookups), and the whole hours holding them: the last day ends an hour or
    more after the last event, so the hourly rows `_recount` counts hold it too."""
    from django.db.models import Max, Min

    found = UsageEvent.objects.filter(organization_id=org_id).aggregate(
        first=Min("timestamp"), last=Max("timestamp")
    )
    if found["first"] is None:
        return []
    last = int(found["last"].timestamp()) + HOUR_SECONDS
    start, end = local_day_start(found["first"], tz), local_days_around(last, last + 1, tz)[1]
    out, a = [], start
    while a < end:
        b = local_days_around(a, a + 1, tz)[1]
        out.append((a, b))
        a = b
    return out


def _recount(org_id: int, a: int, b: int, *, viewer_id: int | None = None, where: str = "") -> None:
    """Delete and count again the viewer rows of [a, b) (local midnights): the daily rows
    of those days and the hourly rows of the whole hours from the hour holding `a` to
    the one holding `b` (consecutive ranges tile time in both), for every viewer or only
    `viewer_id` (`where`: SQL over `ev`, the events that viewer may see)."""
    hours = (a - a % HOUR_SECONDS, b - b % HOUR_SECONDS)
    for tables, (lo, hi) in ((VIEWER_DAILY, (a, b)), (VIEWER_HOURLY, hours)):
        if lo >= hi:
            continue
        for model in tables:
            rows = model.objects.filter(organization_id=org_id, bucket__gte=lo, bucket__lt=hi)
            if viewer_id is not None:
                rows = rows.filter(viewer_id=viewer_id)
            rows.delete()
        _count_range(org_id, tables, lo, hi, viewer_id=viewer_id, where=where)


def _count_range(
    org_id: int, tables: tuple, lo: int, hi: int, *, viewer_id=None, where: str = ""
) -> None:
    """Count the stored events of [lo, hi) (not pending) into `tables`."""
    since, until = (datetime.fromtimestamp(t, UTC) for t in (lo, hi))
    if connection.vendor == "postgresql":
        in_range = (
            f"ev.\"timestamp\" >= '{since.isoformat()}' "
            f"AND ev.\"timestamp\" < '{until.isoformat()}'"
        )
        source = _events_source(org_id, f"({where}) AND {in_range}" if where else in_range)
        with connection.cursor() as cursor:
            for sql in viewer_rollup_sql(source, viewer_id=viewer_id, tables=tables):
                cursor.execute(sql)
        return
    events = UsageEvent.objects.filter(
        organization_id=org_id, timestamp__gte=since, timestamp__lt=until
    )
    _count_python(org_id, events.filter(_not_pending_q(org_id)), viewer_id, tables=tables)


def rebuild_range(org_id: int, start: int, end: int) -> None:
    """Recount the viewer roll-ups of `org_id` for [start, end) (whole UTC hours: a UTC
    day) from the stored events, inside the caller's transaction and fold lock
    (aggregates.rebuild_day): the hourly rows of that range, and the daily rows of every
    local day overlapping it, whole. Nothing when the organization keeps none."""
    calendar = ViewerCalendar.objects.filter(organization_id=org_id).first()
    if calendar is None:
        return
    a, b = local_days_around(start, end, ZoneInfo(calendar.timezone))
    for tables, (lo, hi) in ((VIEWER_DAILY, (a, b)), (VIEWER_HOURLY, (start, end))):
        for model in tables:
            model.objects.filter(organization_id=org_id, bucket__gte=lo, bucket__lt=hi).delete()
        _count_range(org_id, tables, lo, hi)


def local_days_around(start: int, end: int, tz: ZoneInfo) -> tuple[int, int]:
    """[the local midnight at or before `start`, the local midnight at or after `end`)."""
    a = local_day_start(datetime.fromtimestamp(start, UTC), tz)
    last = local_day_start(datetime.fromtimestamp(end - 1, UTC), tz)
    after = datetime.fromtimestamp(last, tz) + timedelta(hours=36)
    b = local_day_start(after, tz)
    return a, b


def reconcile_range(org_id: int, start: int, end: int) -> list[str]:
    """Mismatches between the viewer roll-ups of the local days overlapping [start, end)
    and the stored events of those days (not pending), counted in Python."""
    from .aggregates import FACT_FIELDS, EventFacts, _diff, _measures

    calendar = ViewerCalendar.objects.filter(organization_id=org_id).first()
    if calendar is None:
        return []
    # The rows are compared with what their stored links count (a viewer whose roles
    # changed since is not read until rebuilt: `viewer_rows_ready`).
    problems = []
    a, b = local_days_around(start, end, ZoneInfo(calendar.timezone))
    since, until = (datetime.fromtimestamp(t, UTC) for t in (a, b))
    events = UsageEvent.objects.filter(
        organization_id=org_id, timestamp__gte=since, timestamp__lt=until
    ).filter(_not_pending_q(org_id))
    facts = (EventFacts(*row) for row in events.values_list(*FACT_FIELDS).iterator(2000))
    expected = viewer_rollups(facts, viewer_maps([org_id]), _measures)
    for model, keys, measures in table_keys():
        # Daily rows of the local days around the range (whole: their events were read),
        # hourly rows of the range itself.
        lo, hi = (start, end) if model in VIEWER_HOURLY else (a, b)
        stored = {}
        rows = model.objects.filter(organization_id=org_id, bucket__gte=lo, bucket__lt=hi)
        for row in rows.values_list(*keys, *measures).iterator(chunk_size=5000):
            stored[tuple(row[: len(keys)])] = list(row[len(keys) :])
        want = {key: list(values) for key, values in expected[model].items() if lo <= key[2] < hi}
        problems += _diff(model._meta.verbose_name, want, stored)
    return problems


def request_rebuild(org_id: int, viewer_id: int | None) -> bool:
    """Ask a worker to rebuild `viewer_id`'s rows in `org_id` (the whole organization's
    when None), at most once a minute each; with eager tasks it runs here, and then
    True is returned."""
    from .budgets import enqueue_safely
    from .tasks import viewers_rebuild

    eager = bool(viewers_rebuild.app.conf.task_always_eager)
    key = f"viewers-rebuild:{org_id}:{viewer_id or 'all'}"
    if not eager:
        try:
            if not cache.add(key, 1, timeout=60):
                return False
        except Exception:  # the cache is down: ask anyway
            log.warning("cache unavailable; requesting a viewer rebuild", exc_info=True)
    return enqueue_safely(viewers_rebuild, org_id, viewer_id) and eager


def table_keys() -> tuple:
    """(model, key columns, measures) of each viewer roll-up."""
    from .aggregates import ACTOR_MEASURES, MEASURES

    return (
        (ViewerUsageDaily, VIEWER_USAGE_KEYS, MEASURES),
        (ViewerActorDaily, VIEWER_ACTOR_KEYS, ACTOR_MEASURES),
        (ViewerHistogramDaily, VIEWER_HIST_KEYS, ("count",)),
        (ViewerUsageHourly, VIEWER_USAGE_KEYS, MEASURES),
        (ViewerActorHourly, VIEWER_ACTOR_KEYS, ACTOR_MEASURES),
    )


# ---------------------------------------------------------------------------------------
# Changes of roles, tokens and zones


def _after_commit(org_id: int, viewer_id: int | None) -> None:
    transaction.on_commit(lambda: request_rebuild(org_id, viewer_id))


def membership_changed(sender, instance, **kwargs) -> None:
    """A role came, went or changed: that person's links may differ now."""
    _after_commit(instance.organization_id, instance.user_id)


def token_changed(sender, instance, **kwargs) -> None:
    """A token was issued, moved or removed: its owner's links may differ now (a former
    owner's are found different at their next read)."""
    if instance.owner_id:
        _after_commit(instance.organization_id, instance.owner_id)


def organization_saved(sender, instance, created=False, **kwargs) -> None:
    """A new organization keeps viewer roll-ups from the start; one whose zone changed
    has them counted again by its new local days."""
    zone = (
        ViewerCalendar.objects.filter(organization_id=instance.pk)
        .values_list("timezone", flat=True)
        .first()
    )
    if created or zone is None or zone != instance.timezone:
        _after_commit(instance.pk, None)


def connect_signals() -> None:
    from django.db.models.signals import post_delete, post_save

    post_save.connect(membership_changed, sender=Membership, dispatch_uid="viewers-membership")
    post_delete.connect(membership_changed, sender=Membership, dispatch_uid="viewers-membership-d")
    post_save.connect(token_changed, sender=ApiToken, dispatch_uid="viewers-token")
    post_delete.connect(token_changed, sender=ApiToken, dispatch_uid="viewers-token-d")
    post_save.connect(organization_saved, sender=Organization, dispatch_uid="viewers-org")
