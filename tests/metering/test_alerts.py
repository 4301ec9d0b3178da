"""Spend alerts: each threshold once per period, by email and signed webhook, from Celery
tasks enqueued on commit; retries repeat only what failed; ingestion never waits on or
fails because of the broker, and the sweep sends what a lost message missed.

Unit tests run Celery eagerly (no REDIS_URL). The `services` test at the end runs a real
worker against the real Redis and PostgreSQL.
"""

import hashlib
import hmac
import json
import socket
import threading
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.core import mail
from django.db import connection

from metering import budgets, tasks
from metering.budgets import (
    alert_deliver,
    budget_alerts_evaluate,
    budgets_sweep,
    webhook_save,
    webhook_signature,
    webhook_verify,
    zone_of,
)
from metering.models import AlertState, AlertWebhook, BudgetAlert
from tests.conftest import bearer
from tests.factories import ingest
from tests.metering import budget_helpers
from tests.metering.budget_helpers import celery_broker, make_budget, post_events, spend_event
from tests.services import REDIS_URL, celery_worker
from tests.services import redis_up as _redis_up
from tests.services import wait_for as _wait

webhook_receiver = budget_helpers.webhook_receiver


def now_budget(org, subject="org", amount="10", **fields):
    """A budget whose current period began ten days ago and lasts 30 days: events from
    the last hour are in it whenever the test runs."""
    today = datetime.now(UTC).astimezone(zone_of(org)).date()
    return make_budget(
        org,
        subject,
        amount,
        period="every_n_days",
        every_n_days=30,
        anchor=today - timedelta(days=10),
        **fields,
    )


def recent_spend(cost, **fields):
    return spend_event(cost, timestamp=datetime.now(UTC) - timedelta(minutes=2), **fields)


def thresholds_alerted(budget) -> list[int]:
    return sorted(BudgetAlert.objects.filter(budget=budget).values_list("threshold", flat=True))


def alert_emails() -> list:
    return [m for m in mail.outbox if m.subject.startswith("Budget ")]


@pytest.fixture
def hook(personas, webhook_receiver):
    return webhook_save(webhook=AlertWebhook(organization=personas.org, url=webhook_receiver.url))


# ---------------------------------------------------------------------------------------
# Exactly once per threshold and period


@pytest.mark.django_db
def test_each_threshold_alerts_once_as_spend_crosses_it(
    personas, hook, webhook_receiver, django_capture_on_commit_callbacks
):
    budget = now_budget(personas.org, "user", "10", user=personas.member)
    member = "member@example.test"
    steps = [("4", []), ("1.5", [50]), ("2", [50]), ("1", [50, 80]), ("3", [50, 80, 100])]
    for cost, expected in steps:
        with django_capture_on_commit_callbacks(execute=True):
            ingest(personas.org, [recent_spend(cost, user=member)])
        assert thresholds_alerted(budget) == expected
    emails = alert_emails()
    assert len(emails) == 3
    assert [e.subject.split(" reached ")[1].split(" ")[0] for e in emails] == ["50", "80", "100"]
    # The user and the organization's admins; not other people.
    assert {tuple(sorted(e.to)) for e in emails} == {
        ("member@example.test", "orgadmin@example.test")
    }
    assert [p["threshold_percent"] for p in webhook_receiver.payloads()] == [50, 80, 100]
    assert set(BudgetAlert.objects.values_list("state", flat=True)) == {AlertState.SENT}

    # More spend, the checks and the sweep again: nothing new this period.
    with django_capture_on_commit_callbacks(execute=True):
        ingest(personas.org, [recent_spend("5", user=member)])
        tasks.budget_check.delay(budget.id)
        budgets_sweep()
    assert thresholds_alerted(budget) == [50, 80, 100]
    assert len(alert_emails()) == 3
    assert len(webhook_receiver.deliveries) == 3


