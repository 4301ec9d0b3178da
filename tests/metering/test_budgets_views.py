"""Budget pages per persona: the personal spending page, the overview (full page and
HTMX partial), budget details, the alert history, the CSV, and the settings pages.
Out-of-scope budgets are invisible: listed nowhere, and 404 when asked for by id."""

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from django.urls import reverse

from metering.budgets import budget_alerts_evaluate
from metering.models import AlertWebhook, Budget, BudgetAlert
from tests.factories import ingest
from tests.metering.budget_helpers import make_budget, spend_event

pytestmark = pytest.mark.django_db

PERSONAS = ["platform_admin", "org_admin", "team_lead", "project_admin", "member", "outsider"]


@pytest.fixture
def budgets(personas):
    org, beta = personas.org, personas.other_org
    return {
        "alpha": make_budget(org, "org", "100"),
        "member": make_budget(org, "user", "10", user=personas.member, name="Max's budget"),
        "platform": make_budget(org, "team", "40", team=personas.platform_team),
        "chatbot": make_budget(org, "project", "30", project=personas.chatbot_project),
        "member_key": make_budget(org, "token", "5", api_token=personas.member_token),
        "beta": make_budget(beta, "org", "1000"),
        "outsider": make_budget(beta, "user", "7", user=personas.outsider),
    }


# What each persona may see (SPEC section 2 applied to budgets: a budget shows its
# subject's spend, so it is visible to whoever sees all of that subject's events).
VISIBLE = {
    "platform_admin": {"alpha", "member", "platform", "chatbot", "member_key", "beta", "outsider"},
    "org_admin": {"alpha", "member", "platform", "chatbot", "member_key"},
    "team_lead": {"platform"},
    "project_admin": {"chatbot"},
    "member": {"member", "member_key"},
    "outsider": {"outsider"},
}


def login(client, personas, name):
    client.force_login(getattr(personas, name))
    return client


def listed_ids(html: str) -> set[int]:
    return {int(i) for i in re.findall(r'<tr data-budget="(\d+)"', html)}


@pytest.mark.parametrize("name", PERSONAS)
def test_budget_pages_show_only_budgets_in_scope(client, personas, budgets, name):
    login(client, personas, name)
    expected = {budgets[k].id for k in VISIBLE[name]}
    page = client.get(reverse("metering:budgets"))
    assert page.status_code == 200
    assert listed_ids(page.content.decode()) == expected
    partial = client.get(reverse("metering:budgets"), {"sort": "name"}, HTTP_HX_REQUEST="true")
    assert partial.status_code == 200
    assert "<html" not in partial.content.decode()
    assert listed_ids(partial.content.decode()) == expected
    for key, budget in budgets.items():
        detail = client.get(reverse("metering:budget-detail", args=[budget.id]))
        csv = client.get(reverse("metering:budget-detail", args=[budget.id]), {"format": "csv"})
        status = 200 if key in VISIBLE[name] else 404
        assert (detail.status_code, csv.status_code) == (status, status), key


@pytest.mark.parametrize("name", PERSONAS)
def test_alert_history_shows_only_alerts_of_visible_budgets(client, personas, budgets, name):
    when = datetime.now(UTC) - timedelta(minutes=5)
    ingest(
        personas.org,
        [
            spend_event(
                "200",
                user="member@example.test",
                team="platform",
                project="chatbot",
                timestamp=when,
            )
        ],
        token=personas.member_token,
    )
    ingest(personas.other_org, [spend_event("2000", user="outsider@beta.test", timestamp=when)])
    for budget in Budget.objects.all():
        budget_alerts_evaluate(budget=budget, deliver=False)
    login(client, personas, name)
    html = client.get(reverse("metering:alerts")).content.decode()
    shown = {int(i) for i in re.findall(r'data-alert="(\d+)"', html)}
    visible_budgets = {budgets[k].id for k in VISIBLE[name]}
    expected = set(
        BudgetAlert.objects.filter(budget_id__in=visible_budgets).values_list("id", flat=True)
    )
    assert shown == expected and shown


SETTINGS_URLS = [
    ("metering:settings-budgets", ()),
    ("metering:budget-new", ()),
    ("metering:webhook-new", ()),
    ("metering:settings-pools", ()),
    ("metering:pool-new", ()),
]


