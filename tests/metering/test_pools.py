"""Resource pools: allocated / surplus / hybrid at ingest, exactly, also under concurrency.

A user's consumption within their base allocation is `allocated`, beyond it `surplus`,
and the one event that crosses the line `hybrid`. Concurrent batches for one user take
turns on the user's counter row, so the boundary is crossed by exactly one event.
"""

import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.db.models import Count, Sum

from analytics.queries import HOUR, Bucketing
from metering.budgets import period_at, zone_of
from metering.models import Pool, PoolAllocation, PoolCounter, PoolUsage15m, UsageEvent
from metering.pools import pool_surplus_total, surplus_series, user_pool_status
from tests.factories import event_payload, ingest
from tests.metering.budget_helpers import post_events

NOW = datetime(2026, 6, 17, 10, 20, tzinfo=UTC)


def tokens(n: int, **fields) -> dict:
    """An event consuming n tokens (input only)."""
    fields.setdefault("timestamp", NOW - timedelta(minutes=5))
    return event_payload(input_tokens=n, output_tokens=0, **fields)


def categories(org) -> list[tuple[str, str]]:
    return list(
        UsageEvent.objects.filter(organization=org)
        .order_by("timestamp", "request_id")
        .values_list("request_id", "pool_category")
    )


@pytest.fixture
def pool(personas):
    return Pool.objects.create(
        organization=personas.org,
        resource_type="tokens",
        period="monthly",
        limit=10_000,
        base_allocation=1_000,
    )


def used(pool, user) -> tuple[int, int]:
    status = user_pool_status(pool, user.id, NOW)
    return status.allocated_used, status.surplus_used


@pytest.mark.django_db
def test_events_within_across_and_beyond_the_base(personas, pool):
    member = "member@example.test"
    t = NOW - timedelta(hours=1)
    ingest(
        personas.org,
        [
            tokens(600, user=member, request_id="a", timestamp=t),
            tokens(300, user=member, request_id="b", timestamp=t + timedelta(seconds=1)),
            tokens(250, user=member, request_id="c", timestamp=t + timedelta(seconds=2)),
            tokens(50, user=member, request_id="d", timestamp=t + timedelta(seconds=3)),
        ],
        now=NOW,
    )
    assert categories(personas.org) == [
        ("a", "allocated"),
        ("b", "allocated"),
        ("c", "hybrid"),  # 100 left of the base: 100 allocated, 150 surplus
        ("d", "surplus"),
    ]
    assert used(pool, personas.member) == (1_000, 200)
    usage = PoolUsage15m.objects.aggregate(
        a=Sum("allocated"), s=Sum("surplus"), h=Sum("hybrid_events")
    )
    assert usage == {"a": 1_000, "s": 200, "h": 1}


@pytest.mark.django_db
def test_output_tokens_count_too(personas, pool):
    ingest(
        personas.org,
        [
            event_payload(
                input_tokens=700,
                output_tokens=400,
                user="member@example.test",
                timestamp=NOW - timedelta(minutes=1),
            )
        ],
        now=NOW,
    )
    assert [c for _, c in categories(personas.org)] == ["hybrid"]
    assert used(pool, personas.member) == (1_000, 100)


@pytest.mark.django_db
def test_batches_continue_where_the_last_one_stopped(personas, pool):
    member = "member@example.test"
    for n in range(5):
        ingest(
            personas.org,
            [
                tokens(
                    300, user=member, request_id=f"r{n}", timestamp=NOW - timedelta(minutes=10 - n)
                )
            ],
            now=NOW,
        )
    assert [c for _, c in categories(personas.org)] == [
        "allocated",
        "allocated",
        "allocated",
        "hybrid",
        "surplus",
    ]


@pytest.mark.django_db
def test_explicit_category_is_kept(personas, pool):
    ingest(
        personas.org,
        [
            tokens(100, user="member@example.test", request_id="x", pool_category="surplus"),
            tokens(100, user="member@example.test", request_id="y"),
        ],
        now=NOW,
    )
    assert dict(categories(personas.org)) == {"x": "surplus", "y": "allocated"}
    assert used(pool, personas.member) == (100, 100)


