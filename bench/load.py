"""Load N demo-distributed events through the bulk path, in worker processes.

The demo tenants are created once (metering.demo.demo_tenants); each worker then draws
events with the demo's own generator (`metering.demo._event`: senders, Zipf users,
preferred models, token counts, latencies, failures, daily/weekly rhythm, growth),
validates and prices them with ingest's functions (bulk.Resolved) and loads them with
`metering.bulk.load_chunk`, one transaction per chunk. The chunks store events only;
`count` then counts every (organization, UTC day) once into the roll-ups and spend
counters (`metering.bulk.count_days`), in worker processes over disjoint days: the same
SQL as ingestion, without touching every roll-up row again with every chunk.
"""

import multiprocessing as mp
import random
import time
from bisect import bisect_left
from datetime import UTC, datetime
from itertools import accumulate
from zoneinfo import ZoneInfo

from django.db import connections

from accounts.models import Membership, Organization
from metering.bulk import Resolved, count_days, load_chunk
from metering.demo import _Clock, _event, demo_tenants


def _membership_defaults(org, user_ids):
    defaults = {}
    rows = Membership.objects.filter(organization=org, user_id__in=user_ids).order_by("id")
    for user_id, team_id, project_id in rows.values_list("user_id", "team_id", "project_id"):
        team, project = defaults.get(user_id, (None, None))
        defaults[user_id] = (team or team_id, project or project_id)
    return defaults


def prepare(seed: int):
    """Create the tenants; returns senders with their resolvers (before forking)."""
    rng = random.Random(seed)
    senders = demo_tenants(rng)
    out = []
    for s in senders:
        ids = {u.email: u.id for u in s.users}
        user_ids = set(ids.values()) | ({s.token.owner_id} if s.token.owner_id else set())
        out.append((s, Resolved(s.org, s.token, ids, _membership_defaults(s.org, user_ids))))
    return out


def _worker(wid, count, seed, days, end_ts, chunk, senders, queue):
    try:
        rng = random.Random(seed * 7919 + wid)
        end = datetime.fromtimestamp(end_ts, UTC)
        clocks = {}
        for s, _ in senders:
            if s.org.id not in clocks:
                clocks[s.org.id] = _Clock(rng, end, days, ZoneInfo(s.org.timezone))
        cum = list(accumulate(s.weight for s, _ in senders))
        total = cum[-1]
        sessions: dict = {}
        index = wid * 10**12
        done = 0
        while done < count:
            size = min(chunk, count - done)
            rows = []
            while len(rows) < size:
                # The demo sends batches of 200-1000 events per token: keep that rhythm.
                sender, resolved = senders[bisect_left(cum, rng.random() * total)]
                for _ in range(min(size - len(rows), rng.randint(200, 1000))):
                    raw = _event(rng, sender, clocks[sender.org.id], index, seed, sessions)
                    index += 1
                    row = resolved.row(raw, end)
                    if row is not None:
                        rows.append(row)
            t0 = time.monotonic()
            inserted = load_chunk(rows, count=False)
            queue.put(("chunk", wid, len(rows), inserted, time.monotonic() - t0))
            done += size
        queue.put(("done", wid, 0, 0, 0.0))
    except BaseException as exc:  # report, never hang the parent
        import traceback

        queue.put(("error", wid, 0, 0, traceback.format_exc() or repr(exc)))
        raise


def load(n: int, days: int, seed: int, workers: int, chunk: int, log=print) -> dict:
    """Create tenants and load n events; returns timing facts."""
    t_start = time.monotonic()
    senders = prepare(seed)
    end_ts = int(time.time())
    connections.close_all()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    shares = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
    procs = [
        ctx.Process(target=_worker, args=(i, shares[i], seed, days, end_ts, chunk, senders, queue))
        for i in range(workers)
        if shares[i]
    ]
    rows = inserted = 0
    started = time.monotonic()
    last = 0.0

    def on_chunk(k, ins):
        nonlocal rows, inserted, last
        rows += k
        inserted += ins
        now = time.monotonic()
        if now - last >= 5 or rows == n:
            last = now
            rate = rows / (now - started)
            eta = (n - rows) / rate if rate else 0
            log(f"  loaded {rows:,}/{n:,} events  {rate:,.0f} events/s  eta {eta:,.0f} s")

    _run(procs, queue, on_chunk, "bulk load")
    seconds = time.monotonic() - started
    return {
        "events": rows,
        "inserted": inserted,
        "seconds": round(seconds, 1),
        "events_per_s": round(rows / seconds) if seconds else 0,
        "workers": workers,
        "chunk": chunk,
        "setup_seconds": round(started - t_start, 1),
        "end": end_ts,
        "orgs": list(Organization.objects.order_by("id").values_list("slug", flat=True)),
    }


def _count_worker(wid, days, queue):
    try:
        for org_day in days:
            t0 = time.monotonic()
            count_days([org_day])
            queue.put(("day", wid, 1, 0, time.monotonic() - t0))
        queue.put(("done", wid, 0, 0, 0.0))
    except BaseException as exc:
        import traceback

        queue.put(("error", wid, 0, 0, traceback.format_exc() or repr(exc)))
        raise


def count(org_days: list[tuple[int, int]], workers: int, log=print) -> dict:
    """Count the loaded days into every roll-up, in `workers` processes; timing facts."""
    connections.close_all()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    # Each worker a run of consecutive days of every organization (the first half of
    # each, the second half...): a viewer roll-up's local day straddles two UTC days, and
    # two workers counting neighbouring days would wait for each other, while runs of
    # whole organizations would leave one worker with the largest.
    by_org: dict[int, list] = {}
    for org_id, day in org_days:
        by_org.setdefault(org_id, []).append((org_id, day))
    runs: list[list] = [[] for _ in range(workers)]
    for days in by_org.values():
        size = -(-len(days) // workers)
        for i in range(workers):
            runs[i] += days[i * size : (i + 1) * size]
    procs = [
        ctx.Process(target=_count_worker, args=(i, run, queue)) for i, run in enumerate(runs) if run
    ]
    started = time.monotonic()
    done, last = 0, 0.0

    def on_day(k, _ins):
        nonlocal done, last
        done += k
        now = time.monotonic()
        if now - last >= 10 or done == len(org_days):
            last = now
            eta = (len(org_days) - done) * (now - started) / done
            log(f"  counted {done}/{len(org_days)} organization-days  eta {eta:,.0f} s")

    _run(procs, queue, on_day, "counting the roll-ups")
    return {"days": len(org_days), "seconds": round(time.monotonic() - started, 1)}


def _run(procs, queue, on_item, what: str) -> None:
    """Start the worker processes and hand each ("chunk" | "day", wid, k, inserted, _)
    message to on_item(k, inserted) until every worker said "done" or "error"; raise
    with the workers' tracebacks if any failed."""
    for p in procs:
        p.start()
    running, errors = len(procs), []
    while running:
        kind, _wid, k, ins, extra = queue.get()
        if kind == "done":
            running -= 1
        elif kind == "error":
            errors.append(extra)
            running -= 1
        else:
            on_item(k, ins)
    for p in procs:
        p.join()
    if errors or any(p.exitcode for p in procs):
        raise RuntimeError(f"{what} failed:\n" + "\n".join(map(str, errors)))
