"""Helpers for the budget, alert and pool tests: builders, a webhook receiver, and a way
to point Celery at another broker for one test.

Fixtures here are plain functions decorated with @pytest.fixture; a test module makes
one available by assigning it (`webhook_receiver = budget_helpers.webhook_receiver`).
"""

import json
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from metering.models import Budget
from tests.factories import event_payload
from usage_dashboard.celery import app as celery_app


def spend_event(cost: str | Decimal, **fields) -> dict:
    """An event costing exactly `cost` USD (sent as a decimal string)."""
    return event_payload(cost_usd=str(cost), **fields)


def make_budget(org, subject: str = "org", amount: str = "10", **fields) -> Budget:
    fields.setdefault("period", "monthly")
    return Budget.objects.create(
        organization=org, subject=subject, amount_usd=Decimal(amount), **fields
    )


def post_events(base_url: str, secret: str, events: list[dict]) -> tuple[int, dict]:
    """POST to a live server's ingestion API (for tests with real concurrency)."""
    request = urllib.request.Request(  # noqa: S310 - the test's own live server
        f"{base_url}/api/v1/events",
        data=json.dumps({"events": events}).encode(),
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class WebhookReceiver:
    """A local HTTP endpoint that records deliveries; can fail the next N of them."""

    def __init__(self):
        self.deliveries: list[tuple[dict, bytes]] = []
        self.attempts = 0
        self.failures_left = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.attempts += 1
                    fail = receiver.failures_left > 0
                    if fail:
                        receiver.failures_left -= 1
                    else:
                        receiver.deliveries.append((dict(self.headers), body))
                self.send_response(503 if fail else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/budget"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail_next(self, n: int) -> None:
        with self.lock:
            self.failures_left = n

    def payloads(self) -> list[dict]:
        return [json.loads(body) for _, body in self.deliveries]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_receiver():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


def _reset_producer_pools() -> None:
    # Celery caches the connection and producer pools of its broker URL: forget them so
    # the next publish takes the pools (kombu keeps one per URL) of the URL set now.
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


@contextmanager
def celery_broker(url: str, *, eager: bool = False):
    """Point Celery at `url` (and turn eager mode off) for the duration of the block."""
    saved = (celery_app.conf.broker_url, celery_app.conf.task_always_eager)
    _reset_producer_pools()
    celery_app.conf.broker_url = url
    celery_app.conf.task_always_eager = eager
    try:
        yield celery_app
    finally:
        _reset_producer_pools()
        celery_app.conf.broker_url, celery_app.conf.task_always_eager = saved
