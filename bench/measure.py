"""The measurements of `make bench` (see bench/__main__.py). Every function appends to
`report` and records errors (non-200 answers, exceptions) in report["errors"]."""

import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from django.db import connection
from django.db.models import Aggregate, Avg, Count, F, FloatField, Q, Sum
from django.db.models.functions import Trunc
from django.test import Client
from django.urls import NoReverseMatch, reverse

ROOT = Path(__file__).resolve().parent.parent
PERSONAS = {
    "org admin": "orgadmin@demo.test",
    "team lead": "lead@demo.test",
    "project admin": "projectadmin@demo.test",
    "member": "member@demo.test",
}
RANGES = ["1h", "24h", "7d", "30d", "90d"]
RANGE_LENGTH = {
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "90d": timedelta(days=90),
}
NAIVE_RANGES = ["30d", "90d"]
FILTER_MODEL = "gpt-4o-mini"


def _env_int(name, default):
    return int(os.environ.get(name, default))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p95 of 20 samples is the 19th smallest)."""
    ordered = sorted(values)
    rank = max(1, -(-int(q * len(ordered) * 1000) // 1000))
    return ordered[min(rank, len(ordered)) - 1]


def _stats(times: list[float]) -> dict:
    return {
        "n": len(times),
        "p50_ms": round(statistics.median(times), 2),
        "p95_ms": round(percentile(times, 0.95), 2),
        "max_ms": round(max(times), 2),
    }


def timed(fn, repeat: int, warmup: int = 1) -> tuple[dict, object]:
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return _stats(times), result


def _get(client: Client, url: str, errors: list, **extra):
    def call():
        response = client.get(url, **extra)
        if response.status_code != 200:
            errors.append(f"GET {url} answered {response.status_code}")
        elif getattr(response, "streaming", False):
            for _ in response.streaming_content:
                pass
        else:
            _ = response.content
        return response

    return call


# ---------------------------------------------------------------------------------------
# Naive baseline: the same numbers by plain aggregation over raw events


class P95(Aggregate):
    function = "percentile_cont"
    template = "percentile_cont(0.95) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()


def _kind(length: timedelta) -> str:
    if length <= timedelta(hours=3):
        return "minute"
    if length <= timedelta(days=3):
        return "hour"
    return "day"


def naive_widget(name: str, user, start: datetime, end: datetime, tz: ZoneInfo):
    from analytics.visibility import visible_events

    def events(a, b):
        return visible_events(user).filter(timestamp__gte=a, timestamp__lt=b)

    qs = events(start, end)
    kind = _kind(end - start)
    sums = {
        "n": Count("id"),
        "failed": Count("id", filter=Q(status_code__gte=400)),
        "inp": Sum("input_tokens"),
        "cached": Sum("cached_input_tokens"),
        "out": Sum("output_tokens"),
        "cost": Sum("cost_nanos"),
        "lat": Avg("latency_ms"),
    }
    if name == "metrics":
        out = []
        for a, b in ((start, end), (start - (end - start), start)):
            q = events(a, b)
            out.append(list(q.values("operation").annotate(**sums).order_by()))
            out.append(
                q.filter(operation__in=("chat", "completion")).aggregate(p=P95("latency_ms"))
            )
            out.append(q.filter(operation="embedding").aggregate(p=P95("latency_ms")))
            for column in ("user_id", "assistant", "workflow"):
                empty = (
                    Q(**{f"{column}__isnull": True}) if column == "user_id" else Q(**{column: ""})
                )
                out.append(q.exclude(empty).values(column).distinct().count())
        return out
    if name in ("requests", "tokens", "cost"):
        bucketed = qs.annotate(t=Trunc("timestamp", kind, tzinfo=tz)).values("t")
        return list(bucketed.annotate(**sums).order_by("t"))
    if name == "latency":
        out = []
        for ops in (("chat", "completion"), ("embedding",)):
            q = qs.filter(operation__in=ops).annotate(t=Trunc("timestamp", kind, tzinfo=tz))
            out.append(list(q.values("t").annotate(a=Avg("latency_ms"), p=P95("latency_ms"))))
        return out
    if name == "models":
        seen = events(end - timedelta(days=90), end).values("model").distinct()
        return list(qs.values("model").annotate(**sums).order_by()), list(seen)
    tokens = Sum(F("input_tokens") + F("output_tokens"))
    if name == "top_users":
        return list(qs.values("user_id").annotate(tok=tokens, **sums).order_by("-tok")[:5])
    if name == "top_models":
        return list(qs.values("model").annotate(tok=tokens, **sums).order_by("-tok")[:5])
    if name == "ranked":
        return list(qs.values("api_token_id").annotate(tok=tokens, **sums).order_by("-tok")[:25])
    raise ValueError(name)


# ---------------------------------------------------------------------------------------


def _url(name, *args):
    try:
        return reverse(name, args=args)
    except NoReverseMatch:
        return None


def measure_dashboard(report, users, team_id, log):
    from analytics.views import WIDGET_ORDER

    repeat = _env_int("BENCH_REPEAT", 20)
    naive_repeat = _env_int("BENCH_NAIVE_REPEAT", 3)
    filter_ranges = os.environ.get("BENCH_FILTER_RANGES", ",".join(RANGES)).split(",")
    errors = report["errors"]
    rows = report.setdefault("dashboard", [])
    variants = [(r, "") for r in RANGES] + [
        (r, f"&team={team_id}&model={FILTER_MODEL}") for r in filter_ranges if r
    ]
    for persona, user in users.items():
        client = Client()
        client.force_login(user)
        for period, extra in variants:
            filtered = bool(extra)
            for name in [*WIDGET_ORDER, "page"]:
                if name == "page":
                    url = f"/dashboard/?period={period}{extra}"
                else:
                    url = f"/dashboard/widgets/{name}/?period={period}{extra}"
                try:
                    stats, _ = timed(_get(client, url, errors), repeat)
                except Exception as exc:
                    errors.append(f"GET {url} as {persona}: {exc!r}")
                    continue
                row = {
                    "persona": persona,
                    "range": period,
                    "filter": "team+model" if filtered else "",
                    "widget": name,
                    **stats,
                }
                rows.append(row)
            log(
                f"  {persona:13s} {period:4s} {'team+model' if filtered else '':10s} "
                + " ".join(
                    f"{r['widget']}={r['p95_ms']:.0f}"
                    for r in rows
                    if r["persona"] == persona
                    and r["range"] == period
                    and r["filter"] == ("team+model" if filtered else "")
                )
            )
    # The naive baseline, same personas, 30 and 90 days, no filter.
    from accounts.middleware import viewer_timezone_name

    naive = report.setdefault("naive", [])
    # The baseline is plain SQL as PostgreSQL runs it by default: with its parallel
    # workers, which the application's own sessions turn off (DATABASE_PARALLEL_WORKERS).
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT boot_val FROM pg_settings WHERE name = 'max_parallel_workers_per_gather'"
        )
        server_workers = int(cursor.fetchone()[0])
        cursor.execute(f"SET max_parallel_workers_per_gather = {server_workers}")
    report["naive_parallel_workers"] = server_workers
    for persona, user in users.items():
        tz = ZoneInfo(viewer_timezone_name(user))
        for period in NAIVE_RANGES:
            for name in WIDGET_ORDER:
                end = datetime.now(UTC)
                start = end - RANGE_LENGTH[period]
                try:
                    stats, _ = timed(
                        lambda n=name, s=start, e=end, u=user, z=tz: naive_widget(n, u, s, e, z),
                        naive_repeat,
                        warmup=0,
                    )
                except Exception as exc:
                    errors.append(f"naive {name} {period} as {persona}: {exc!r}")
                    continue
                naive.append({"persona": persona, "range": period, "widget": name, **stats})
            log(
                f"  naive {persona:13s} {period}: "
                + " ".join(
                    f"{r['widget']}={r['p50_ms']:.0f}"
                    for r in naive
                    if r["persona"] == persona and r["range"] == period
                )
            )
    with connection.cursor() as cursor:
        cursor.execute("RESET max_parallel_workers_per_gather")


def measure_events_log(report, users, log):
    url = _url("events")
    if url is None:
        report.setdefault("notes", []).append("events log: no /events/ URL in this build")
        return
    repeat = _env_int("BENCH_REPEAT", 20)
    errors = report["errors"]
    rows = report.setdefault("events_log", [])
    cases = [
        ("page 1", "period=90d"),
        ("page 400", "period=90d&page=400"),
        ("sorted by cost, page 1", "period=90d&sort=cost&dir=desc"),
        ("sorted by cost, page 400", "period=90d&sort=cost&dir=desc&page=400"),
        ("amount 1000-2000, page 1", "period=90d&amount_min=1000&amount_max=2000"),
        ("amount 1000-2000, page 400", "period=90d&amount_min=1000&amount_max=2000&page=400"),
    ]
    for persona in ("org admin", "member"):
        client = Client()
        client.force_login(users[persona])
        for label, query in cases:
            full = f"{url}?{query}"
            try:
                stats, _ = timed(_get(client, full, errors), repeat)
            except Exception as exc:
                errors.append(f"GET {full}: {exc!r}")
                continue
            rows.append({"persona": persona, "case": label, **stats})
            log(
                f"  events log {persona:10s} {label:28s} p50 {stats['p50_ms']:.1f} p95 {stats['p95_ms']:.1f}"
            )


def measure_apis(report, users, log):
    from accounts.models import Organization
    from accounts.tokens import token_issue

    repeat = _env_int("BENCH_REPEAT", 20)
    errors = report["errors"]
    acme = Organization.objects.get(slug="acme")
    issued = token_issue(
        organization=acme, name="bench reader", owner=users["org admin"], scopes=["read"]
    )
    auth = {"HTTP_AUTHORIZATION": f"Bearer {issued.secret}"}
    client = Client()
    rows = report.setdefault("apis", [])
    end = int(time.time())
    url = f"/api/v1/usage?start_time={end - 90 * 86400}&end_time={end}&bucket_width=1d&limit=90&group_by=model"
    stats, _ = timed(_get(client, url, errors, **auth), repeat)
    rows.append({"api": "usage 90d, 1d buckets, by model", **stats})
    log(f"  usage API 90d/1d/model p50 {stats['p50_ms']:.1f} p95 {stats['p95_ms']:.1f}")
    check = _url("metering:api-budgets-check")
    if check is None:
        report.setdefault("notes", []).append("budget check API: no URL in this build")
        return
    full = f"{check}?user=member@demo.test"
    stats, _ = timed(_get(client, full, errors, **auth), max(repeat, 100))
    rows.append({"api": "budget check ?user=member@demo.test", **stats})
    log(f"  budget check p50 {stats['p50_ms']:.2f} p95 {stats['p95_ms']:.2f}")


# ---------------------------------------------------------------------------------------
# Ingestion over HTTP (gunicorn) against the database's own upsert rate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ingest_batches(n_batches: int, size: int, seed: int) -> list[list[dict]]:
    from accounts.models import Organization, User
    from metering.demo import _Clock, _event

    acme = Organization.objects.get(slug="acme")
    people = list(User.objects.filter(email__endswith="@acme.example").order_by("id")[:60])
    rng = random.Random(seed)

    class _Sender:  # what demo._event needs of a sender
        token = type("T", (), {"id": 0})()
        users = people
        preferred = {u.id: rng.randrange(21) for u in people}

    end = datetime.now(UTC) - timedelta(seconds=5)
    clock = _Clock(rng, end, 1, ZoneInfo(acme.timezone))
    clock.start = end - timedelta(minutes=10)  # recent events: the live case
    clock.cumulative = [1.0]
    batches, sessions = [], {}
    # Request ids new to this run (a --skip-load rerun must not resend the last run's).
    ids = random.Random(uuid.uuid4().int)
    for b in range(n_batches):
        batch = []
        for i in range(size):
            event = _event(rng, _Sender, clock, b * size + i, seed, sessions)
            event["request_id"] = str(uuid.UUID(int=ids.getrandbits(128)))
            batch.append(event)
        batches.append(batch)
    return batches


def _post_all(port, secret, bodies, clients, errors) -> tuple[float, list[float]]:
    times: list[float] = []
    accepted = [0]
    lock = threading.Lock()
    queue = list(enumerate(bodies))

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if not queue:
                    break
                _, body = queue.pop(0)
            t0 = time.perf_counter()
            try:
                conn.request(
                    "POST",
                    "/api/v1/events",
                    body=body,
                    headers={
                        "Authorization": f"Bearer {secret}",
                        "Content-Type": "application/json",
                    },
                )
                response = conn.getresponse()
                data = response.read()
                if response.status != 200:
                    errors.append(f"POST /api/v1/events answered {response.status}: {data[:300]!r}")
                else:
                    with lock:
                        accepted[0] += json.loads(data).get("accepted", 0)
            except Exception as exc:
                errors.append(f"POST /api/v1/events: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                times.append((time.perf_counter() - t0) * 1000)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, times, accepted[0]


def measure_ingest(report, url, log):
    from accounts.models import Organization
    from accounts.tokens import token_issue

    errors = report["errors"]
    acme = Organization.objects.get(slug="acme")
    issued = token_issue(
        organization=acme,
        name="bench gateway",
        owner=None,
        service_account="svc-bench",
        scopes=["ingest"],
    )
    size = 500
    # Batches per configuration. 96 x 500 events keep 4 clients busy for several seconds,
    # across several of the fold worker's windows: a sustained rate. A run of a second or
    # two measured a burst, and whether a fold landed inside it swung the rate by a third.
    per_run = _env_int("BENCH_INGEST_BATCHES", 96)
    report["ingest_batches"] = per_run
    port = _free_port()
    env = dict(os.environ, DATABASE_URL=url, USAGE_ENV="development", DEBUG="0")
    env["INGEST_RATE_LIMIT_PER_MINUTE"] = "0"
    # Production's setup when Redis answers: a Celery worker folds each batch into the
    # roll-ups after ingestion answered (ROLLUPS_DEFERRED); without Redis, the roll-ups
    # are counted in each batch's transaction.
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    worker = _start_fold_worker(redis_url, env, errors) if _redis_up(redis_url) else None
    env["ROLLUPS_DEFERRED"] = "1" if worker else "0"
    report["ingest_rollups"] = (
        "folded by a worker" if worker else "counted in the ingest transaction"
    )
    log(f"  roll-ups: {report['ingest_rollups']}")
    server = subprocess.Popen(  # noqa: S603 - our own gunicorn, fixed arguments
        [
            str(ROOT / ".venv/bin/gunicorn"),
            "usage_dashboard.wsgi",
            "-c",
            str(ROOT / "gunicorn.conf.py"),  # workers: WEB_CONCURRENCY or 2 x cores + 1
            "-b",
            f"127.0.0.1:{port}",
            "--timeout",
            "300",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    rows = report.setdefault("ingest", [])
    report["gunicorn_workers"] = int(
        os.environ.get("WEB_CONCURRENCY") or (os.cpu_count() or 1) * 2 + 1
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            errors.append("gunicorn did not start")
            return
        # Warm every worker up (imports, its database connection) with batches not timed.
        for warm in _ingest_batches(report["gunicorn_workers"] * 2, size, 909):
            _post_all(port, issued.secret, [json.dumps({"events": warm}).encode()], 1, errors)[:2]
        for clients, seed in ((1, 101), (4, 202)):
            batches = _ingest_batches(per_run, size, seed)
            bodies = [json.dumps({"events": b}).encode() for b in batches]
            settle_database(log)
            for kind in ("new", "duplicate"):
                seconds, times, accepted = _post_all(port, issued.secret, bodies, clients, errors)
                # How long after the last answer the worker had every event folded.
                lag = _fold_lag(errors) if worker else None
                expected = len(bodies) * size if kind == "new" else 0
                if accepted != expected:
                    errors.append(f"ingest {kind} x{clients}: {accepted} accepted, not {expected}")
                rate = len(bodies) * size / seconds
                rows.append(
                    {
                        "clients": clients,
                        "events": kind,
                        "batches": len(bodies),
                        "batch_size": size,
                        "events_per_s": round(rate),
                        "p50_batch_ms": round(statistics.median(times), 1),
                        "p95_batch_ms": round(percentile(times, 0.95), 1),
                        "fold_lag_s": lag,
                    }
                )
                log(
                    f"  HTTP ingest {clients} client(s), {kind:9s}: {rate:,.0f} events/s, "
                    f"p95 batch {percentile(times, 0.95):.0f} ms"
                    + (f", all folded {lag:.2f} s after the last answer" if lag is not None else "")
                )
    finally:
        for process in (server, worker):
            if process is None:
                continue
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    forget_bench_events(issued.token, log)
    report["db_upsert"] = measure_db_upsert(per_run, size, log)


def _redis_up(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


FOLD_WORKER = """
import django
django.setup()
from usage_dashboard.celery import app
app.worker_main(["worker", "--pool=solo", "--without-mingle", "--without-gossip",
                 "--without-heartbeat", "-l", "WARNING"])
