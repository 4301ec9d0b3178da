"""The dashboard in a real Chromium: filters redraw the charts and live in the URL."""

import csv
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlparse

import pytest

from tests.browser.conftest import sign_in
from tests.factories import PASSWORD, event_payload, ingest

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _metric(page, key: str) -> str:
    return page.locator(f'.metric[data-metric="{key}"] .metric-value').inner_text()


def _query(page) -> dict:
    return parse_qs(urlparse(page.url).query)


def _wait_for_charts(page) -> None:
    page.wait_for_selector("#widget-requests .chart[data-drawn] svg", timeout=20_000)


@pytest.fixture
def usage(personas):
    now = datetime.now(UTC)
    # Platform: 3 recent calls; research: 5 recent and 4 older than a week.
    ingest(
        personas.org,
        [event_payload(team="platform", timestamp=now - timedelta(hours=h + 1)) for h in range(3)],
    )
    ingest(
        personas.org,
        [event_payload(team="research", timestamp=now - timedelta(hours=h + 2)) for h in range(5)],
    )
    ingest(
        personas.org,
        [
            event_payload(team="research", timestamp=now - timedelta(days=12, hours=h))
            for h in range(4)
        ],
    )
    return personas


def test_org_admin_filters_switches_to_table_downloads_and_clears(
    live_server, chromium_browser, usage, screenshot_dir
):
    context = chromium_browser.new_context(
        viewport={"width": 1400, "height": 1000}, accept_downloads=True
    )
    page = context.new_page()
    sign_in(page, live_server, usage.org_admin.email, PASSWORD)
    page.goto(f"{live_server.url}/dashboard/")
    _wait_for_charts(page)
    assert _metric(page, "requests") == "8"  # default: last 7 days

    # Period: last 30 days. The widgets reload on their own and the URL follows.
    page.select_option("select[name=period]", "30d")
    page.wait_for_function("() => location.search.includes('period=30d')")
    page.wait_for_function(
        "() => document.querySelector('.metric[data-metric=requests] .metric-value')?.textContent.trim() === '12'"
    )
    _wait_for_charts(page)

    # Team filter through the picker.
    page.click("details[data-picker=team] summary")
    page.check(f"details[data-picker=team] input[value='{usage.platform_team.id}']")
    page.wait_for_function(f"() => location.search.includes('team={usage.platform_team.id}')")
    page.wait_for_function(
        "() => document.querySelector('.metric[data-metric=requests] .metric-value')?.textContent.trim() === '3'"
    )
    _wait_for_charts(page)
    assert _query(page)["team"] == [str(usage.platform_team.id)]

    # Reload: the selection survives.
    page.reload()
    _wait_for_charts(page)
    assert page.locator("select[name=period]").input_value() == "30d"
    assert _metric(page, "requests") == "3"
    page.click("details[data-picker=team] summary")
    assert page.is_checked(f"details[data-picker=team] input[value='{usage.platform_team.id}']")
    page.keyboard.press("Escape")

    # A widget switches to its table: the same numbers.
    page.click("#widget-requests a[data-mode=table]")
    page.wait_for_selector("#widget-requests table.data")
    totals = page.locator("#widget-requests table.data tbody tr td:last-child").all_inner_texts()
    assert sum(int(t.replace(",", "")) for t in totals) == 3

    # Its CSV downloads.
    with page.expect_download() as download_info:
        page.click("#widget-requests a.csv")
    path = download_info.value.path()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sum(int(r["Total"]) for r in rows) == 3

    page.screenshot(path=str(screenshot_dir / "dashboard-filtered.png"), full_page=True)

    # Clear all: back to the defaults, everything visible again.
    page.click("a.clear")
    page.wait_for_load_state("networkidle")
    _wait_for_charts(page)
    assert urlparse(page.url).query == ""
    assert _metric(page, "requests") == "8"
    context.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_dashboard_screenshots_in_light_and_dark(
    live_server, chromium_browser, usage, screenshot_dir, scheme
):
    context = chromium_browser.new_context(
        viewport={"width": 1400, "height": 1000}, color_scheme=scheme
    )
    page = context.new_page()
    sign_in(page, live_server, usage.org_admin.email, PASSWORD)
    page.goto(f"{live_server.url}/dashboard/?period=30d")
    _wait_for_charts(page)
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert (background == "rgb(15, 18, 22)") == (scheme == "dark")
    page.screenshot(path=str(screenshot_dir / f"dashboard-{scheme}.png"), full_page=True)
    assert (screenshot_dir / f"dashboard-{scheme}.png").stat().st_size > 10_000
    context.close()
