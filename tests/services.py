"""Helpers of the `services` tests: the real Redis and a real Celery worker process."""

import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

import pytest
from django.db import connection

from tests.metering.budget_helpers import celery_broker

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def database_url() -> str:
    s = connection.settings_dict
    auth = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


WORKER = """
import sys, django
django.setup()
from usage_dashboard.celery import app
app.conf.task_default_queue = sys.argv[1]
app.worker_main(["worker", "--pool=solo", "-Q", sys.argv[1], "--without-mingle",
                 "--without-gossip", "--without-heartbeat", "-l", "INFO"])
"""


def wait_for(condition, worker, log, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if worker.poll() is not None:
            pytest.fail(f"the worker exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out; worker log:\n{log.read_text()[-3000:]}")


@contextmanager
def celery_worker(tmp_path, name: str, **env):
    """A real worker process on a queue of its own over REDIS_URL (extra settings in
    `env`), with this process's Celery sending there; yields (worker, its log file)."""
    queue = f"test-{name}-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    environment = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="usage_dashboard.settings",
        DATABASE_URL=database_url(),
        DATABASE_CONN_MAX_AGE="0",
        REDIS_URL=REDIS_URL,
        USAGE_ENV="development",
        **env,
    )
    environment.pop("DATA_DIR", None)
    with log.open("w") as out:
        worker = subprocess.Popen(  # noqa: S603 - our own interpreter and code
            [sys.executable, "-c", WORKER, queue],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with celery_broker(REDIS_URL) as app:
            app.conf.task_default_queue = queue
            try:
                yield worker, log
            finally:
                app.conf.task_default_queue = "celery"
    finally:
        worker.terminate()
        worker.wait(timeout=30)