@pytest.mark.parametrize("name", PERSONAS)
def test_settings_pages_are_for_org_admins_only(client, personas, budgets, name):
    login(client, personas, name)
    admin = name in ("platform_admin", "org_admin")
    for url_name, args in SETTINGS_URLS:
        assert client.get(reverse(url_name, args=args)).status_code == (200 if admin else 404)
    for key, budget in budgets.items():
        editable = name == "platform_admin" or (
            name == "org_admin" and budget.organization == personas.org
        )
        assert client.get(reverse("metering:budget-edit", args=[budget.id])).status_code == (
            200 if editable else 404
        ), key
        response = client.post(reverse("metering:budget-delete", args=[budget.id]))
        assert (response.status_code == 302) == editable, key


def test_an_org_admin_cannot_reach_another_orgs_webhook(client, personas):
    hook = AlertWebhook.objects.create(
        organization=personas.other_org, url="https://example.com/h", secret="s"
    )
    login(client, personas, "org_admin")
    assert client.get(reverse("metering:webhook-edit", args=[hook.id])).status_code == 404
    assert client.post(reverse("metering:webhook-rotate", args=[hook.id])).status_code == 404
    assert client.post(reverse("metering:webhook-delete", args=[hook.id])).status_code == 404
    assert AlertWebhook.objects.get().secret == "s"


def test_anonymous_visitors_are_sent_to_sign_in(client, budgets):
    for url in [
        "/spending/",
        "/budgets/",
        "/budgets/alerts/",
        f"/budgets/{budgets['alpha'].id}/",
        "/pools/",
        "/settings/budgets/",
    ]:
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"], url


# ---------------------------------------------------------------------------------------
# The personal spending page


def test_member_sees_ring_countdown_forecast_and_days(client, personas, budgets):
    ingest(
        personas.org,
        [
            spend_event(
                "2.5",
                user="member@example.test",
                timestamp=datetime.now(UTC) - timedelta(minutes=3),
            )
        ],
    )
    login(client, personas, "member")
    html = client.get(reverse("metering:spending")).content.decode()
    assert "No budget is set for you" not in html
    assert "$2.50" in html and "$10.00" in html and "$7.50" in html
    ring = json.loads(
        re.search(
            rf'<script id="ring-{budgets["member"].id}" type="application/json">(.*?)</script>',
            html,
        ).group(1)
    )
    assert ring["data"][0]["type"] == "pie" and ring["data"][0]["values"] == [2.5, 7.5]
    assert re.search(r'data-countdown-to="\d+">\d+ days? \d+ hours? \d+ minutes?<', html)
    assert "Spend per day of this period" in html
    assert "nothing carries over" in html
    # The token budget covers the member's calls too; the team's does not show (not theirs to see).
    assert "member&#x27;s key" in html or "member's key" in html
    assert "Platform" not in re.sub(r"<nav.*?</nav>", "", html, flags=re.S)
    assert "<script>" not in html  # no inline script: CSP script-src 'self'


def test_without_a_budget_the_page_says_ask_an_org_admin(client, personas, budgets):
    ingest(
        personas.org,
        [
            spend_event(
                "1.25", user="lead@example.test", timestamp=datetime.now(UTC) - timedelta(minutes=3)
            )
        ],
    )
    login(client, personas, "team_lead")
    html = client.get(reverse("metering:spending")).content.decode()
    assert "No budget is set for you; ask an org admin." in html
    assert "$1.25" in html  # still shows this month's own spend


def test_a_changed_budget_says_spend_in_the_period_stays_counted(client, personas, budgets):
    login(client, personas, "org_admin")
    budget = budgets["member"]
    form = {
        "organization": personas.org.id,
        "subject": "user",
        "user": personas.member.id,
        "name": "Max's budget",
        "amount_usd": "12",
        "period": "weekly",
        "week_start": "0",
        "month_day": "1",
        "thresholds": "50, 90",
        "is_active": "on",
    }
    response = client.post(reverse("metering:budget-edit", args=[budget.id]), form, follow=True)
    assert response.status_code == 200
    html = response.content.decode()
    assert "spend already made in the period stays counted" in html  # the message
    assert "spend already made in this period stays counted" in html  # the notice
    budget.refresh_from_db()
    assert (budget.period, budget.thresholds, str(budget.amount_usd)) == (
        "weekly",
        [50, 90],
        "12.0000",
    )


