"""Concurrent retries over real HTTP: the same events from many senders are stored once.

Eight senders post the same 10,000 events in batches of 1,000, each in its own shuffled
order, at the same time, to a live server; every batch must succeed (no deadlock, no
"database is locked"), exactly 10,000 events must be stored, and the roll-ups must equal
the raw sums, with the roll-ups counted in each batch's transaction or (PostgreSQL)
folded after it. On SQLite the settings take the write lock at BEGIN (IMMEDIATE) and wait on
a busy timeout, so concurrent writers queue; the test database is a file (see
tests/conftest.py) so each server thread has its own connection.
"""

import json
import random
import threading
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.db.models import Count, Max, Min, Sum

from metering.aggregates import reconcile_day
from metering.models import (
    LatencyHistogramHourly,
    OrgUsage15m,
    RollupPending,
    ScopeUsage15m,
    UsageEvent,
)

SENDERS = 8
EVENTS = 10_000
BATCH = 1_000
DAY = 86400


def _events(seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    models = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "text-embedding-3-small", "homegrown"]
    users = [None, "member@example.test", "lead@example.test"] + [
        f"new{i}@example.test" for i in range(6)
    ]
    events = []
    for i in range(EVENTS):
        input_tokens = rng.randint(0, 5000)
        output_tokens = rng.randint(0, 800)
        event = {
            "request_id": f"conc-{i:05d}",
            "timestamp": (start + timedelta(seconds=rng.randint(0, 3 * DAY - 1))).isoformat(),
            "model": rng.choice(models),
            "input_tokens": input_tokens,
            "cached_input_tokens": rng.randint(0, input_tokens // 2),
            "output_tokens": output_tokens,
            "latency_ms": rng.randint(20, 20_000),
            "status_code": rng.choice([200] * 30 + [429, 500]),
        }
        user = rng.choice(users)
        if user:
            event["user"] = user
        team = rng.choice([None, "platform", "research"])
        if team:
            event["team"] = team
        events.append(event)
    return events


def _post(url: str, secret: str, events: list[dict]) -> tuple[int, dict]:
    request = urllib.request.Request(  # noqa: S310 - the test's own live server
        url,
        data=json.dumps({"events": events}).encode(),
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=300) as response:  # noqa: S310
        return response.status, json.loads(response.read())


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("deferred", [False, True], ids=["counted", "deferred"])
def test_concurrent_senders_of_the_same_events_store_each_once(
    live_server, personas, service_token, member_token, settings, deferred
):
    if deferred and connection.vendor != "postgresql":
        pytest.skip("deferred roll-ups are a PostgreSQL path")
    # Deferred: every batch's commit folds in its own server thread (eager tasks), so
    # folds of the same organization race each other and the inserts.
    settings.ROLLUPS_DEFERRED = deferred
    events = _events()
    batches = [events[i : i + BATCH] for i in range(0, EVENTS, BATCH)]
    url = f"{live_server.url}/api/v1/events"
    answers: list[tuple[int, dict]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(SENDERS)

    def sender(number: int) -> None:
        order = list(range(len(batches)))
        random.Random(number).shuffle(order)
        token = service_token if number % 2 else member_token
        try:
            start.wait()
            for index in order:
                answer = _post(url, token.secret, batches[index])
                with lock:
                    answers.append(answer)
        except BaseException as exc:  # reported below, with the others
            with lock:
                failures.append(exc)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    assert {status for status, _ in answers} == {200}
    assert len(answers) == SENDERS * len(batches)
    assert sum(body["accepted"] for _, body in answers) == EVENTS
    assert sum(body["duplicates"] for _, body in answers) == EVENTS * (SENDERS - 1)
    assert all(body["rejected"] == [] for _, body in answers)

    org = personas.org
    assert UsageEvent.objects.filter(organization=org).count() == EVENTS
    assert (
        UsageEvent.objects.values("request_id").annotate(n=Count("id")).filter(n__gt=1).count() == 0
    )
    raw = UsageEvent.objects.aggregate(
        requests=Count("id"),
        input_tokens=Sum("input_tokens"),
        cached_input_tokens=Sum("cached_input_tokens"),
        output_tokens=Sum("output_tokens"),
        cost_nanos=Sum("cost_nanos"),
        latency_ms_sum=Sum("latency_ms"),
    )
    assert RollupPending.objects.count() == 0
    for rollup in (OrgUsage15m, ScopeUsage15m):
        assert rollup.objects.aggregate(**{k: Sum(k) for k in raw}) == raw
    assert LatencyHistogramHourly.objects.aggregate(n=Sum("count"))["n"] == EVENTS

    bounds = UsageEvent.objects.aggregate(lo=Min("timestamp"), hi=Max("timestamp"))
    first = int(bounds["lo"].timestamp()) // DAY * DAY
    for day in range(first, int(bounds["hi"].timestamp()) + 1, DAY):
        assert reconcile_day(org.id, day) == []
