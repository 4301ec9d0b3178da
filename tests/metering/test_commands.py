"""Management commands: seed_demo, check_aggregates, import_events."""

import csv
import json
from io import StringIO

import pytest
from django.contrib.auth import authenticate
from django.core.management import CommandError, call_command
from django.db.models import F, Sum

from accounts.models import Organization, User
from metering.demo import DEMO_LOGINS
from metering.models import LatencyHistogramHourly, OrgUsage15m, ScopeUsage15m, UsageEvent
from tests.factories import event_payload, ingest


def run(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def check_aggregates(*args) -> tuple[int, str]:
    """(exit status, output) of manage.py check_aggregates."""
    out = StringIO()
    try:
        call_command("check_aggregates", *args, stdout=out)
    except SystemExit as exit_:
        return exit_.code, out.getvalue()
    return 0, out.getvalue()


# ---------------------------------------------------------------------------------------
# seed_demo and check_aggregates


@pytest.fixture
def demo(db):
    """seed_demo's output, after seeding 3,000 events over 3 days."""
    out, _ = run("seed_demo", "--events", "3000", "--days", "3", "--seed", "7")
    return out


def test_seed_demo_creates_the_demo_installation(demo, subtests):
    with subtests.test("organizations, people, tokens"):
        assert {"acme", "globex"} <= set(Organization.objects.values_list("slug", flat=True))
        assert Organization.objects.count() >= 3
        assert UsageEvent.objects.count() == 3000
        assert User.objects.count() >= 150
        acme = Organization.objects.get(slug="acme")
        assert acme.teams.count() >= 3 and acme.projects.count() >= 3
        assert acme.api_tokens.exclude(owner=None).exists()
        assert acme.api_tokens.exclude(service_account="").exists()

    with subtests.test("progress, rate and logins are printed"):
        assert "events/s" in demo
        for email in DEMO_LOGINS:
            assert email in demo

    with subtests.test("every demo login works with password demo"):
        for email in DEMO_LOGINS:
            assert authenticate(username=email, password="demo") is not None, email
        assert User.objects.get(email="admin@demo.test").is_platform_admin

    with subtests.test("the data looks like real usage"):
        events = UsageEvent.objects.all()
        failures = events.filter(status_code__gte=400).count() / events.count()
        assert {"chat", "embedding", "rerank"} <= set(events.values_list("operation", flat=True))
        assert 0.005 < failures < 0.08
        assert events.exclude(session_id="").exists()
        assert events.exclude(assistant="").exists()
        assert events.exclude(workflow="").exists()
        assert {"web", "ide", "cli", "agent"} <= set(events.values_list("client", flat=True))
        assert events.filter(cost_source="unpriced").exists()


def test_seed_demo_refuses_to_run_twice_unless_reset(db):
    run("seed_demo", "--events", "300", "--days", "1")

    with pytest.raises(CommandError, match="--reset"):
        run("seed_demo", "--events", "10", "--days", "1")

    run("seed_demo", "--events", "200", "--days", "1", "--reset")
    assert UsageEvent.objects.count() == 200
    assert Organization.objects.filter(slug="acme").count() == 1


def test_check_aggregates_passes_after_seed_demo_and_names_a_corrupted_row(demo):
    status, out = check_aggregates()
    assert status == 0
    assert "no mismatch" in out

    row = OrgUsage15m.objects.order_by("bucket", "model").first()
    OrgUsage15m.objects.filter(
        organization_id=row.organization_id,
        bucket=row.bucket,
        model=row.model,
        operation=row.operation,
        status_code=row.status_code,
    ).update(input_tokens=F("input_tokens") + 1)

    status, out = check_aggregates()

    assert status == 1
    slug = Organization.objects.get(id=row.organization_id).slug
    [line] = [line for line in out.splitlines() if "org roll-up" in line]
    assert line.startswith(f"{slug}: org roll-up")
    assert str(row.bucket) in line and repr(row.model) in line
    assert "1 mismatches." in out


@pytest.mark.parametrize(
    "corrupt",
    ["delete scope row", "add stray org row", "histogram count"],
)
def test_check_aggregates_finds_every_kind_of_drift(personas, corrupt):
    ingest(personas.org, [event_payload() for _ in range(20)], token=personas.service_token)
    assert check_aggregates()[0] == 0
    if corrupt == "delete scope row":
        ScopeUsage15m.objects.filter(pk=ScopeUsage15m.objects.first().pk).delete()
    elif corrupt == "add stray org row":
        bucket = OrgUsage15m.objects.order_by("bucket").first().bucket - 3 * 86400
        OrgUsage15m.objects.create(
            organization=personas.org,
            bucket=bucket,
            model="ghost",
            operation="chat",
            status_code=200,
            requests=1,
        )
    else:
        LatencyHistogramHourly.objects.update(count=F("count") + 1)

    status, out = check_aggregates("--org", "alpha")

    assert status == 1
    assert "mismatches" in out


def test_check_aggregates_refuses_an_unknown_organization(db):
    with pytest.raises(CommandError, match="No organization"):
        call_command("check_aggregates", "--org", "nope", stdout=StringIO())


# ---------------------------------------------------------------------------------------
# import_events


def _jsonl(path, lines) -> None:
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines))


