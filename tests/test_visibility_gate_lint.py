"""The visibility gate, enforced mechanically (STYLE section 2).

Usage data (raw events and roll-ups) may be read only where the gate's predicate is
applied: the gate itself, the query engine (every raw read goes through `_event_filters`,
every wide roll-up read through `rollup_scope_q`; the org-wide tables only when the scope
covers the whole organization), and system jobs that never answer a person (ingestion
bookkeeping, reconciliation, budget spend). A new page or export must go through these,
not around them.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USAGE_READ = re.compile(
    r"\b(UsageEvent|Scope(?:Usage|Key|Actor)\w+|Org(?:Usage|People|Label)\w+|LatencyHistogram\w+"
    r"|Viewer(?:Usage|Actor|Histogram)\w+)\.objects\b"
)
ALLOWED = {
    "analytics/visibility.py": "the gate",
    "analytics/queries.py": "the query engine; checked line by line below",
    "metering/aggregates.py": "reconciliation (check_aggregates)",
    "metering/budgets.py": "budget spend rebuild, a system job",
    "metering/pools.py": "pool counters at ingest",
    "metering/viewers.py": "viewer roll-up builds and reconciliation, system jobs",
}


def _sources():
    for app in ("accounts", "analytics", "metering", "usage_dashboard"):
        for path in (ROOT / app).rglob("*.py"):
            if "migrations" not in path.parts:
                yield path.relative_to(ROOT).as_posix(), path.read_text()


def test_usage_tables_are_read_only_behind_the_gate():
    offenders = {
        name: USAGE_READ.findall(text)
        for name, text in _sources()
        if USAGE_READ.search(text) and name not in ALLOWED
    }
    assert offenders == {}, "read usage through analytics.visibility / analytics.queries"


def test_query_engine_applies_the_scope_to_every_raw_and_wide_read():
    text = (ROOT / "analytics/queries.py").read_text()
    for line in text.splitlines():
        if "UsageEvent.objects" in line:
            assert "_event_filters(" in line, line
        if re.search(r"(Scope(?:Usage|Actor)\w*|wide_model)\.objects", line):
            assert "rollup_scope_q(" in line, line