@pytest.mark.django_db
def test_a_users_own_base_replaces_the_pools(personas, pool):
    PoolAllocation.objects.create(
        organization=personas.org, pool=pool, user=personas.member, base_allocation=100
    )
    ingest(
        personas.org,
        [tokens(150, user="member@example.test"), tokens(150, user="lead@example.test")],
        now=NOW,
    )
    by_user = dict(UsageEvent.objects.values_list("user__email", "pool_category"))
    assert by_user == {"member@example.test": "hybrid", "lead@example.test": "allocated"}


@pytest.mark.django_db
def test_events_without_a_user_draw_on_the_surplus(personas, pool):
    ingest(personas.org, [tokens(10)], token=personas.service_token, now=NOW)
    assert [c for _, c in categories(personas.org)] == ["surplus"]


@pytest.mark.django_db
def test_the_base_is_full_again_in_a_new_period(personas, pool):
    member = "member@example.test"
    may, june = datetime(2026, 5, 20, tzinfo=UTC), datetime(2026, 6, 2, tzinfo=UTC)
    ingest(personas.org, [tokens(1_500, user=member, request_id="may", timestamp=may)], now=NOW)
    ingest(personas.org, [tokens(500, user=member, request_id="june", timestamp=june)], now=NOW)
    assert dict(categories(personas.org)) == {"may": "hybrid", "june": "allocated"}
    assert PoolCounter.objects.count() == 2


@pytest.mark.django_db
def test_other_resource_types_and_organizations_are_not_categorised(personas, pool):
    ingest(
        personas.org,
        [event_payload(resource_type="ocr", quantity=5, timestamp=NOW, user="member@example.test")],
        now=NOW,
    )
    ingest(personas.other_org, [tokens(5_000, user="outsider@beta.test")], now=NOW)
    assert set(UsageEvent.objects.values_list("pool_category", flat=True)) == {""}
    # Still counted as consumption (unpooled), for the consumption chart.
    assert PoolUsage15m.objects.filter(resource_type="ocr").get().unpooled == 5


@pytest.mark.django_db
def test_consumption_per_15_minutes_counts_each_new_event_once_by_category(personas, pool):
    # On PostgreSQL the insert statement counts the resource types without a pool, and
    # Python the pooled ones; on SQLite Python counts both. Either way, per resource type,
    # user and 15 minutes, what the stored events say, and a resent batch adds nothing.
    member, lead = "member@example.test", "lead@example.test"
    q1, q2 = NOW - timedelta(minutes=50), NOW - timedelta(minutes=20)
    batch = [
        tokens(700, user=member, timestamp=q1),
        tokens(600, user=member, timestamp=q2),  # crosses the base: hybrid
        tokens(40, timestamp=q2),  # no user: surplus
        event_payload(resource_type="ocr", quantity=5, user=member, timestamp=q1),
        event_payload(resource_type="ocr", quantity=7, user=member, timestamp=q1),
        event_payload(resource_type="ocr", quantity=11, user=lead, timestamp=q2),
        event_payload(resource_type="storage", quantity=2048, timestamp=q2),
    ]
    assert ingest(personas.org, batch, token=personas.service_token, now=NOW).accepted == 7
    assert ingest(personas.org, batch, token=personas.service_token, now=NOW).duplicates == 7

    def bucket(moment):
        epoch = int(moment.timestamp())
        return epoch - epoch % 900

    users = {u.email: u.id for u in (personas.member, personas.team_lead)}
    stored = {
        (row.resource_type, row.bucket, row.user_id): (
            row.allocated,
            row.surplus,
            row.unpooled,
            row.events,
            row.hybrid_events,
        )
        for row in PoolUsage15m.objects.filter(organization=personas.org)
    }
    assert users[member] and users[lead]
    assert stored == {
        ("tokens", bucket(q1), users[member]): (700, 0, 0, 1, 0),
        ("tokens", bucket(q2), users[member]): (300, 300, 0, 1, 1),
        ("tokens", bucket(q2), 0): (0, 40, 0, 1, 0),
        ("ocr", bucket(q1), users[member]): (0, 0, 12, 2, 0),
        ("ocr", bucket(q2), users[lead]): (0, 0, 11, 1, 0),
        ("storage", bucket(q2), 0): (0, 0, 2048, 1, 0),
    }


