"""Resource pools: allocated / surplus / hybrid consumption, decided at ingest.

A pool gives each user of its organization a base allocation per period of one resource
type (tokens, storage bytes, OCR pages); the rest of the organization's limit is the
surplus everyone shares. At ingest every event of a pooled resource type is categorised
against its user's PoolCounter row for the event's period:

- within what is left of the user's base: `allocated`;
- nothing left: `surplus`;
- part within, part beyond: `hybrid` (the split is counted exactly).

An explicit `pool_category` sent with the event is kept (and counted as it says).

Concurrency: `pools_categorise` runs inside the ingest transaction after the events are
inserted. It first inserts missing counter rows (ON CONFLICT DO NOTHING), then locks all
the rows it needs with SELECT ... FOR UPDATE, both in key order. Two batches for the same
user therefore take turns, and the second sees what the first used: no two events can
both take the last of an allocation. Every transaction inserts its events before it
locks any counter, and locks counters in one global order, so there is no deadlock. On
SQLite writers already take turns (BEGIN IMMEDIATE), and FOR UPDATE is not needed.
"""

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from django.db import connection
from django.db.models import Q, Sum

from accounts.models import Membership, Organization
from analytics.queries import Bucketing

from .budgets import Period, bucket_of, period_at, zone_of
from .models import Pool as PoolModel
from .models import (
    PoolAllocation,
    PoolCategory,
    PoolCounter,
    PoolUsage15m,
    ResourceType,
    UsageEvent,
)


def pool_amount(event) -> int:
    """What an event consumes of its resource: tokens in + out, else its quantity."""
    if event.resource_type == ResourceType.TOKENS:
        return event.input_tokens + event.output_tokens
    return event.quantity


# ---------------------------------------------------------------------------------------
# Ingest


def pools_categorise(*, organization: Organization, events) -> None:
    """Categorise freshly inserted events against their organization's pools, count
    their consumption, and store each computed pool_category on the event rows."""
    if not events:
        return
    pools = {p.resource_type: p for p in PoolModel.objects.filter(organization=organization)}
    splits: dict[str, tuple[int, int]] = {}
    pooled = [e for e in events if e.resource_type in pools]
    if pooled:
        splits = _categorise(organization, pools, pooled)
    _usage_add(organization.id, events, splits)


def _categorise(organization, pools, events) -> dict[str, tuple[int, int]]:
    tz = zone_of(organization)
    periods: dict[tuple[int, object], Period] = {}
    keyed = []
    for event in events:
        pool = pools[event.resource_type]
        day = event.timestamp.astimezone(tz).date()
        period = periods.get((pool.id, day))
        if period is None:
            period = periods[(pool.id, day)] = period_at(pool, tz, event.timestamp)
        keyed.append(((pool.id, event.user_id or 0, period.start_epoch), period, event))
    counters = _counters_locked(organization, pools, {k: p for k, p, _ in keyed})
    bases = _bases(organization.id, pools, {e.user_id for e in events if e.user_id})
    by_id = {p.id: p for p in pools.values()}
    splits = {}
    computed: dict[str, list[str]] = defaultdict(list)
    for key, _, event in sorted(keyed, key=lambda item: (item[2].timestamp, item[2].request_id)):
        pool_id, user_id, _ = key
        used = counters[key]
        base = bases.get((pool_id, user_id), by_id[pool_id].base_allocation) if user_id else 0
        allocated, surplus = _split(pool_amount(event), max(base - used[0], 0), event.pool_category)
        if not event.pool_category:
            event.pool_category = _category(allocated, surplus)
            computed[event.pool_category].append(event.request_id)
        used[0] += allocated
        used[1] += surplus
        splits[event.request_id] = (allocated, surplus)
    _counters_write(organization.id, counters)
    _store_categories(organization.id, computed)
    return splits