@pytest.mark.django_db
def test_one_batch_crossing_several_thresholds_sends_each_once(
    personas, django_capture_on_commit_callbacks
):
    budget = now_budget(personas.org, "team", "10", team=personas.platform_team)
    with django_capture_on_commit_callbacks(execute=True):
        ingest(
            personas.org, [recent_spend("6", team="platform"), recent_spend("6", team="platform")]
        )
    assert thresholds_alerted(budget) == [50, 80, 100]
    # The team's lead hears about it, with the org admins.
    assert {tuple(sorted(e.to)) for e in alert_emails()} == {
        ("lead@example.test", "orgadmin@example.test")
    }


@pytest.mark.django_db
def test_a_new_period_alerts_again_once(personas):
    budget = make_budget(personas.org, "org", "10", period="daily")
    day1, day2 = datetime(2026, 6, 1, 10, tzinfo=UTC), datetime(2026, 6, 2, 10, tzinfo=UTC)
    ingest(
        personas.org,
        [spend_event("6", timestamp=day1), spend_event("6", timestamp=day2)],
        now=day2 + timedelta(hours=1),
    )
    for moment in (day1, day1 + timedelta(hours=3), day2, day2 + timedelta(hours=3)):
        budget_alerts_evaluate(budget=budget, now=moment)
    alerts = BudgetAlert.objects.filter(budget=budget).order_by("period_start")
    assert [(a.period_start.date(), a.threshold) for a in alerts] == [
        (date(2026, 5, 31), 50),  # Berlin's June 1st starts at 22:00 UTC the day before
        (date(2026, 6, 1), 50),
    ]


@pytest.mark.django_db
def test_lowering_the_amount_alerts_for_thresholds_now_reached(
    personas, django_capture_on_commit_callbacks
):
    budget = now_budget(personas.org, "org", "100")
    ingest(personas.org, [recent_spend("60")])
    assert thresholds_alerted(budget) == []
    budget.amount_usd = Decimal("70")
    with django_capture_on_commit_callbacks(execute=True):
        budgets.budget_save(budget=budget)
    assert thresholds_alerted(budget) == [50, 80]


@pytest.mark.django_db
def test_a_paused_budget_does_not_alert(personas, django_capture_on_commit_callbacks):
    budget = now_budget(personas.org, "org", "1", is_active=False)
    with django_capture_on_commit_callbacks(execute=True):
        ingest(personas.org, [recent_spend("5")])
        budgets_sweep()
    assert thresholds_alerted(budget) == []


# ---------------------------------------------------------------------------------------
# Delivery: retries, claims, webhooks


@pytest.mark.django_db
def test_a_failed_webhook_is_retried_without_repeating_the_email(
    personas, hook, webhook_receiver, django_capture_on_commit_callbacks
):
    now_budget(personas.org, "org", "10", thresholds=[100])
    webhook_receiver.fail_next(2)
    with django_capture_on_commit_callbacks(execute=True):
        ingest(personas.org, [recent_spend("10")])
    alert = BudgetAlert.objects.get()
    assert alert.state == AlertState.SENT
    assert alert.attempts == 3
    assert webhook_receiver.attempts == 3
    assert len(webhook_receiver.deliveries) == 1
    assert len(alert_emails()) == 1
    assert alert.webhooks_done == [hook.id]


@pytest.mark.django_db
def test_delivery_gives_up_after_the_last_attempt_and_says_why(
    personas, hook, webhook_receiver, settings, django_capture_on_commit_callbacks
):
    settings.BUDGET_ALERT_MAX_ATTEMPTS = 3
    now_budget(personas.org, "org", "10", thresholds=[100])
    webhook_receiver.fail_next(100)
    with django_capture_on_commit_callbacks(execute=True):
        ingest(personas.org, [recent_spend("10")])  # never raises into ingestion
    alert = BudgetAlert.objects.get()
    assert alert.state == AlertState.FAILED
    assert alert.attempts == 3
    assert "503" in alert.last_error
    assert len(alert_emails()) == 1  # the email went out on the first attempt