def test_import_events_from_jsonl_reports_each_outcome(personas, tmp_path):
    path = tmp_path / "usage.jsonl"
    good = [
        event_payload(request_id=f"j{i}", model="gpt-4o", input_tokens=100, output_tokens=10)
        for i in range(5)
    ]
    _jsonl(
        path,
        [
            *good,
            good[0],  # a duplicate
            {"request_id": "bad", "timestamp": "2026-01-01T00:00:00Z"},  # no model
            "{not json",
            "",
            event_payload(request_id="j-team", team="platform", user="member@example.test"),
        ],
    )

    out, err = run("import_events", str(path), "--org", "alpha")

    assert "9 lines: 6 accepted, 1 duplicates, 2 rejected." in out
    assert "line 7" in err and "model" in err
    assert "line 8" in err and "not JSON" in err
    assert UsageEvent.objects.filter(organization=personas.org).count() == 6
    event = UsageEvent.objects.get(request_id="j-team")
    assert (event.team, event.user, event.api_token) == (
        personas.platform_team,
        personas.member,
        None,
    )
    assert UsageEvent.objects.get(request_id="j0").cost_nanos == 100 * 2500 + 10 * 10000


def test_import_events_twice_is_a_no_op(personas, tmp_path):
    path = tmp_path / "usage.jsonl"
    _jsonl(path, [event_payload() for _ in range(30)])
    run("import_events", str(path), "--org", "alpha")
    before = OrgUsage15m.objects.aggregate(n=Sum("requests"), c=Sum("cost_nanos"))

    out, _ = run("import_events", str(path), "--org", "alpha")

    assert "30 lines: 0 accepted, 30 duplicates, 0 rejected." in out
    assert OrgUsage15m.objects.aggregate(n=Sum("requests"), c=Sum("cost_nanos")) == before


def test_import_events_from_csv_reports_each_outcome(personas, tmp_path):
    path = tmp_path / "usage.csv"
    fields = [
        "request_id",
        "timestamp",
        "model",
        "input_tokens",
        "cached_input_tokens",
        "output_tokens",
        "latency_ms",
        "status_code",
        "cost_usd",
        "team",
        "metadata",
    ]
    rows = [
        ["c1", "2026-05-01T10:00:00Z", "gpt-4o", "1000", "200", "50", "812.5", "200", "", "", ""],
        [
            *("c2", "2026-05-01T10:01:00+02:00", "homegrown", "5", "", "1", "", "500"),
            *("0.000000123", "research", '{"k": "v"}'),
        ],
        ["c1", "2026-05-01T10:00:00Z", "gpt-4o", "1", "", "", "", "", "", "", ""],
        ["c3", "2026-05-01T10:02:00Z", "gpt-4o", "ten", "", "", "", "", "", "", ""],
        ["c4", "2026-05-01T10:03:00Z", "gpt-4o", "1", "", "", "", "", "", "secret-team", ""],
    ]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        writer.writerows(rows)

    out, err = run("import_events", str(path), "--org", "alpha")

    assert "5 lines: 2 accepted, 1 duplicates, 2 rejected." in out
    assert "line 5" in err and "input_tokens" in err  # "ten" (header is line 1)
    assert "line 6" in err and "secret-team" in err
    c1 = UsageEvent.objects.get(request_id="c1")
    assert (c1.input_tokens, c1.cached_input_tokens, c1.latency_ms) == (1000, 200, 812)
    assert c1.cost_nanos == 2_750_000
    c2 = UsageEvent.objects.get(request_id="c2")
    assert (c2.cost_nanos, c2.status_code, c2.team) == (123, 500, personas.research_team)
    assert c2.metadata == {"k": "v"}