def _split(amount: int, remaining: int, explicit: str) -> tuple[int, int]:
    """(allocated part, surplus part) of `amount` with `remaining` base left."""
    if explicit == PoolCategory.ALLOCATED:
        return amount, 0
    if explicit == PoolCategory.SURPLUS:
        return 0, amount
    allocated = min(amount, remaining)
    return allocated, amount - allocated


def _category(allocated: int, surplus: int) -> str:
    if not surplus:
        return PoolCategory.ALLOCATED
    if not allocated:
        return PoolCategory.SURPLUS
    return PoolCategory.HYBRID


def _keys_q(organization_id: int, keys) -> Q:
    """Rows of every key (and of other combinations of the same pools, users and periods,
    which only ever widens the locked set within this batch's own users: harmless, and a
    flat IN-list query is far cheaper to build than an OR per key)."""
    return Q(
        organization_id=organization_id,
        pool_id__in={k[0] for k in keys},
        user_id__in={k[1] for k in keys},
        period_start__in={k[2] for k in keys},
    )


def _counters_locked(organization, pools, periods: dict[tuple, Period]) -> dict[tuple, list[int]]:
    """Lock (creating if needed) the counter row of every key, in key order."""
    ordered = sorted(periods)
    present = set(
        PoolCounter.objects.filter(_keys_q(organization.id, ordered)).values_list(
            "pool_id", "user_id", "period_start"
        )
    )
    missing = [key for key in ordered if key not in present]
    if missing:
        by_id = {p.id: p for p in pools.values()}
        seeds = [
            (
                organization.id,
                *key,
                *_used_so_far(organization.id, by_id[key[0]], key[1], periods[key]),
            )
            for key in missing
        ]
        _insert_missing(seeds)
    rows = (
        PoolCounter.objects.filter(_keys_q(organization.id, ordered))
        .order_by("pool_id", "user_id", "period_start")
        .select_for_update()
        .values_list("pool_id", "user_id", "period_start", "allocated_used", "surplus_used")
    )
    wanted = set(ordered)
    return {(p, u, s): [a, b] for p, u, s, a, b in rows if (p, u, s) in wanted}


def _used_so_far(organization_id: int, pool, user_id: int, period: Period) -> tuple[int, int]:
    """What the user already used in the period, from the 15-minute consumption: seeds a
    counter row that does not exist yet (a new period, or a changed period rule)."""
    sums = PoolUsage15m.objects.filter(
        organization_id=organization_id,
        resource_type=pool.resource_type,
        user_id=user_id,
        bucket__gte=period.start_epoch,
        bucket__lt=period.end_epoch,
    ).aggregate(a=Sum("allocated"), s=Sum("surplus"))
    return int(sums["a"] or 0), int(sums["s"] or 0)


def _insert_missing(rows: list[tuple]) -> None:
    table = connection.ops.quote_name(PoolCounter._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (organization_id, pool_id, user_id, period_start, "
            "allocated_used, surplus_used) VALUES "
            + ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(rows))
            + " ON CONFLICT (organization_id, pool_id, user_id, period_start) DO NOTHING",
            [v for row in rows for v in row],
        )


def _counters_write(organization_id: int, counters: dict[tuple, list[int]]) -> None:
    table = connection.ops.quote_name(PoolCounter._meta.db_table)
    rows = [(organization_id, *key, *used) for key, used in sorted(counters.items())]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (organization_id, pool_id, user_id, period_start, "
            "allocated_used, surplus_used) VALUES "
            + ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(rows))
            + " ON CONFLICT (organization_id, pool_id, user_id, period_start) DO UPDATE SET "
            "allocated_used = EXCLUDED.allocated_used, surplus_used = EXCLUDED.surplus_used",
            [v for row in rows for v in row],
        )


def _bases(organization_id: int, pools, user_ids: set[int]) -> dict[tuple[int, int], int]:
    if not user_ids:
        return {}
    rows = PoolAllocation.objects.filter(
        organization_id=organization_id,
        pool_id__in=[p.id for p in pools.values()],
        user_id__in=user_ids,
    ).values_list("pool_id", "user_id", "base_allocation")
    return {(pool_id, user_id): base for pool_id, user_id, base in rows}


