"""The personal spending page in a real Chromium: the ring chart is drawn (an SVG, with no
inline script under the strict CSP), the countdown runs, and a person without a budget
reads who to ask."""

import re
from datetime import UTC, datetime, timedelta

import pytest

from tests.browser.conftest import sign_in
from tests.factories import PASSWORD, ingest
from tests.metering.budget_helpers import make_budget, spend_event

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

COUNTDOWN = re.compile(r"^\d+ days? \d+ hours? \d+ minutes?$")


@pytest.fixture
def page(chromium_browser):
    context = chromium_browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    yield page
    context.close()


def test_member_sees_ring_chart_and_countdown(live_server, personas, page, screenshot_dir):
    budget = make_budget(
        personas.org, "user", "20", user=personas.member, name="Max's monthly budget"
    )
    ingest(
        personas.org,
        [
            spend_event(
                "5", user="member@example.test", timestamp=datetime.now(UTC) - timedelta(minutes=4)
            )
        ],
    )
    sign_in(page, live_server, "member@example.test", PASSWORD)
    # From the user menu, as a person would get there.
    page.click("details.usermenu summary")
    page.click("text=My spending")
    page.wait_for_url(re.compile(r"/spending/$"))

    card = page.locator(f'.budget-card[data-budget="{budget.id}"]')
    ring = card.locator(".chart.ring")
    ring.locator(".plot svg").first.wait_for(timeout=20_000)
    assert ring.get_attribute("data-drawn") == "true"
    # The pie's two slices (spent and remaining) and the share in the middle.
    assert ring.locator("g.slice").count() == 2
    assert "25.0%" in ring.inner_text()

    countdown = card.locator(".countdown")
    page.wait_for_function("document.querySelector('.countdown').dataset.live === 'true'")
    assert COUNTDOWN.match(countdown.inner_text().strip())
    assert "$5.00" in card.locator("[data-spent]").inner_text()
    assert card.locator("[data-forecast]").inner_text().strip()
    # Spend per day is drawn too.
    card.locator(".chart:not(.ring) .plot svg").first.wait_for(timeout=20_000)
    page.screenshot(path=str(screenshot_dir / "spending-member.png"), full_page=True)
    assert page.errors == []


def test_a_person_without_a_budget_is_told_to_ask_an_org_admin(
    live_server, personas, page, screenshot_dir
):
    make_budget(personas.org, "user", "20", user=personas.member)  # someone else's
    sign_in(page, live_server, "lead@example.test", PASSWORD)
    page.goto(f"{live_server.url}/spending/")
    message = page.locator("[data-no-budget] h2")
    assert message.inner_text() == "No budget is set for you; ask an org admin."
    assert page.locator(".chart.ring").count() == 0
    page.screenshot(path=str(screenshot_dir / "spending-no-budget.png"), full_page=True)
    assert page.errors == []