def test_import_events_routes_lines_by_their_organization_field(personas, tmp_path):
    path = tmp_path / "two-orgs.jsonl"
    _jsonl(
        path,
        [
            event_payload(request_id="x", organization="alpha"),
            event_payload(request_id="x", organization="beta"),
            event_payload(request_id="y", organization="nowhere"),
        ],
    )

    out, err = run("import_events", str(path))

    assert "3 lines: 2 accepted, 0 duplicates, 1 rejected." in out
    assert "No organization" in err
    assert set(UsageEvent.objects.values_list("organization__slug", flat=True)) == {
        "alpha",
        "beta",
    }


def test_import_events_refuses_a_missing_file_or_organization(personas, tmp_path):
    with pytest.raises(CommandError, match="No such file"):
        run("import_events", str(tmp_path / "missing.jsonl"), "--org", "alpha")
    path = tmp_path / "x.jsonl"
    _jsonl(path, [event_payload()])
    with pytest.raises(CommandError, match="No organization"):
        run("import_events", str(path), "--org", "nope")


def test_the_people_and_label_migration_fills_them_from_stored_events(demo):
    """An installation upgraded with events already stored gets the people and label
    roll-ups from those events (the migration's SQL), exactly as ingestion would have
    written them."""
    import importlib
    from types import SimpleNamespace

    from django.apps import apps
    from django.db import connection

    from metering.models import OrgLabelDaily, OrgLabelHourly, OrgPeopleDaily, OrgPeopleHourly

    migration = importlib.import_module("metering.migrations.0020_people_and_label_rollups")
    tables = (OrgPeopleHourly, OrgPeopleDaily, OrgLabelHourly, OrgLabelDaily)
    written = {m: sorted(m.objects.values_list("pk", "requests")) for m in tables}
    assert all(written.values())
    failed = OrgPeopleHourly.objects.values_list("failed_requests", flat=True)
    assert any(failed)
    assert len({pk[3] for pk, _ in written[OrgLabelDaily]}) > 1  # several workflows
    for model in tables:
        model.objects.all().delete()

    # The backfill uses only the editor's connection (SQLite opens no editor in a test).
    migration.backfill(apps, SimpleNamespace(connection=connection))

    assert {m: sorted(m.objects.values_list("pk", "requests")) for m in tables} == written
    status, out = check_aggregates()
    assert status == 0 and "no mismatch" in out


def test_the_model_histogram_migration_fills_it_from_stored_events(demo):
    import importlib
    from types import SimpleNamespace

    from django.apps import apps
    from django.db import connection

    from metering.models import LatencyHistogramModelDaily

    migration = importlib.import_module("metering.migrations.0009_latency_hist_model_daily")
    written = sorted(LatencyHistogramModelDaily.objects.values_list("pk", "count"))
    assert len({pk[3] for pk, _ in written}) > 1  # several models
    LatencyHistogramModelDaily.objects.all().delete()

    migration.backfill(apps, SimpleNamespace(connection=connection))

    assert sorted(LatencyHistogramModelDaily.objects.values_list("pk", "count")) == written


def test_the_scope_key_migration_fills_it_from_stored_events(demo):
    import importlib
    from types import SimpleNamespace

    from django.apps import apps
    from django.db import connection

    from metering.models import ScopeKeyDaily

    migration = importlib.import_module("metering.migrations.0010_scope_key_daily")
    written = sorted(ScopeKeyDaily.objects.values_list("pk", "requests"))
    assert len(written) > 1
    ScopeKeyDaily.objects.all().delete()

    migration.backfill(apps, SimpleNamespace(connection=connection))

    assert sorted(ScopeKeyDaily.objects.values_list("pk", "requests")) == written