@pytest.mark.django_db
def test_a_changed_period_rule_starts_from_what_was_used_in_the_new_period(personas, pool):
    member = "member@example.test"
    ingest(
        personas.org,
        [tokens(800, user=member, request_id="one", timestamp=NOW - timedelta(hours=2))],
        now=NOW,
    )
    pool.period, pool.week_start = "weekly", 0
    pool.save()
    ingest(
        personas.org,
        [tokens(300, user=member, request_id="two", timestamp=NOW - timedelta(hours=1))],
        now=NOW,
    )
    # The weekly counter row is seeded with this week's 800 already allocated.
    assert dict(categories(personas.org))["two"] == "hybrid"


@pytest.mark.django_db
def test_surplus_remaining_goes_down_with_surplus_use_and_resets(personas, pool):
    # alpha has 4 members with a base of 1,000: the surplus is 10,000 - 4,000.
    assert pool_surplus_total(pool) == 6_000
    member = "member@example.test"
    ingest(
        personas.org,
        [
            tokens(
                1_500,
                user=member,
                request_id="june",
                timestamp=datetime(2026, 6, 30, 20, tzinfo=UTC),
            ),
            tokens(
                1_200, user=member, request_id="july", timestamp=datetime(2026, 7, 1, 8, tzinfo=UTC)
            ),
        ],
        now=datetime(2026, 7, 1, 12, tzinfo=UTC),
    )
    tz = zone_of(personas.org)
    series = surplus_series(
        pool=pool,
        start=datetime(2026, 6, 30, 18, tzinfo=UTC),
        end=datetime(2026, 7, 1, 12, tzinfo=UTC),
        bucketing=Bucketing(HOUR, tz),
        now=datetime(2026, 7, 1, 12, tzinfo=UTC),
    )
    values = dict(zip(series.keys, series.values["surplus_remaining"], strict=True))
    at = lambda h, d=30, m=6: int(datetime(2026, m, d, h, tzinfo=UTC).timestamp())  # noqa: E731
    assert values[at(19)] == 6_000
    assert values[at(20)] == 5_500  # 500 beyond the base in June
    assert values[at(21)] == 5_500
    assert values[at(22)] == 6_000  # July 1st, Berlin: a new period
    assert values[at(8, 1, 7)] == 5_800  # 200 beyond the base in July


# ---------------------------------------------------------------------------------------
# Concurrency


@pytest.mark.django_db(transaction=True)
def test_concurrent_ingestion_for_one_user_crosses_the_base_exactly_once(live_server, personas):
    Pool.objects.create(
        organization=personas.org,
        resource_type="tokens",
        period="monthly",
        limit=100_000,
        base_allocation=1_000,
    )
    senders, per_sender, amount = 8, 5, 70  # 2,800 tokens against a base of 1,000
    now = datetime.now(UTC)
    start = threading.Barrier(senders)
    answers, errors = [], []

    def send(n: int) -> None:
        try:
            start.wait()
            for i in range(per_sender):
                event = event_payload(
                    input_tokens=amount,
                    output_tokens=0,
                    user="member@example.test",
                    request_id=f"p{n}-{i}",
                    timestamp=(now - timedelta(minutes=1)).isoformat(),
                )
                answers.append(post_events(live_server.url, personas.service_token.secret, [event]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {status for status, _ in answers} == {200}

    counts = dict(UsageEvent.objects.values_list("pool_category").annotate(n=Count("id")))
    assert counts == {"allocated": 14, "hybrid": 1, "surplus": 25}  # 14 x 70 = 980; 20 + 50
    usage = PoolUsage15m.objects.aggregate(a=Sum("allocated"), s=Sum("surplus"))
    assert usage == {"a": 1_000, "s": 1_800}
    pool = Pool.objects.get()
    period = period_at(pool, zone_of(personas.org), now)
    counter = PoolCounter.objects.get(user_id=personas.member.id, period_start=period.start_epoch)
    assert (counter.allocated_used, counter.surplus_used) == (1_000, 1_800)