@pytest.mark.django_db
def test_a_claimed_alert_is_not_sent_twice(personas):
    budget = now_budget(personas.org, "org", "1", thresholds=[100])
    ingest(personas.org, [recent_spend("1")])
    (alert,) = budget_alerts_evaluate(budget=budget)
    now = datetime.now(UTC)
    BudgetAlert.objects.filter(pk=alert.pk).update(claimed_until=now + timedelta(minutes=1))
    assert alert_deliver(alert_id=alert.pk) == "not ours"
    assert alert_emails() == []
    assert alert_deliver(alert_id=alert.pk, now=now + timedelta(minutes=2)) == "sent"
    assert alert_deliver(alert_id=alert.pk, now=now + timedelta(minutes=5)) == "not ours"
    assert len(alert_emails()) == 1


@pytest.mark.django_db
def test_webhook_payload_is_signed_and_the_signature_verifies(
    personas, hook, webhook_receiver, django_capture_on_commit_callbacks
):
    now_budget(personas.org, "project", "2", project=personas.chatbot_project, thresholds=[50])
    with django_capture_on_commit_callbacks(execute=True):
        ingest(personas.org, [recent_spend("1.25", project="chatbot")])
    ((headers, body),) = webhook_receiver.deliveries
    stamp, signature = headers["X-Usage-Timestamp"], headers["X-Usage-Signature"]
    # What a receiver computes, independently of our code.
    expected = hmac.new(hook.secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256)
    assert signature == "sha256=" + expected.hexdigest()
    assert webhook_verify(hook.secret, signature=signature, timestamp=stamp, body=body)
    assert not webhook_verify(hook.secret, signature=signature, timestamp=stamp, body=body + b" ")
    assert not webhook_verify("whsec_other", signature=signature, timestamp=stamp, body=body)
    assert not webhook_verify(
        hook.secret, signature=signature, timestamp=stamp, body=body, now=int(stamp) + 3600
    )
    payload = json.loads(body)
    assert payload["type"] == "budget.threshold_reached"
    assert payload["threshold_percent"] == 50
    assert payload["spent_usd"] == "1.250000000"
    assert payload["budget"]["limit_usd"] == "2.000000000"
    assert payload["budget"]["scope"] == {
        "type": "project",
        "id": personas.chatbot_project.id,
        "name": "Chatbot",
    }
    assert headers["Content-Type"] == "application/json"


def test_signature_is_hmac_sha256_of_timestamp_dot_body():
    assert webhook_signature("k", 1700000000, b"{}") == (
        "sha256=" + hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    )


@pytest.mark.django_db
def test_webhooks_to_private_addresses_are_refused_in_production(
    personas, hook, webhook_receiver, settings, django_capture_on_commit_callbacks
):
    settings.BUDGET_WEBHOOK_ALLOW_PRIVATE = False
    now_budget(personas.org, "org", "1", thresholds=[100])
    with django_capture_on_commit_callbacks(execute=True):
        ingest(personas.org, [recent_spend("1")])
    alert = BudgetAlert.objects.get()
    assert webhook_receiver.attempts == 0
    assert "https" in alert.last_error or "public" in alert.last_error


# ---------------------------------------------------------------------------------------
# Concurrency: many senders cross the thresholds at once


@pytest.mark.django_db(transaction=True)
def test_concurrent_ingestion_alerts_each_threshold_exactly_once(
    live_server, personas, hook, webhook_receiver
):
    budget = now_budget(personas.org, "user", "10", user=personas.member)
    senders, batches = 6, 4
    start = threading.Barrier(senders)
    answers, errors = [], []

    def send(n: int) -> None:
        try:
            start.wait()
            for b in range(batches):
                events = [
                    recent_spend("0.25", user="member@example.test", request_id=f"c{n}-{b}-{i}")
                    for i in range(2)
                ]
                answers.append(post_events(live_server.url, personas.service_token.secret, events))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {status for status, _ in answers} == {200}
    # 12 USD of 10: every threshold reached; the sweep finds nothing left to do.
    budgets_sweep()
    assert thresholds_alerted(budget) == [50, 80, 100]
    assert len(alert_emails()) == 3
    assert sorted(p["threshold_percent"] for p in webhook_receiver.payloads()) == [50, 80, 100]
    assert set(BudgetAlert.objects.values_list("state", flat=True)) == {AlertState.SENT}


