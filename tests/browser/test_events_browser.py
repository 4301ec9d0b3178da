"""The events log in a real Chromium: amount and pool filters, sorting by cost, the
details panel, page 3 and back, and the CSV export."""

import csv
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import parse_qs, urlparse

import pytest

from metering.ingest import ingest_batch
from tests.browser.conftest import sign_in
from tests.factories import PASSWORD, event_payload

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

POOLS = ["allocated", "surplus", "hybrid"]


@pytest.fixture
def events(personas):
    """90 calls over the last day: three pages and more, every pool, varied amounts."""
    rng = random.Random(3)
    now = datetime.now(UTC)
    batch = []
    for i in range(90):
        batch.append(
            event_payload(
                request_id=f"web-{i:03d}",
                timestamp=now - timedelta(minutes=7 * i + 1),
                user=rng.choice([personas.member.email, personas.team_lead.email]),
                input_tokens=rng.choice([50, 400, 900, 3000]),
                output_tokens=rng.choice([10, 120, 600]),
                cost_usd=str(Decimal(rng.randint(1, 90_000)) / 10**6),
                pool_category=POOLS[i % 3],
                session_id=f"chat-{i % 5}",
                metadata={"i": i},
            )
        )
    result = ingest_batch(organization=personas.org, events=batch, token=personas.service_token)
    assert result.accepted == 90
    return personas


def _query(page) -> dict:
    return parse_qs(urlparse(page.url).query)


def _ids(page) -> list[str]:
    return page.locator("#event-log tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.eventId)"
    )


def _swap(page, action) -> None:
    """Run `action` and wait for the log's HTMX swap to finish."""
    with page.expect_response(lambda r: "/events/" in r.url and r.request.method == "GET"):
        action()
    page.wait_for_selector("#event-log:not(.htmx-request)")
    page.wait_for_load_state("networkidle")


def test_filter_sort_open_details_page_and_export(
    live_server, chromium_browser, events, screenshot_dir, tmp_path
):
    context = chromium_browser.new_context(
        viewport={"width": 1500, "height": 1000}, accept_downloads=True
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    sign_in(page, live_server, events.org_admin.email, PASSWORD)

    page.goto(f"{live_server.url}/events/")
    assert page.locator("#event-log tbody tr").count() == 25
    assert "90 events" in page.locator(".log-count").inner_text()
    first_page = _ids(page)

    # Amount range (input + output tokens) and pool category.
    page.fill("input[name=amount_min]", "500")
    _swap(page, lambda: page.fill("input[name=amount_max]", "1500") or page.keyboard.press("Tab"))
    page.wait_for_function("() => location.search.includes('amount_max=1500')")
    _swap(page, lambda: page.select_option("select[name=pool]", "surplus"))
    page.wait_for_function("() => location.search.includes('pool=surplus')")
    amounts = page.locator("#event-log tbody td[data-amount]").evaluate_all(
        "cells => cells.map(c => Number(c.dataset.amount))"
    )
    assert amounts and all(500 <= a <= 1500 for a in amounts)
    pools = page.locator("#event-log tbody .pool").all_inner_texts()
    assert set(pools) == {"surplus"}

    # Sort by cost (the header link; the URL keeps the filters).
    _swap(page, lambda: page.click("th[data-col=cost] a"))
    page.wait_for_function("() => location.search.includes('sort=cost')")
    query = _query(page)
    assert query["pool"] == ["surplus"] and query["amount_min"] == ["500"]
    costs = page.locator("#event-log tbody td[title$=' USD']").evaluate_all(
        "cells => cells.map(c => Number(c.title.split(' ')[0]))"
    )
    assert costs == sorted(costs, reverse=True)
    # A filter change keeps the sort (and starts again at page 1).
    _swap(page, lambda: page.select_option("select[name=pool]", "allocated"))
    page.wait_for_function("() => location.search.includes('pool=allocated')")
    assert _query(page)["sort"] == ["cost"]
    _swap(page, lambda: page.select_option("select[name=pool]", "surplus"))
    page.wait_for_function("() => location.search.includes('pool=surplus')")

    # Open an event's details in the panel.
    row = page.locator("#event-log tbody tr").nth(1)
    request_id = row.locator("td").nth(15).inner_text()
    row.locator("td").nth(4).click()  # anywhere on the row
    page.wait_for_selector("#event-detail article.event-detail")
    panel = page.locator("#event-detail")
    assert request_id in panel.inner_text()
    assert '"i":' in panel.locator("pre.metadata").inner_text()
    assert "gateway" in panel.inner_text()  # the API token
    page.screenshot(path=str(screenshot_dir / "events-log-details.png"), full_page=False)
    page.click("#event-detail [data-close-detail]")
    assert panel.inner_text().strip() == ""

    # Clear the filters, go to page 3 and back.
    page.click("a.clear")
    page.wait_for_load_state("networkidle")
    assert _ids(page) == first_page
    _swap(page, lambda: page.click(".pager a[data-page='3']"))
    page.wait_for_function("() => location.search.includes('page=3')")
    assert page.locator(".pager .current").inner_text() == "3"
    third_page = _ids(page)
    assert len(third_page) == 25 and not set(third_page) & set(first_page)
    _swap(page, page.go_back)  # htmx asks the server for the whole page again
    assert "page=3" not in page.url
    assert _ids(page) == first_page
    _swap(page, page.go_forward)
    assert "page=3" in page.url
    assert _ids(page) == third_page

    # Export the (filtered) log.
    page.goto(f"{live_server.url}/events/?pool=hybrid")
    count_text = page.locator(".log-count").inner_text()
    with page.expect_download() as download_info:
        page.click("a[data-export]")
    path = tmp_path / "export.csv"
    download_info.value.save_as(path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert count_text == f"{len(rows)} events"
    assert {r["pool_category"] for r in rows} == {"hybrid"}

    page.goto(f"{live_server.url}/events/?sort=cost&dir=desc")
    page.screenshot(path=str(screenshot_dir / "events-log.png"), full_page=True)
    assert not [e for e in errors if "favicon" not in e], errors
    context.close()
