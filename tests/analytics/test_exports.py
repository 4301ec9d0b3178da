"""CSV exports of the events log: the viewer's scope with the log's filters, exactly the
rows the log counts, units in the header, formulas neutralised, and large exports as a
background task with progress and a download link."""

import csv
import io
import re
from zoneinfo import ZoneInfo

import pytest
from django.http import StreamingHttpResponse

from analytics import eventlog
from analytics.filters import resolve_period
from tests.analytics.events_world import build_world, expected_ids
from tests.factories import event_payload, ingest

PERSONAS = ["platform_admin", "org_admin", "team_lead", "project_admin", "member", "outsider"]


@pytest.fixture
def world(personas):
    return build_world(personas)


@pytest.fixture
def exports_dir(settings, tmp_path):
    settings.EXPORTS_DIR = tmp_path / "exports"
    return settings.EXPORTS_DIR


def _csv(response) -> list[dict]:
    assert isinstance(response, StreamingHttpResponse)
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


def _log_count(client, params) -> int:
    count = client.get("/events/", params, HTTP_HX_REQUEST="true").context["count"]
    assert count.exact
    return count.value


@pytest.mark.parametrize("persona", PERSONAS)
def test_export_has_exactly_the_viewers_events_in_log_order(client, world, persona):
    client.force_login(world.personas.users[persona])

    response = client.get("/events/export.csv")
    rows = _csv(response)

    assert response["Content-Disposition"].startswith('attachment; filename="events-')
    expected = {e.id: e.request_id for e in world.visible_to(persona)}
    assert [r["request_id"] for r in rows] == [
        expected[pk] for pk in expected_ids(world, persona, {})
    ]
    assert len(rows) == _log_count(client, {})


@pytest.mark.parametrize(
    "params",
    [
        {"resource": "storage"},
        {"pool": "hybrid", "sort": "cost", "dir": "asc"},
        {"io": "output", "amount_min": "50", "amount_max": "400"},
        {"status": "failed", "model": "gpt-4o-mini"},
        {"request_id": "alpha-02"},
        {"session": "s-1", "sort": "user"},
    ],
)
def test_export_applies_the_logs_filters_and_has_the_rows_it_counts(client, world, params):
    client.force_login(world.personas.org_admin)

    rows = _csv(client.get("/events/export.csv", params))

    ids = expected_ids(world, "org_admin", params)
    assert len(rows) == _log_count(client, params) == len(ids)
    by_id = {e.id: e.request_id for e in world.events()}
    assert [r["request_id"] for r in rows] == [by_id[pk] for pk in ids]


def test_an_invalid_filter_exports_nothing(client, world):
    client.force_login(world.personas.member)

    rows = _csv(client.get("/events/export.csv", {"team": world.personas.secret_team.id}))

    assert rows == []


def test_header_names_the_units_and_values_are_exact(client, personas):
    p = personas
    ingest(
        p.org,
        [
            event_payload(
                request_id="exact-1",
                cost_usd="0.000000123",
                latency_ms=321,
                timestamp="2020-01-01T00:00:00Z",
            )
        ],
        token=p.service_token,
        now=None,
    )
    client.force_login(p.org_admin)

    response = client.get(
        "/events/export.csv", {"period": "custom", "start": "2019-12-31", "end": "2020-01-02"}
    )
    rows = _csv(response)

    header = list(rows[0].keys())
    assert header[0] == "timestamp (UTC, RFC 3339)"
    assert "cost_usd" in header and "latency_ms" in header
    assert any(h.startswith("quantity (bytes") for h in header)
    assert rows[0]["timestamp (UTC, RFC 3339)"] == "2020-01-01T00:00:00Z"
    assert rows[0]["cost_usd"] == "0.000000123"
    assert rows[0]["latency_ms"] == "321"
    assert rows[0]["organization"] == "alpha"


MALICIOUS = {
    "endpoint": '=HYPERLINK("http://evil.test","click")',
    "session_id": "+cmd|' /C calc'!A0",
    "end_user": "-2+3",
    "assistant": "@SUM(A1:A9)",
    "workflow": "\t=1+1",
    "client": "\r=1+1",
}


def test_malicious_labels_come_out_neutralised(client, personas):
    p = personas
    ingest(
        p.org,
        [event_payload(request_id="=evil()", model="-1+1", **MALICIOUS)],
        token=p.service_token,
    )
    client.force_login(p.org_admin)

    raw = b"".join(client.get("/events/export.csv").streaming_content).decode()
    row = next(csv.DictReader(io.StringIO(raw)))

    for field, value in MALICIOUS.items():
        assert row[field] == "'" + value, field
    assert row["request_id"] == "'=evil()"
    assert row["model"] == "'-1+1"
    # Numbers stay numbers.
    assert row["input_tokens"] == "1000"
    assert not re.search(r'(^|,)"?[=+@]', raw.split("\n", 1)[1])