# ---------------------------------------------------------------------------------------
# The broker is down


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.django_db
def test_with_the_broker_down_ingestion_answers_and_the_sweep_sends_later(
    client, personas, hook, webhook_receiver, django_capture_on_commit_callbacks
):
    budget = now_budget(personas.org, "org", "10")
    with (
        celery_broker(f"redis://127.0.0.1:{_closed_port()}/15"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        started = time.monotonic()
        response = client.post(
            "/api/v1/events",
            data=json.dumps({"events": [recent_spend("9")]}),
            content_type="application/json",
            **bearer(personas.service_token),
        )
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json()["accepted"] == 1
    assert elapsed < 5, f"ingestion waited {elapsed:.1f} s on the broker"
    assert BudgetAlert.objects.count() == 0 and alert_emails() == []

    # The broker is back: the periodic sweep records and sends what was missed, once.
    with django_capture_on_commit_callbacks(execute=True):
        tasks.budgets_sweep.delay()
    assert thresholds_alerted(budget) == [50, 80]
    assert len(alert_emails()) == 2
    assert len(webhook_receiver.deliveries) == 2
    with django_capture_on_commit_callbacks(execute=True):
        tasks.budgets_sweep.delay()
    assert len(alert_emails()) == 2


@pytest.mark.django_db
def test_an_alert_whose_delivery_was_lost_is_resent_by_the_sweep(
    personas, webhook_receiver, hook, django_capture_on_commit_callbacks
):
    budget = now_budget(personas.org, "org", "1", thresholds=[100])
    ingest(personas.org, [recent_spend("1")])
    with (
        celery_broker(f"redis://127.0.0.1:{_closed_port()}/15"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        created = budget_alerts_evaluate(budget=budget)  # its delivery message is lost
    assert [a.state for a in created] == [AlertState.PENDING]
    later = datetime.now(UTC) + timedelta(minutes=1)
    with django_capture_on_commit_callbacks(execute=True):
        result = budgets_sweep(now=later)
    assert result.resent == 1
    assert BudgetAlert.objects.get().state == AlertState.SENT
    assert len(alert_emails()) == 1


# ---------------------------------------------------------------------------------------
# A real worker and the real Redis


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_sends_each_alert_once(personas, hook, webhook_receiver, tmp_path):
    if connection.vendor != "postgresql":
        pytest.skip("the worker shares the test database: run with DATABASE_URL (PostgreSQL)")
    if not _redis_up():
        pytest.skip(f"no Redis at {REDIS_URL}")
    budget = now_budget(personas.org, "org", "10")
    webhook_receiver.fail_next(1)  # the first webhook attempt fails: a real retry
    with celery_worker(
        tmp_path,
        "budgets",
        EMAIL_BACKEND="django.core.mail.backends.console.EmailBackend",
        BUDGET_WEBHOOK_ALLOW_PRIVATE="true",
        BUDGET_ALERT_RETRY_SECONDS="1",
    ) as (worker, log):
        # Two batches cross 50 % and then 80 %; extra checks and a duplicate
        # delivery message must not send anything twice.
        ingest(personas.org, [recent_spend("6")])
        ingest(personas.org, [recent_spend("2.5")])
        tasks.budget_check.delay(budget.id)
        _wait(lambda: BudgetAlert.objects.filter(budget=budget).count() == 2, worker, log)
        for alert_id in BudgetAlert.objects.values_list("id", flat=True):
            tasks.alert_deliver.delay(alert_id)
        _wait(
            lambda: set(BudgetAlert.objects.values_list("state", flat=True)) == {"sent"},
            worker,
            log,
        )
        time.sleep(2)  # give any duplicate a chance to show up
    output = log.read_text()
    assert thresholds_alerted(budget) == [50, 80]
    assert sorted(p["threshold_percent"] for p in webhook_receiver.payloads()) == [50, 80]
    assert webhook_receiver.attempts == 3  # one failed attempt, retried once
    assert output.count("Subject: Budget ") == 2, output[-3000:]
