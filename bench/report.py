"""Markdown + JSON report of a bench run, with each target marked met or missed."""

import json
import time
from pathlib import Path

WIDGET_P95 = 150.0
ORG_WIDE_P95 = 50.0
SPEEDUP = 20.0
LOG_P95 = 100.0
API_P95 = 150.0
BUDGET_P95 = 5.0
INGEST_SHARE = 0.5
EXPORT_RSS_MB = 150.0
ORG_WIDE_RANGES = {"1h", "24h", "7d", "30d"}


def _ok(flag: bool | None) -> str:
    return "–" if flag is None else ("met" if flag else "**missed**")


def evaluate(report: dict) -> list[tuple[str, str, str]]:
    """[(target, measured, met?)]"""
    out = []
    dash = [r for r in report.get("dashboard", []) if r["widget"] != "page"]
    if dash:
        worst = max(dash, key=lambda r: r["p95_ms"])
        over = [r for r in dash if r["p95_ms"] > WIDGET_P95]
        out.append(
            (
                f"every widget p95 <= {WIDGET_P95:.0f} ms (all personas, ranges, filter)",
                f"worst {worst['p95_ms']:.0f} ms ({worst['persona']}, {worst['widget']}, "
                f"{worst['range']} {worst['filter']}); {len(over)}/{len(dash)} over",
                _ok(not over),
            )
        )
        org = [
            r
            for r in dash
            if r["persona"] == "org admin" and not r["filter"] and r["range"] in ORG_WIDE_RANGES
        ]
        if org:
            worst = max(org, key=lambda r: r["p95_ms"])
            over = [r for r in org if r["p95_ms"] > ORG_WIDE_P95]
            out.append(
                (
                    f"org-wide widgets up to 30 d p95 <= {ORG_WIDE_P95:.0f} ms",
                    f"worst {worst['p95_ms']:.0f} ms ({worst['widget']}, {worst['range']}); "
                    f"{len(over)}/{len(org)} over",
                    _ok(not over),
                )
            )
    speedups = speedup_rows(report)
    if speedups:
        low = min(speedups, key=lambda r: r["speedup"])
        under = [r for r in speedups if r["speedup"] < SPEEDUP]
        out.append(
            (
                f">= {SPEEDUP:.0f}x faster than raw aggregation (30 d, 90 d)",
                f"lowest {low['speedup']:.1f}x ({low['persona']}, {low['widget']}, {low['range']}); "
                f"{len(under)}/{len(speedups)} under",
                _ok(not under),
            )
        )
    log = report.get("events_log", [])
    if log:
        worst = max(log, key=lambda r: r["p95_ms"])
        out.append(
            (
                f"events log p95 <= {LOG_P95:.0f} ms (page 1/400, by cost, amount filter)",
                f"worst {worst['p95_ms']:.0f} ms ({worst['persona']}, {worst['case']})",
                _ok(worst["p95_ms"] <= LOG_P95),
            )
        )
    for row in report.get("apis", []):
        limit = BUDGET_P95 if row["api"].startswith("budget") else API_P95
        out.append(
            (
                f"{row['api']} p95 <= {limit:g} ms",
                f"{row['p95_ms']:.1f} ms",
                _ok(row["p95_ms"] <= limit),
            )
        )
    ingest = report.get("ingest", [])
    db = report.get("db_upsert")
    if ingest and db:
        four = next((r for r in ingest if r["clients"] == 4 and r["events"] == "new"), None)
        if four:
            share = four["events_per_s"] / db["new_events_per_s"]
            out.append(
                (
                    f"HTTP ingest, 4 clients >= {INGEST_SHARE:.0%} of the DB's own upsert rate",
                    f"{four['events_per_s']:,} vs {db['new_events_per_s']:,} events/s = {share:.0%}",
                    _ok(share >= INGEST_SHARE),
                )
            )
        for clients in (1, 4):
            new = next(
                (r for r in ingest if r["clients"] == clients and r["events"] == "new"), None
            )
            dup = next(
                (r for r in ingest if r["clients"] == clients and r["events"] == "duplicate"), None
            )
            if new and dup:
                out.append(
                    (
                        f"duplicates no slower than new events ({clients} client{'s' * (clients > 1)})",
                        f"{dup['events_per_s']:,} vs {new['events_per_s']:,} events/s",
                        _ok(dup["events_per_s"] >= new["events_per_s"] * 0.95),
                    )
                )
    export = report.get("export")
    if export:
        out.append(
            (
                f"CSV export of 1 M events peak RSS <= {EXPORT_RSS_MB:.0f} MB",
                f"{export['peak_rss_mb']:.0f} MB, {export['rows']:,} rows in {export['seconds']} s",
                _ok(export["peak_rss_mb"] <= EXPORT_RSS_MB),
            )
        )
    return out