"""


def _start_fold_worker(redis_url: str, env: dict, errors: list):
    """A Celery worker (one process) on `redis_url`, emptied of old messages first."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    env["REDIS_URL"] = redis_url
    return subprocess.Popen(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c", FOLD_WORKER],
        cwd=ROOT,
        env=dict(env, DJANGO_SETTINGS_MODULE="usage_dashboard.settings"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _fold_lag(errors: list, timeout: float = 600) -> float | None:
    """Seconds until no event is pending for the roll-ups (polled every 10 ms)."""
    from metering.models import RollupPending

    t0 = time.perf_counter()
    while RollupPending.objects.exists():
        if time.perf_counter() - t0 > timeout:
            errors.append(f"events still pending {timeout:.0f} s after ingestion")
            return None
        time.sleep(0.01)
    return round(time.perf_counter() - t0, 2)


def settle_database(log) -> None:
    """Every timed ingestion run, over HTTP or straight into the database, starts from
    the same state: the events an earlier run deleted vacuumed away (their dead index
    entries slowed the next run's inserts and duplicate checks by a third), and no
    checkpoint of an earlier step still writing (CHECKPOINT needs a superuser or
    pg_checkpoint; without it the run starts as it is)."""
    from django.db import DatabaseError

    from metering.models import UsageEvent

    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM (ANALYZE) {connection.ops.quote_name(UsageEvent._meta.db_table)}")
        try:
            cursor.execute("CHECKPOINT")
        except DatabaseError as exc:
            log(f"  no CHECKPOINT before the run: {str(exc).strip()}")


def forget_bench_events(token, log) -> None:
    """Remove what the ingestion measurement sent (and recount the days it touched), so
    the database stays as loaded and a --skip-load rerun measures the same data."""
    from metering.aggregates import rebuild_day
    from metering.models import UsageEvent

    sent = UsageEvent.objects.filter(organization_id=token.organization_id, api_token=token)
    days = {int(d.timestamp()) for d in sent.datetimes("timestamp", "day", tzinfo=UTC)}
    removed, _ = sent.delete()
    for day in sorted(days):
        rebuild_day(token.organization_id, day)
    log(f"  removed the {removed:,} events sent over HTTP; recounted {len(days)} day(s)")


def measure_db_upsert(n_batches: int, size: int, log) -> dict:
    """The database's own rate of INSERT ... ON CONFLICT DO NOTHING RETURNING id into the
    same table, one transaction per batch of `size`, by two methods: psycopg executemany
    (pipelined single-row statements) and one statement unnesting column arrays (what
    ingestion itself does), and the unnest one from 4 connections at once.
    `new_events_per_s` is the fastest of them, so the ingest ratio is measured against
    the best the database does."""
    import psycopg

    from accounts.models import Organization
    from metering.bulk import rows_from_events
    from metering.ingest import EVENT_COLUMNS
    from metering.models import UsageEvent

    acme = Organization.objects.get(slug="acme")
    batches = _ingest_batches(n_batches, size, 303)
    rows = []
    for batch in batches:
        rows.append(
            rows_from_events(
                organization=acme, token=None, events=batch, now=datetime.now(UTC)
            ).rows
        )
    columns = ", ".join(f'"{c}"' for c in EVENT_COLUMNS)
    conflict = " ON CONFLICT (organization_id, request_id) DO NOTHING RETURNING id"
    single = f"INSERT INTO metering_usageevent ({columns}) VALUES ({', '.join(['%s'] * len(EVENT_COLUMNS))}){conflict}"
    types = [UsageEvent._meta.get_field(c).db_type(connection) for c in EVENT_COLUMNS]
    arrays = ", ".join(f"%s::{t}[]" for t in types)
    unnest = (
        f"INSERT INTO metering_usageevent ({columns}) SELECT {columns} FROM unnest({arrays}) "
        f"WITH ORDINALITY AS r({columns}, _n) ORDER BY _n{conflict}"
    )

    def executemany(cur, chunk):
        cur.executemany(single, chunk, returning=True)

    def one_statement(cur, chunk):
        cur.execute(unnest, [list(column) for column in zip(*chunk, strict=True)])
        cur.fetchall()

    settings = connection.settings_dict

    def connect():
        return psycopg.connect(
            host=settings["HOST"] or None,
            port=settings["PORT"] or None,
            user=settings["USER"],
            password=settings["PASSWORD"] or None,
            dbname=settings["NAME"],
        )

    with connect() as conn:
        out = {}
        ids = [r[1] for chunk in rows for r in chunk]
        for method, run in (("executemany", executemany), ("unnest", one_statement)):
            settle_database(log)
            for kind in ("new", "duplicate"):
                t0 = time.perf_counter()
                for chunk in rows:
                    with conn.transaction(), conn.cursor() as cur:
                        run(cur, chunk)
                seconds = time.perf_counter() - t0
                out[f"{method}_{kind}_events_per_s"] = round(sum(map(len, rows)) / seconds)
            with conn.transaction():
                conn.execute(
                    "DELETE FROM metering_usageevent "
                    "WHERE organization_id = %s AND request_id = ANY(%s)",
                    [acme.id, ids],
                )
        # The same unnest inserts from 4 connections at once (as 4 HTTP clients send):
        # the database's own rate with the concurrency the HTTP figure has.
        parts = [rows[i::4] for i in range(4)]

        def insert_part(part):
            with connect() as own:
                for chunk in part:
                    with own.transaction(), own.cursor() as cur:
                        one_statement(cur, chunk)

        threads = [threading.Thread(target=insert_part, args=(part,)) for part in parts]
        settle_database(log)
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["unnest_4_connections_new_events_per_s"] = round(
            sum(map(len, rows)) / (time.perf_counter() - t0)
        )
        with conn.transaction():
            conn.execute(
                "DELETE FROM metering_usageevent "
                "WHERE organization_id = %s AND request_id = ANY(%s)",
                [acme.id, ids],
            )
        out["new_events_per_s"] = max(
            out["executemany_new_events_per_s"],
            out["unnest_new_events_per_s"],
            out["unnest_4_connections_new_events_per_s"],
        )
        out["duplicate_events_per_s"] = max(
            out["executemany_duplicate_events_per_s"], out["unnest_duplicate_events_per_s"]
        )
        log(
            f"  DB upsert ({size}/txn): executemany new {out['executemany_new_events_per_s']:,} "
            f"/ duplicates {out['executemany_duplicate_events_per_s']:,} events/s; unnest new "
            f"{out['unnest_new_events_per_s']:,} / duplicates "
            f"{out['unnest_duplicate_events_per_s']:,} events/s; unnest from 4 connections "
            f"new {out['unnest_4_connections_new_events_per_s']:,} events/s"
        )
    return out


# ---------------------------------------------------------------------------------------
# CSV export of 1,000,000 events: time and peak RSS, in a child process

EXPORT_CHILD = r"""
import os, sys, time, resource
import django
django.setup()
from django.test import Client
from accounts.models import User
client = Client()
client.force_login(User.objects.get(email="orgadmin@demo.test"))
url = sys.argv[1]
t0 = time.perf_counter()
response = client.get(url)
size = 0
lines = 0
if response.status_code != 200:
    print("STATUS", response.status_code, response.get("Location", ""))
    sys.exit(2)
chunks = response.streaming_content if response.streaming else [response.content]
for chunk in chunks:
    size += len(chunk)
    lines += chunk.count(b"\n")
seconds = time.perf_counter() - t0
# Its own peak in kB: VmHWM, the high-water mark of this process's memory since exec.
# Not ru_maxrss: Linux carries the parent's peak at fork across exec into it, and the
# parent (the bench, after the dashboard step) is itself larger than the export.
peak = None
try:
    with open("/proc/self/status") as status:
        peak = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT", seconds, size, lines, peak)
"""


def measure_export(report, url, log, target_rows=1_000_000):
    from accounts.models import Organization
    from metering.models import UsageEvent

    export = _url("events-export")
    if export is None:
        report.setdefault("notes", []).append("CSV export: no events export URL in this build")
        return
    acme = Organization.objects.get(slug="acme")
    total = UsageEvent.objects.filter(organization=acme).count()
    n = min(target_rows, total)
    boundary = (
        UsageEvent.objects.filter(organization=acme)
        .order_by("-timestamp")
        .values_list("timestamp", flat=True)[n - 1 : n]
    )
    start = next(iter(boundary))
    tz = ZoneInfo(acme.timezone)
    local = start.astimezone(tz).replace(tzinfo=None)
    # Whole minutes in the URL: start one minute early, then the count is ~n.
    start_s = (local.replace(second=0, microsecond=0)).strftime("%Y-%m-%dT%H:%M")
    end_s = (datetime.now(tz) + timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M")
    full = f"{export}?period=custom&start={start_s}&end={end_s}"
    env = dict(os.environ, DATABASE_URL=url, DEBUG="0", EXPORT_ASYNC_THRESHOLD=str(10**9))
    t0 = time.perf_counter()
    done = subprocess.run(  # noqa: S603 - our own interpreter, fixed script
        [sys.executable, "-c", EXPORT_CHILD, full],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    seconds = time.perf_counter() - t0
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if done.returncode != 0 or not result:
        report["errors"].append(
            f"CSV export failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-1500:]}"
        )
        return
    _, secs, size, lines, peak = result[0].split()
    peak_kb = int(peak)
    report["export"] = {
        "rows": int(lines) - 1,
        "bytes": int(size),
        "seconds": round(float(secs), 1),
        "process_seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "note": "the export process's own peak RSS, VmHWM (Django loaded + the streamed response)",
    }
    log(
        f"  CSV export {int(lines) - 1:,} rows in {float(secs):.1f} s, peak RSS {peak_kb / 1024:.0f} MB"
    )


# ---------------------------------------------------------------------------------------


def machine_speed() -> dict:
    """This machine's speed right now, so runs minutes or days apart can be compared:
    the median of 5 runs of a fixed pure-Python loop (one core's speed), and of 50
    `SELECT 1` round trips to the database (loopback and backend). Both have been seen
    to move by 2-3x over an hour here with nothing else running; every time in a report
    moves with them."""
    python = []
    for _ in range(5):
        t0 = time.perf_counter()
        sum(range(10**6))
        python.append((time.perf_counter() - t0) * 1000)
    trips = []
    with connection.cursor() as cursor:
        for _ in range(50):
            t0 = time.perf_counter()
            cursor.execute("SELECT 1")
            cursor.fetchone()
            trips.append((time.perf_counter() - t0) * 1000)
    return {
        "python_loop_ms": round(statistics.median(python), 1),
        "select_1_ms": round(statistics.median(trips), 3),
    }


def measure_all(report, url, log=print):
    from accounts.models import Organization, Team, User

    users = {persona: User.objects.get(email=email) for persona, email in PERSONAS.items()}
    acme = Organization.objects.get(slug="acme")
    team_id = Team.objects.get(organization=acme, slug="platform").id
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM metering_usageevent")
        report["rows_in_db"] = cursor.fetchone()[0]
        # The days the data spans (a --skip-load run does not know them otherwise).
        cursor.execute("SELECT min(bucket), max(bucket) FROM metering_org_usage_daily")
        first, last = cursor.fetchone()
        if first is not None:
            report["days_spanned"] = (last - first) // 86400 + 1
        sizes = {}
        from metering.aggregates import ROLLUPS

        for table in ("metering_usageevent", *(r.model._meta.db_table for r in ROLLUPS)):
            cursor.execute(
                "SELECT reltuples::bigint, pg_total_relation_size(oid) FROM pg_class WHERE relname = %s",
                [table],
            )
            found = cursor.fetchone()
            if found:
                sizes[table] = {"rows": int(found[0]), "mb": round(found[1] / 2**20, 1)}
        report["tables"] = sizes
        # The server's memory and planner settings: the numbers depend on them.
        cursor.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name IN "
            "('server_version', 'shared_buffers', 'work_mem', 'effective_cache_size', "
            "'random_page_cost', 'max_parallel_workers_per_gather') ORDER BY name"
        )
        report["server_settings"] = dict(cursor.fetchall())
    steps = [
        (
            "dashboard widgets (and the naive baseline)",
            lambda: measure_dashboard(report, users, team_id, log),
        ),
        ("events log", lambda: measure_events_log(report, users, log)),
        ("usage and budget check APIs", lambda: measure_apis(report, users, log)),
        ("CSV export", lambda: measure_export(report, url, log)),
        ("ingestion over HTTP", lambda: measure_ingest(report, url, log)),
    ]
    report["machine_speed"] = {"start": machine_speed()}
    only = os.environ.get("BENCH_ONLY")
    for title, step in steps:
        if only and not any(word in title for word in only.split(",")):
            continue
        log(f"==> {title}")
        t0 = time.monotonic()
        try:
            step()
        except Exception:
            import traceback

            report["errors"].append(f"{title} crashed:\n{traceback.format_exc()}")
        report.setdefault("step_seconds", {})[title] = round(time.monotonic() - t0, 1)
    report["machine_speed"]["end"] = machine_speed()