# ---------------------------------------------------------------------------------------
# Settings forms: validation messages


def _post_budget(client, personas, **overrides):
    form = {
        "organization": personas.org.id,
        "subject": "org",
        "amount_usd": "10",
        "period": "monthly",
        "week_start": "0",
        "month_day": "1",
        "thresholds": "50, 80, 100",
        "is_active": "on",
    }
    form.update(overrides)
    return client.post(reverse("metering:budget-new"), form)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"subject": "team"}, "Choose the team this budget is for."),
        ({"subject": "user"}, "Choose the user this budget is for."),
        ({"period": "every_n_days"}, "Pick the date the first period starts on."),
        ({"period": "every_n_days", "anchor": "2026-01-01"}, "Say how many days a period lasts"),
        ({"thresholds": "50, eighty"}, "is not a percentage"),
        ({"thresholds": "50, 50"}, "Each threshold may appear only once."),
        ({"amount_usd": "0"}, "Ensure this value is greater than or equal to 0.0001."),
        ({"month_day": "32"}, "Ensure this value is less than or equal to 31."),
    ],
)
def test_budget_form_explains_what_is_wrong(client, personas, overrides, message):
    login(client, personas, "org_admin")
    response = _post_budget(client, personas, **overrides)
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not Budget.objects.exists()


def test_budget_form_refuses_another_organizations_team(client, personas):
    login(client, personas, "org_admin")
    response = _post_budget(client, personas, subject="team", team=personas.secret_team.id)
    assert response.status_code == 200
    assert not Budget.objects.exists()
    assert "Secret Team" not in response.content.decode()


def test_org_admin_creates_a_budget_and_a_webhook(client, personas):
    login(client, personas, "org_admin")
    response = _post_budget(
        client,
        personas,
        subject="team",
        team=personas.platform_team.id,
        period="every_n_days",
        every_n_days="14",
        anchor="2026-01-05",
    )
    budget = Budget.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse(
        "metering:budget-detail", args=[budget.id]
    )
    assert (budget.team, budget.every_n_days, budget.thresholds) == (
        personas.platform_team,
        14,
        [50, 80, 100],
    )
    response = client.post(
        reverse("metering:webhook-new"),
        {
            "organization": personas.org.id,
            "url": "https://hooks.example.com/budget",
            "is_active": "on",
        },
    )
    hook = AlertWebhook.objects.get()
    assert response.status_code == 302 and hook.secret.startswith("whsec_")
    page = client.get(reverse("metering:webhook-edit", args=[hook.id])).content.decode()
    assert hook.secret in page and "X-Usage-Signature" in page
    old = hook.secret
    client.post(reverse("metering:webhook-rotate", args=[hook.id]))
    hook.refresh_from_db()
    assert hook.secret != old


def test_webhooks_must_be_https_in_production(client, personas, settings):
    settings.BUDGET_WEBHOOK_ALLOW_PRIVATE = False
    login(client, personas, "org_admin")
    response = client.post(
        reverse("metering:webhook-new"),
        {"organization": personas.org.id, "url": "http://hooks.example.com/budget"},
    )
    assert "Use an https:// URL" in response.content.decode()


def test_overview_sorts_and_filters_by_state(client, personas, budgets):
    when = datetime.now(UTC) - timedelta(minutes=3)
    ingest(
        personas.org,
        [spend_event("11", user="member@example.test", team="research", timestamp=when)],
        token=personas.service_token,
    )
    login(client, personas, "org_admin")
    over = client.get(reverse("metering:budgets"), {"state": "over"}).content.decode()
    assert listed_ids(over) == {budgets["member"].id}  # 11 of 10
    warning = client.get(reverse("metering:budgets"), {"state": "warning"}).content.decode()
    assert listed_ids(warning) == set()
    by_share = client.get(reverse("metering:budgets"), {"sort": "-share"}).content.decode()
    order = [int(i) for i in re.findall(r'<tr data-budget="(\d+)"', by_share)]
    assert order[0] == budgets["member"].id
    by_name = client.get(reverse("metering:budgets"), {"q": "Max"}).content.decode()
    assert listed_ids(by_name) == {budgets["member"].id}
    links = re.findall(r'href="(/dashboard/\?[^"]+)"', by_share)
    assert any(f"user={personas.member.id}" in link and "start=" in link for link in links)