def speedup_rows(report: dict) -> list[dict]:
    naive = {(r["persona"], r["range"], r["widget"]): r for r in report.get("naive", [])}
    out = []
    for r in report.get("dashboard", []):
        key = (r["persona"], r["range"], r["widget"])
        if r["filter"] or key not in naive:
            continue
        out.append(
            {
                "persona": r["persona"],
                "range": r["range"],
                "widget": r["widget"],
                "p50_ms": r["p50_ms"],
                "naive_p50_ms": naive[key]["p50_ms"],
                "speedup": naive[key]["p50_ms"] / max(r["p50_ms"], 0.01),
            }
        )
    return out


def markdown(report: dict) -> str:
    lines = [
        f"# Benchmark: {report.get('rows_in_db', report['events']):,} events over "
        f"{report.get('days_spanned', report['days'])} days",
        "",
        f"Run {report['started']}, database {report['database']}."
        + (
            " PostgreSQL settings: "
            + ", ".join(f"{k} {v}" for k, v in report["server_settings"].items())
            + "."
            if report.get("server_settings")
            else ""
        ),
        "",
    ]
    speed = report.get("machine_speed", {})
    if speed.get("start") and speed.get("end"):
        start, end = speed["start"], speed["end"]
        lines += [
            "Machine speed (`measure.machine_speed`; compare runs only at like speeds): "
            f"`sum(range(10**6))` {start['python_loop_ms']} ms at the start, "
            f"{end['python_loop_ms']} ms at the end; `SELECT 1` round trip "
            f"{start['select_1_ms']} ms / {end['select_1_ms']} ms.",
            "",
        ]
    if "load" in report:
        load = report["load"]
        lines += [
            f"Bulk load: {load['events']:,} events in {load['seconds']} s "
            f"({load['events_per_s']:,} events/s, {load['workers']} workers, "
            f"{load['chunk']:,} rows per transaction) with the events' secondary indexes "
            f"dropped, events only; CLUSTER {report.get('cluster_seconds', '?')} s; "
            f"{report.get('count', {}).get('days', '?')} organization-days counted into the "
            f"roll-ups {report.get('count', {}).get('seconds', '?')} s; the secondary indexes "
            f"built {report.get('index_build_seconds', '?')} s; VACUUM ANALYZE "
            f"{report.get('vacuum_analyze_seconds', '?')} s.",
            "",
        ]
    elif "vacuum_analyze_seconds" in report:
        lines += [
            "The database as an earlier run loaded it (--skip-load), after VACUUM ANALYZE "
            f"{report['vacuum_analyze_seconds']} s.",
            "",
        ]
    if "exactness" in report:
        ex = report["exactness"]
        lines += [
            f"Roll-ups checked against the raw events (`reconcile_day`) for {ex['days']} "
            f"organization-days (each organization's first, middle and last): "
            f"{ex['problems']} mismatches.",
            "",
        ]
    if report.get("tables"):
        lines += ["| table | rows | size MB |", "|---|---:|---:|"]
        for name, t in report["tables"].items():
            lines.append(f"| {name} | {t['rows']:,} | {t['mb']:,} |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in evaluate(report)]
    lines.append("")
    dash = report.get("dashboard", [])
    if dash:
        naive = {(r["persona"], r["range"], r["widget"]): r for r in report.get("naive", [])}
        lines += [
            "## Dashboard (ms, p50 / p95 of each request through Django's test client)",
            "",
            "Naive = the same numbers by plain aggregation over raw events (p50), with "
            f"PostgreSQL's {report.get('naive_parallel_workers', 'default')} parallel "
            "workers per query (the application's sessions use none).",
            "",
        ]
        widgets = list(dict.fromkeys(r["widget"] for r in dash))
        lines.append("| persona | range | filter | " + " | ".join(widgets) + " |")
        lines.append("|---|---|---|" + "---:|" * len(widgets))
        groups = list(dict.fromkeys((r["persona"], r["range"], r["filter"]) for r in dash))
        for persona, period, flt in groups:
            cells = []
            for w in widgets:
                r = next(
                    (
                        x
                        for x in dash
                        if (x["persona"], x["range"], x["filter"], x["widget"])
                        == (persona, period, flt, w)
                    ),
                    None,
                )
                cells.append(f"{r['p50_ms']:.0f} / {r['p95_ms']:.0f}" if r else "")
            lines.append(f"| {persona} | {period} | {flt} | " + " | ".join(cells) + " |")
            if not flt and any((persona, period, w) in naive for w in widgets):
                cells = []
                for w in widgets:
                    n = naive.get((persona, period, w))
                    r = next(
                        (
                            x
                            for x in dash
                            if (x["persona"], x["range"], x["filter"], x["widget"])
                            == (persona, period, "", w)
                        ),
                        None,
                    )
                    cells.append(
                        f"{n['p50_ms']:.0f} ({n['p50_ms'] / max(r['p50_ms'], 0.01):.0f}x)"
                        if n and r
                        else ""
                    )
                lines.append(
                    f"| {persona} | {period} | naive (speed-up) | " + " | ".join(cells) + " |"
                )
        lines.append("")
    if report.get("events_log"):
        lines += ["## Events log (ms)", "", "| persona | case | p50 | p95 |", "|---|---|---:|---:|"]
        for r in report["events_log"]:
            lines.append(
                f"| {r['persona']} | {r['case']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |"
            )
        lines.append("")
    if report.get("apis"):
        lines += ["## APIs (ms)", "", "| API | n | p50 | p95 |", "|---|---:|---:|---:|"]
        for r in report["apis"]:
            lines.append(f"| {r['api']} | {r['n']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} |")
        lines.append("")
    if report.get("ingest"):
        lines += [
            f"## Ingestion over HTTP (gunicorn, {report.get('gunicorn_workers', '?')} workers, "
            f"{report.get('ingest_batches', '?')} batches of 500 per row)",
            "",
            f"Roll-ups: {report.get('ingest_rollups', 'counted in the ingest transaction')}; "
            '"folded after" is how long after the last answer no event was pending any more.',
            "",
            "| clients | events | events/s | p50 batch ms | p95 batch ms | folded after s |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for r in report["ingest"]:
            lag = r.get("fold_lag_s")
            lines.append(
                f"| {r['clients']} | {r['events']} | {r['events_per_s']:,} | "
                f"{r['p50_batch_ms']} | {r['p95_batch_ms']} | {'' if lag is None else lag} |"
            )
        db = report.get("db_upsert")
        if db:
            lines += [
                "",
                "The database's own `INSERT ... ON CONFLICT DO NOTHING RETURNING` (500 rows "
                "per transaction, same table; the ratio above uses the fastest): "
                f"psycopg executemany {db.get('executemany_new_events_per_s', '?'):,} new / "
                f"{db.get('executemany_duplicate_events_per_s', '?'):,} duplicate events/s; "
                f"one statement unnesting column arrays {db.get('unnest_new_events_per_s', '?'):,}"
                f" new / {db.get('unnest_duplicate_events_per_s', '?'):,} duplicate events/s; "
                "the same from 4 connections at once "
                f"{db.get('unnest_4_connections_new_events_per_s', '?'):,} new events/s. "
                f"gunicorn workers: {report.get('gunicorn_workers', '?')}.",
            ]
        lines.append("")
    if report.get("export"):
        e = report["export"]
        lines += [
            "## CSV export",
            "",
            f"{e['rows']:,} rows ({e['bytes'] / 2**20:,.0f} MB) in {e['seconds']} s; "
            f"peak RSS {e['peak_rss_mb']} MB ({e['note']}).",
            "",
        ]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    if report.get("errors"):
        lines += ["", f"## Errors ({len(report['errors'])})", ""]
        lines += [f"- {str(e)[:500]}" for e in report["errors"][:50]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = folder / f"bench-{report.get('rows_in_db', report['events'])}-{stamp}"
    report["targets"] = [
        {"target": a, "measured": b, "result": c.strip("*")} for a, b, c in evaluate(report)
    ]
    report["speedups"] = speedup_rows(report)
    text = markdown(report)
    md, js = base.with_suffix(".md"), base.with_suffix(".json")
    md.write_text(text)
    js.write_text(json.dumps(report, indent=2, default=str))
    print(text)
    return md, js
