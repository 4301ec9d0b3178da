"""The metrics bar's two periods read side by side (`analytics.queries.side_by_side`): on
PostgreSQL the previous period runs on a second connection of the process, with answers
equal to the sequential ones and the same visibility; inside a transaction, and on
SQLite, one after the other on the request's own connection."""

import re
import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection

from analytics.queries import side_by_side
from metering.models import UsageEvent
from tests.factories import event_payload, ingest

on_postgresql = pytest.mark.skipif(
    "connection.vendor != 'postgresql'", reason="a second connection is a PostgreSQL matter"
)


def _where() -> tuple[str, int]:
    """The thread a call ran on and how many events its connection sees."""
    return threading.current_thread().name, UsageEvent.objects.count()


def test_inside_a_transaction_both_run_here_and_see_its_writes(personas):
    ingest(personas.org, [event_payload() for _ in range(3)])  # not committed: a test's atomic
    here = threading.current_thread().name
    assert connection.in_atomic_block
    assert side_by_side(_where, _where) == ((here, 3), (here, 3))


@on_postgresql
def test_outside_a_transaction_the_second_runs_on_its_own_connection(transactional_db, personas):
    ingest(personas.org, [event_payload() for _ in range(4)])
    (first_thread, first_seen), (second_thread, second_seen) = side_by_side(_where, _where)
    assert first_thread == threading.current_thread().name
    assert second_thread.startswith("side-read")
    assert first_seen == second_seen == 4


@on_postgresql
def test_errors_of_either_side_reach_the_caller(transactional_db):
    def fails():
        raise LookupError("second")

    with pytest.raises(LookupError, match="second"):
        side_by_side(lambda: 1, fails)
    with pytest.raises(ZeroDivisionError):
        side_by_side(lambda: 1 / 0, lambda: 2)
    # The side thread is free again afterwards.
    assert side_by_side(lambda: "a", lambda: threading.current_thread().name)[1].startswith(
        "side-read"
    )


@on_postgresql
def test_turned_off_both_run_here(transactional_db, settings):
    settings.DASHBOARD_PARALLEL_READS = False
    here = threading.current_thread().name
    assert side_by_side(lambda: threading.current_thread().name, _where)[1][0] == here


def _metrics_csv(client, query: str) -> str:
    response = client.get(f"/dashboard/widgets/metrics/?{query}&format=csv")
    assert response.status_code == 200
    return b"".join(response.streaming_content).decode()


@on_postgresql
@pytest.mark.parametrize("persona", ["org_admin", "team_lead", "member", "outsider"])
def test_metrics_side_by_side_equal_one_after_the_other(
    transactional_db, personas, client, settings, persona
):
    now = datetime.now(UTC)
    ingest(
        personas.org,
        [
            event_payload(
                timestamp=now - timedelta(hours=h),
                team="platform" if h % 2 else "research",
                user=personas.team_lead.email if h % 3 else None,
                status_code=503 if h % 5 == 0 else 200,
                latency_ms=100 + 7 * h,
            )
            for h in range(1, 60)
        ],
        token=personas.member_token,
    )
    client.force_login(getattr(personas, persona))
    query = "period=24h"
    parallel = _metrics_csv(client, query)
    settings.DASHBOARD_PARALLEL_READS = False
    sequential = _metrics_csv(client, query)
    assert parallel == sequential
    requests = next(line for line in parallel.splitlines() if line.startswith("Requests,"))
    this_period, previous_period = requests.split(",")[1:3]
    if persona == "outsider":  # alpha's events are outside beta's member's scope
        assert (this_period, previous_period) == ("0", "0")
    else:
        assert int(this_period) > 0 and int(previous_period) > 0


def _page_without_per_request_tokens(client, url: str) -> str:
    response = client.get(url)
    assert response.status_code == 200
    html = response.content.decode()
    # CSRF tokens and CSP nonces differ per request; nothing the widgets show is as long.
    html = re.sub(r'nonce="[^"]*"', 'nonce=""', html)
    return re.sub(r"[A-Za-z0-9+/=_-]{32,}", "<token>", html)


@on_postgresql
@pytest.mark.parametrize("persona", ["org_admin", "project_admin", "outsider"])
def test_the_full_page_side_by_side_equals_one_after_the_other(
    transactional_db, personas, client, settings, persona
):
    now = datetime.now(UTC)
    ingest(
        personas.org,
        [
            event_payload(
                timestamp=now - timedelta(minutes=37 * h),
                project="chatbot" if h % 2 else "search",
                model="gpt-4o" if h % 3 else "claude-sonnet-4",
                latency_ms=50 + 11 * h,
            )
            for h in range(1, 80)
        ],
        token=personas.service_token,
    )
    client.force_login(getattr(personas, persona))
    parallel = _page_without_per_request_tokens(client, "/dashboard/?period=7d")
    settings.DASHBOARD_PARALLEL_READS = False
    assert _page_without_per_request_tokens(client, "/dashboard/?period=7d") == parallel
    if persona == "outsider":
        assert "claude-sonnet-4" not in parallel
    else:
        assert "claude-sonnet-4" in parallel


@on_postgresql
@pytest.mark.parametrize("persona", ["org_admin", "member", "outsider"])
@pytest.mark.parametrize("query", ["period=7d", "period=7d&amount_min=1&sort=cost&page=2"])
def test_the_events_page_side_by_side_equals_one_after_the_other(
    transactional_db, personas, client, settings, persona, query
):
    # The log on the request's thread, the filter bar's options on the side thread.
    now = datetime.now(UTC)
    ingest(
        personas.org,
        [
            event_payload(
                timestamp=now - timedelta(minutes=29 * h),
                user=personas.member.email if h % 2 else None,
                model="gpt-4o" if h % 3 else "claude-sonnet-4",
                input_tokens=10 * h,
            )
            for h in range(1, 70)
        ],
        token=personas.member_token,
    )
    client.force_login(getattr(personas, persona))
    parallel = _page_without_per_request_tokens(client, f"/events/?{query}")
    settings.DASHBOARD_PARALLEL_READS = False
    assert _page_without_per_request_tokens(client, f"/events/?{query}") == parallel
    if persona == "outsider":
        assert "claude-sonnet-4" not in parallel
    else:
        assert parallel.count("claude-sonnet-4") >= 2  # a model option and rows of the log