def _store_categories(organization_id: int, computed: dict[str, list[str]]) -> None:
    # At most three UPDATEs per batch (one per category), by the (org, request_id) key.
    for category, request_ids in computed.items():
        for start in range(0, len(request_ids), 500):
            UsageEvent.objects.filter(
                organization_id=organization_id, request_id__in=request_ids[start : start + 500]
            ).update(pool_category=category)


_USAGE_COLUMNS = ("allocated", "surplus", "unpooled", "events", "hybrid_events")


def _usage_add(organization_id: int, events, splits: dict[str, tuple[int, int]]) -> None:
    rows: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(_USAGE_COLUMNS))
    for event in events:
        acc = rows[
            (organization_id, event.resource_type, bucket_of(event.timestamp), event.user_id or 0)
        ]
        split = splits.get(event.request_id)
        if split is None:
            acc[2] += pool_amount(event)
        else:
            acc[0] += split[0]
            acc[1] += split[1]
            acc[4] += event.pool_category == PoolCategory.HYBRID
        acc[3] += 1
    table = connection.ops.quote_name(PoolUsage15m._meta.db_table)
    ordered = [(*key, *values) for key, values in sorted(rows.items())]
    updates = ", ".join(f"{c} = {table}.{c} + EXCLUDED.{c}" for c in _USAGE_COLUMNS)
    with connection.cursor() as cursor:
        for start in range(0, len(ordered), 1000):
            chunk = ordered[start : start + 1000]
            cursor.execute(
                f"INSERT INTO {table} (organization_id, resource_type, bucket, user_id, "
                f"{', '.join(_USAGE_COLUMNS)}) VALUES "
                + ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s)"] * len(chunk))
                + f" ON CONFLICT (organization_id, resource_type, bucket, user_id) DO UPDATE SET {updates}",
                [v for row in chunk for v in row],
            )


# ---------------------------------------------------------------------------------------
# Reads for the pools page


def pool_bases_total(pool: PoolModel) -> int:
    """The sum of every member's base allocation (overrides included)."""
    members = set(
        Membership.objects.filter(organization_id=pool.organization_id).values_list(
            "user_id", flat=True
        )
    )
    overrides = dict(pool.allocations.values_list("user_id", "base_allocation"))
    return sum(overrides.get(uid, pool.base_allocation) for uid in members) + sum(
        base for uid, base in overrides.items() if uid not in members
    )


def pool_surplus_total(pool: PoolModel) -> int:
    """The limit minus every base allocation: what users share beyond their base."""
    return pool.limit - pool_bases_total(pool)


def user_base(pool: PoolModel, user_id: int) -> int:
    override = pool.allocations.filter(user_id=user_id).values_list("base_allocation", flat=True)
    return next(iter(override), pool.base_allocation)


