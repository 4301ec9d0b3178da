"""`make bench`: load N events into a fresh PostgreSQL database and measure everything.

    python -m bench [--events N] [--days D] [--skip-load] [--out bench-reports]

Environment: BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/usage_bench;
the database is dropped and recreated unless --skip-load), BENCH_WORKERS (loader
processes, default 2), BENCH_CHUNK (rows per transaction, 50000), BENCH_REPEAT (timed
requests per measurement, 20), BENCH_NAIVE_REPEAT (raw-aggregation baseline runs, 3),
BENCH_FILTER_RANGES (ranges measured with the team + model filter, default all),
BENCH_ONLY (steps to measure), BENCH_INGEST_BATCHES (batches of 500 events per ingestion
measurement and per database upsert method, default 96), BENCH_REDIS_URL (broker of the
roll-up fold worker during the ingestion step, default redis://127.0.0.1:6379/14, emptied
first; without Redis the roll-ups are counted in each batch's transaction).

Exit status: 1 on errors (a non-200 answer, an exception), never because of times.
"""

import argparse
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/usage_bench"


def _log(*args):
    print(*args, flush=True)


def recreate_database(url: str) -> None:
    import psycopg

    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    admin = parsed._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


EVENTS_TABLE = "metering_usageevent"
CLUSTER_INDEX = "event_org_time"