# ---------------------------------------------------------------------------------------
# Large exports: a background task, progress, a download link


@pytest.fixture
def low_threshold(settings, exports_dir):
    settings.EXPORT_ASYNC_THRESHOLD = 10
    return exports_dir


def test_large_export_runs_in_the_background_and_downloads_the_same_rows(
    client, world, low_threshold, django_capture_on_commit_callbacks, settings
):
    client.force_login(world.personas.org_admin)
    params = {"sort": "cost", "dir": "desc", "resource": "tokens"}
    settings.EXPORT_ASYNC_THRESHOLD = 10**6
    streamed = _csv(client.get("/events/export.csv", params))
    settings.EXPORT_ASYNC_THRESHOLD = 10

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = client.get("/events/export.csv", params)
    assert response.status_code == 302
    assert len(callbacks) == 1
    status_url = response["Location"]
    assert re.fullmatch(r"/events/exports/[0-9a-f-]{36}/", status_url)

    for _ in range(20):  # poll as the page does (the task ran eagerly here)
        progress = client.get(status_url, HTTP_HX_REQUEST="true")
        if progress.context["finished"]:
            break
    html = progress.content.decode()
    assert progress.context["job"]["state"] == "done"
    assert 'hx-trigger="every 1s"' not in html
    download_url = progress.context["download_url"]
    assert download_url in html

    download = client.get(download_url)
    assert download.status_code == 200
    text = b"".join(download.streaming_content).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows == streamed
    assert len(rows) == _log_count(client, params) > 10
    assert progress.context["job"]["total"] == len(rows)
    assert list(low_threshold.glob("*.csv"))


def test_progress_polls_every_second_until_done(client, world, low_threshold):
    client.force_login(world.personas.org_admin)
    # Enqueued but not yet run (no on_commit callbacks executed): queued.
    response = client.get("/events/export.csv")
    status_url = response["Location"]

    page = client.get(status_url)
    part = client.get(status_url, HTTP_HX_REQUEST="true").content.decode()

    assert page.context["job"]["state"] == "queued"
    assert 'hx-trigger="every 1s"' in part
    assert "Waiting for a worker" in part
    assert client.get(page.context["download_url"]).status_code == 404  # not ready


def test_only_the_requester_sees_an_export(
    client, world, low_threshold, django_capture_on_commit_callbacks
):
    p = world.personas
    client.force_login(p.org_admin)
    with django_capture_on_commit_callbacks(execute=True):
        status_url = client.get("/events/export.csv")["Location"]
    download_url = client.get(status_url).context["download_url"]

    for other in (p.platform_admin, p.member, p.outsider):
        client.force_login(other)
        assert client.get(status_url).status_code == 404
        assert client.get(download_url).status_code == 404


def test_a_background_export_reads_the_scope_of_its_requester(
    client, world, low_threshold, django_capture_on_commit_callbacks
):
    p = world.personas
    client.force_login(p.team_lead)
    # The team lead asks for everything: the task must still export the team lead's scope.
    with django_capture_on_commit_callbacks(execute=True):
        status_url = client.get("/events/export.csv")["Location"]
    download = client.get(client.get(status_url).context["download_url"])

    rows = list(csv.DictReader(io.StringIO(b"".join(download.streaming_content).decode())))
    expected = {e.request_id for e in world.visible_to("team_lead")}
    assert {r["request_id"] for r in rows} == expected


def test_unknown_export_is_404(client, world):
    client.force_login(world.personas.org_admin)

    assert client.get("/events/exports/00000000-0000-0000-0000-000000000000/").status_code == 404


def test_export_service_records_failure(world, low_threshold, monkeypatch):
    p = world.personas
    period = resolve_period("7d", None, None, ZoneInfo("UTC"), world.now)
    job = eventlog.export_request(user=p.org_admin, params="", period=period, total=1)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(eventlog, "export_rows", broken)
    result = eventlog.export_write(export_id=job["id"])

    assert result["state"] == "failed"
    assert "disk full" in eventlog.export_status(job["id"])["error"]
    assert not list(low_threshold.glob("*"))  # no half-written file left


def test_progress_without_a_known_total_shows_rows_so_far(client, world, low_threshold):
    client.force_login(world.personas.org_admin)
    # A raw-only filter: the count stops at the threshold, so the total is a floor.
    status_url = client.get("/events/export.csv", {"resource": "tokens"})["Location"]
    job = client.get(status_url).context["job"]
    assert job["total_known"] is False
    job.update(state="running", done=7)
    eventlog._save_status(job)

    part = client.get(status_url, HTTP_HX_REQUEST="true")

    assert part.context["percent"] is None
    assert "7 rows so far (more than 10 in all)" in part.content.decode()
    assert 'hx-trigger="every 1s"' in part.content.decode()