@dataclass(frozen=True)
class UserPoolStatus:
    pool: PoolModel
    period: Period
    base: int
    allocated_used: int
    surplus_used: int

    @property
    def base_remaining(self) -> int:
        return max(self.base - self.allocated_used, 0)

    @property
    def share(self) -> int:
        return min(100, self.allocated_used * 100 // self.base) if self.base else 100


def user_pool_status(pool: PoolModel, user_id: int, now: datetime) -> UserPoolStatus:
    period = period_at(pool, zone_of(pool.organization), now)
    allocated, surplus = _used_so_far(pool.organization_id, pool, user_id, period)
    return UserPoolStatus(pool, period, user_base(pool, user_id), allocated, surplus)


@dataclass
class Series:
    """Values per chart bucket (bucket start epochs, in order)."""

    keys: list[int]
    values: dict[str, list[int]]


def _chart_keys(bucketing: Bucketing, start: int, end: int) -> list[int]:
    return bucketing.keys(start, end)


def consumption_series(
    *,
    organization_id: int,
    resource_type: str,
    start: datetime,
    end: datetime,
    bucketing: Bucketing,
    user_id: int | None = None,
) -> Series:
    """Allocated, surplus and unpooled consumption per chart bucket."""
    lo, hi = bucket_of(start), int(end.timestamp())
    keys = _chart_keys(bucketing, lo, hi)
    index = {k: i for i, k in enumerate(keys)}
    values = {c: [0] * len(keys) for c in ("allocated", "surplus", "unpooled")}
    qs = PoolUsage15m.objects.filter(
        organization_id=organization_id, resource_type=resource_type, bucket__gte=lo, bucket__lt=hi
    )
    if user_id is not None:
        qs = qs.filter(user_id=user_id)
    rows = (
        qs.values("bucket")
        .annotate(a=Sum("allocated"), s=Sum("surplus"), u=Sum("unpooled"))
        .order_by()
    )
    for row in rows:
        i = index.get(bucketing.key_of(row["bucket"]))
        if i is None:
            continue
        values["allocated"][i] += row["a"] or 0
        values["surplus"][i] += row["s"] or 0
        values["unpooled"][i] += row["u"] or 0
    return Series(keys, values)


def surplus_series(
    *, pool: PoolModel, start: datetime, end: datetime, bucketing: Bucketing, now: datetime
) -> Series:
    """Surplus remaining at the end of each chart bucket: the surplus total minus the
    surplus consumed since the start of that moment's period (it jumps back at resets)."""
    tz = zone_of(pool.organization)
    lo, hi = bucket_of(start), int(min(end, now).timestamp())
    keys = [k for k in _chart_keys(bucketing, lo, int(end.timestamp())) if k < hi] or []
    first_period = period_at(pool, tz, datetime.fromtimestamp(lo, tz))
    rows = (
        PoolUsage15m.objects.filter(
            organization_id=pool.organization_id,
            resource_type=pool.resource_type,
            bucket__gte=first_period.start_epoch,
            bucket__lt=hi + 900,
        )
        .values("bucket")
        .annotate(s=Sum("surplus"))
        .order_by("bucket")
    )
    buckets, prefix = [], [0]
    for row in rows:
        buckets.append(row["bucket"])
        prefix.append(prefix[-1] + (row["s"] or 0))

    def consumed(a: int, b: int) -> int:
        return prefix[bisect_left(buckets, b)] - prefix[bisect_left(buckets, a)]

    total = pool_surplus_total(pool)
    remaining = []
    for i, key in enumerate(keys):
        edge = min(keys[i + 1] if i + 1 < len(keys) else int(end.timestamp()), hi)
        period = period_at(pool, tz, datetime.fromtimestamp(max(edge - 1, key), tz))
        remaining.append(total - consumed(period.start_epoch, edge))
    return Series(keys, {"surplus_remaining": remaining})


def pool_top_users(pool: PoolModel, now: datetime, limit: int = 20) -> list[dict]:
    """The heaviest users of the current period with their base and use."""
    period = period_at(pool, zone_of(pool.organization), now)
    rows = (
        PoolUsage15m.objects.filter(
            organization_id=pool.organization_id,
            resource_type=pool.resource_type,
            bucket__gte=period.start_epoch,
            bucket__lt=period.end_epoch,
        )
        .values("user_id")
        .annotate(a=Sum("allocated"), s=Sum("surplus"), h=Sum("hybrid_events"))
        .order_by("-s", "-a")[:limit]
    )
    overrides = dict(pool.allocations.values_list("user_id", "base_allocation"))
    return [
        {
            "user_id": row["user_id"],
            "base": overrides.get(row["user_id"], pool.base_allocation) if row["user_id"] else 0,
            "allocated": row["a"] or 0,
            "surplus": row["s"] or 0,
            "hybrid_events": row["h"] or 0,
        }
        for row in rows
    ]