def test_the_part_histogram_migration_fills_it_from_stored_events(demo):
    import importlib
    from types import SimpleNamespace

    from django.apps import apps
    from django.db import connection

    from metering.models import LatencyHistogramPartDaily

    migration = importlib.import_module("metering.migrations.0011_latency_hist_part_daily")
    written = sorted(LatencyHistogramPartDaily.objects.values_list("pk", "count"))
    assert {pk[1] for pk, _ in written} == {"team", "project", "user", "token"}
    LatencyHistogramPartDaily.objects.all().delete()

    migration.backfill(apps, SimpleNamespace(connection=connection))

    assert sorted(LatencyHistogramPartDaily.objects.values_list("pk", "count")) == written
    status, out = check_aggregates()
    assert status == 0 and "no mismatch" in out


def test_rebuild_aggregates_repairs_drift_and_forgets_removed_events(personas):
    from metering.models import BudgetSpend15m

    ingest(personas.org, [event_payload() for _ in range(30)], token=personas.service_token)
    totals_before = sum(OrgUsage15m.objects.values_list("requests", flat=True))
    spend_before = sorted(BudgetSpend15m.objects.values_list("pk", "cost_nanos"))
    OrgUsage15m.objects.update(requests=F("requests") + 5)  # drift
    assert check_aggregates()[0] == 1

    run("rebuild_aggregates", "--org", "alpha")

    assert check_aggregates()[0] == 0
    assert sum(OrgUsage15m.objects.values_list("requests", flat=True)) == totals_before
    assert sorted(BudgetSpend15m.objects.values_list("pk", "cost_nanos")) == spend_before
    UsageEvent.objects.filter(pk__in=UsageEvent.objects.values("pk")[:10]).delete()

    run("rebuild_aggregates", "--org", "alpha", "--since-days", "2")

    assert check_aggregates()[0] == 0
    assert sum(OrgUsage15m.objects.values_list("requests", flat=True)) == totals_before - 10
    assert sum(
        BudgetSpend15m.objects.filter(subject="org").values_list("cost_nanos", flat=True)
    ) == sum(
        UsageEvent.objects.filter(organization=personas.org).values_list("cost_nanos", flat=True)
    )


def test_the_scope_actor_migration_fills_it_from_stored_events(demo):
    import importlib
    from types import SimpleNamespace

    from django.apps import apps
    from django.db import connection

    from metering.aggregates import ACTOR_MEASURES
    from metering.models import ScopeActorDaily

    migration = importlib.import_module("metering.migrations.0016_scope_actor_daily")
    written = sorted(ScopeActorDaily.objects.values_list("pk", *ACTOR_MEASURES))
    assert len(written) > 1
    assert len({row[0][7] for row in written}) > 1  # more than one assistant label
    assert any(row[-1] for row in written)  # some failed requests
    ScopeActorDaily.objects.all().delete()

    migration.backfill(apps, SimpleNamespace(connection=connection))

    assert sorted(ScopeActorDaily.objects.values_list("pk", *ACTOR_MEASURES)) == written


def test_viewer_roll_ups_are_checked_named_when_wrong_and_rebuilt(demo):
    from metering.models import ViewerHistogramDaily, ViewerLink, ViewerUsageDaily
    from metering.viewers import build_organization, current_links

    for org_id in Organization.objects.values_list("id", flat=True):
        build_organization(org_id)
    assert ViewerUsageDaily.objects.exists() and ViewerHistogramDaily.objects.exists()
    assert check_aggregates()[0] == 0

    acme = Organization.objects.get(slug="acme")
    row = ViewerUsageDaily.objects.filter(organization=acme).order_by("bucket", "model").first()
    ViewerUsageDaily.objects.filter(pk=row.pk).update(requests=F("requests") + 3)
    status, out = check_aggregates("--org", "acme")
    assert status == 1
    assert any(
        "viewer usage daily" in line and str(row.bucket) in line for line in out.splitlines()
    )

    # A token given to someone else: that viewer's links are recounted too.
    token = acme.api_tokens.exclude(owner=None).order_by("id").first()
    token.owner = User.objects.get(email="member@demo.test")
    token.save()
    out, _ = run("rebuild_aggregates", "--org", "acme")

    assert "viewer(s) recounted" in out
    assert check_aggregates()[0] == 0
    stored = set(
        ViewerLink.objects.filter(organization=acme).values_list("kind", "part_id", "viewer_id")
    )
    assert stored == current_links(acme.id)