def drop_event_indexes() -> list[tuple[str, str]]:
    """Drop the events table's secondary indexes (not those behind a constraint: the
    primary key, and (organization, request_id), which ON CONFLICT needs) and return
    (name, CREATE INDEX statement) of each: building an index once over the loaded,
    clustered rows is much cheaper than keeping it up to date through millions of
    inserts at random places."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i "
            "WHERE i.indrelid = %s::regclass AND NOT EXISTS "
            "(SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid) ORDER BY 1",
            [EVENTS_TABLE],
        )
        dropped = [(name.strip('"'), sql) for name, sql in cursor.fetchall()]
        for name, _ in dropped:
            cursor.execute(f'DROP INDEX "{name}"')
    return dropped


def create_indexes(indexes: list[tuple[str, str]], log) -> None:
    from django.db import connection

    connection.ensure_connection()
    with connection.cursor() as cursor:
        cursor.execute("SET maintenance_work_mem = '1GB'")
        for name, sql in indexes:
            t0 = time.monotonic()
            cursor.execute(sql)
            log(f"    {name}: {time.monotonic() - t0:.0f} s")


def cluster_order() -> list[tuple[str, str]]:
    """(table, index) for CLUSTER: the events by (organization, time), every roll-up by
    its primary key (organization, bucket, ...)."""
    from django.db import connection

    from metering.aggregates import ROLLUPS
    from metering.models import BudgetSpend15m

    out = [(EVENTS_TABLE, CLUSTER_INDEX)]
    with connection.cursor() as cursor:
        for model in [r.model for r in ROLLUPS] + [BudgetSpend15m]:
            table = model._meta.db_table
            cursor.execute(
                "SELECT indexrelid::regclass::text FROM pg_index "
                "WHERE indrelid = %s::regclass AND indisprimary",
                [table],
            )
            out += [(table, row[0].strip('"')) for row in cursor.fetchall()]
    return out


def vacuum_analyze(title: str) -> float:
    """VACUUM ANALYZE the whole bench database; returns the seconds it took."""
    from django.db import connection

    _log(title)
    t0 = time.monotonic()
    connection.ensure_connection()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    return round(time.monotonic() - t0, 1)


def check_sample(org_days: list[tuple[int, int]], errors: list, log) -> dict:
    """Compare the counted roll-ups with the raw events (metering.aggregates.reconcile_day,
    in Python) for each organization's first, middle and last day; a mismatch is an error."""
    from metering.aggregates import reconcile_day

    by_org: dict[int, list[int]] = {}
    for org_id, day in org_days:
        by_org.setdefault(org_id, []).append(day)
    sample = sorted({(o, d[i]) for o, d in by_org.items() for i in (0, len(d) // 2, -1)})
    log(f"==> checking the roll-ups of {len(sample)} organization-days against the raw events")
    problems = 0
    for org_id, day in sample:
        found = reconcile_day(org_id, day)
        problems += len(found)
        errors += [f"roll-up mismatch, organization {org_id}: {p}" for p in found[:5]]
    return {"days": len(sample), "problems": problems}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--events", type=int, default=int(os.environ.get("N", 10_000_000)))
    parser.add_argument("--days", type=int, default=int(os.environ.get("DAYS", 90)))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-load", action="store_true", help="measure the existing DB")
    parser.add_argument("--load-only", action="store_true", help="load, do not measure")
    parser.add_argument("--out", default=str(ROOT / "bench-reports"))
    args = parser.parse_args(argv)

    url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_URL)
    # Settings read the environment at import: point them at the bench DB first.
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("USAGE_ENV", "development")
    os.environ["DEBUG"] = "0"  # no query log in memory, no debug toolbar work
    os.environ.setdefault("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver")
    os.environ.setdefault("INGEST_RATE_LIMIT_PER_MINUTE", "0")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "usage_dashboard.settings")
    sys.path.insert(0, str(ROOT))

    report: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "database": urlparse(url)._replace(netloc=urlparse(url).hostname or "").geturl(),
        "events": args.events,
        "days": args.days,
        "errors": [],
    }
    if not args.skip_load:
        _log(f"==> recreating {urlparse(url).path.lstrip('/')}")
        recreate_database(url)

    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    _log("==> migrate")
    call_command("migrate", verbosity=0, interactive=False)

    if not args.skip_load:
        from .load import load

        workers = int(os.environ.get("BENCH_WORKERS", 2))
        chunk = int(os.environ.get("BENCH_CHUNK", 50_000))
        dropped = drop_event_indexes()
        _log(f"==> {len(dropped)} secondary indexes of the events dropped, built after the load")
        _log(
            f"==> loading {args.events:,} events over {args.days} days (bulk path, {workers} workers)"
        )
        report["load"] = load(args.events, args.days, args.seed, workers, chunk, log=_log)
        _log(
            f"    {report['load']['events']:,} events in {report['load']['seconds']} s "
            f"({report['load']['events_per_s']:,} events/s)"
        )
        # Live events arrive in time order, so a day's events (and roll-up rows) sit
        # together on disk; the loader draws them over the whole range at random. Put
        # them in the order production would have them, then count each day from them.
        t0 = time.monotonic()
        first = [(name, sql) for name, sql in dropped if name == CLUSTER_INDEX]
        _log("==> the events' (organization, time) index")
        create_indexes(first, _log)
        _log("==> CLUSTER the events by (organization, time)")
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SET maintenance_work_mem = '1GB'")
            cursor.execute(f'CLUSTER "{EVENTS_TABLE}" USING "{CLUSTER_INDEX}"')
            cursor.execute(f'ANALYZE "{EVENTS_TABLE}"')
        report["cluster_seconds"] = round(time.monotonic() - t0, 1)
        from metering.bulk import loaded_days

        from .load import count

        org_days = loaded_days()
        # The viewer roll-ups are kept for every organization: their links and zone first,
        # then counting each day fills them with the rest.
        from metering.viewers import build_organization

        for org_id in sorted({org for org, _ in org_days}):
            build_organization(org_id, count=False)
        _log(
            f"==> counting {len(org_days)} organization-days into the roll-ups ({workers} workers)"
        )
        report["count"] = count(org_days, workers, log=_log)
        _log(f"    {report['count']['days']} days in {report['count']['seconds']} s")
        t0 = time.monotonic()
        _log("==> CLUSTER the roll-ups by their keys")
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SET maintenance_work_mem = '1GB'")
            for table, index in cluster_order()[1:]:
                cursor.execute(f'CLUSTER "{table}" USING "{index}"')
        report["cluster_seconds"] += round(time.monotonic() - t0, 1)
        try:
            from django.utils import timezone

            from metering.demo import demo_budgets

            demo_budgets(now=timezone.now())
        except Exception as exc:  # budgets are optional for the benchmark
            report.setdefault("notes", []).append(f"demo budgets not created: {exc!r}")
        _log("==> the events' other indexes")
        t0 = time.monotonic()
        create_indexes([(n, sql) for n, sql in dropped if n != CLUSTER_INDEX], _log)
        report["index_build_seconds"] = round(time.monotonic() - t0, 1)
        report["vacuum_analyze_seconds"] = vacuum_analyze("==> VACUUM ANALYZE")
        report["exactness"] = check_sample(org_days, report["errors"], _log)
    if args.load_only:
        for e in report["errors"]:
            _log("  - " + str(e)[:2000])
        _log(f"==> loaded; roll-ups checked: {report.get('exactness')}")
        return 1 if report["errors"] else 0

    if args.skip_load:
        # What earlier runs' ingestion steps left (their events removed, their folds'
        # old row versions) vacuumed away, as a fresh load leaves it: where autovacuum
        # is off or behind, it would otherwise slow every read measured after them.
        report["vacuum_analyze_seconds"] = vacuum_analyze(
            "==> VACUUM ANALYZE (what earlier runs left)"
        )

    from .measure import measure_all
    from .report import write_report

    try:
        measure_all(report, url, log=_log)
    except Exception:
        import traceback

        report["errors"].append("measurement crashed:\n" + traceback.format_exc())
    md, js = write_report(report, Path(args.out))
    _log(f"\n==> report: {md}\n           {js}")
    if report["errors"]:
        _log(f"\n{len(report['errors'])} error(s):")
        for e in report["errors"][:30]:
            _log("  - " + str(e)[:2000])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
