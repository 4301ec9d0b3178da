"""Budget spend: exactly the raw events of the subject in the current period.

Spend is summed from the per-subject 15-minute counters that ingestion maintains; these
tests hold it against raw sums and against the analytics engine, check that nothing of
an earlier period carries over, that a budget changed mid-period recomputes its period
and keeps what was already spent in it, and the forecast.
"""

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db.models import Q, Sum

from analytics.queries import Selection, totals
from analytics.visibility import Scope
from metering.budgets import (
    budget_save,
    budget_spend_rebuild,
    budget_statuses,
    period_at,
    spend_per_day,
    zone_of,
)
from metering.models import BudgetSpend15m, UsageEvent
from tests.factories import ingest
from tests.metering.budget_helpers import make_budget, spend_event

pytestmark = pytest.mark.django_db

# A fixed clock: Wednesday 2026-06-17 10:20 UTC (12:20 in Berlin, alpha's zone).
NOW = datetime(2026, 6, 17, 10, 20, 7, tzinfo=UTC)


def _random_events(personas, n: int = 600, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    people = [None, "member@example.test", "lead@example.test", "projectadmin@example.test"]
    events = []
    for _ in range(n):
        event = spend_event(
            Decimal(rng.randint(1, 2_000_000)) / Decimal(10**9) * rng.choice([1, 1000, 10**5]),
            timestamp=NOW - timedelta(seconds=rng.randint(0, 50 * 86400)),
            team=rng.choice([None, "platform", "research"]),
            project=rng.choice([None, "chatbot", "search"]),
        )
        user = rng.choice(people)
        if user:
            event["user"] = user
        events.append(event)
    return events


def _send(personas, events):
    """Half through the member's token, half through the gateway token."""
    half = len(events) // 2
    ingest(personas.org, events[:half], token=personas.member_token, now=NOW)
    ingest(personas.org, events[half:], token=personas.service_token, now=NOW)


@pytest.fixture
def budgets_of_every_kind(personas):
    org = personas.org
    return [
        make_budget(org, "org", "500", period="monthly"),
        make_budget(org, "user", "20", user=personas.member, period="weekly", week_start=2),
        make_budget(org, "team", "50", team=personas.platform_team, period="daily"),
        make_budget(
            org, "project", "70", project=personas.search_project, period="monthly", month_day=31
        ),
        make_budget(
            org,
            "token",
            "30",
            api_token=personas.member_token,
            period="every_n_days",
            every_n_days=9,
            anchor=datetime(2026, 5, 2).date(),
        ),
    ]


FILTER = {
    "org": lambda b: Q(),
    "user": lambda b: Q(user_id=b.user_id),
    "team": lambda b: Q(team_id=b.team_id),
    "project": lambda b: Q(project_id=b.project_id),
    "token": lambda b: Q(api_token_id=b.api_token_id),
}
SELECTION = {
    "org": lambda b: {},
    "user": lambda b: {"user_ids": (b.user_id,)},
    "team": lambda b: {"team_ids": (b.team_id,)},
    "project": lambda b: {"project_ids": (b.project_id,)},
    "token": lambda b: {"token_ids": (b.api_token_id,)},
}


def test_spend_equals_the_raw_sum_of_the_subjects_events_in_the_period(
    personas, budgets_of_every_kind
):
    _send(personas, _random_events(personas))
    for status in budget_statuses(budgets_of_every_kind, NOW):
        budget, period = status.budget, status.period
        raw = UsageEvent.objects.filter(
            FILTER[budget.subject](budget),
            organization=personas.org,
            timestamp__gte=period.start,
            timestamp__lt=period.end,
        ).aggregate(s=Sum("cost_nanos"))["s"]
        assert raw, f"the test data should give {budget.subject} some spend"
        assert status.spent_nanos == raw, budget.subject
        # The same number as the dashboard's engine, for the same range and filter.
        selection = Selection(
            scope=Scope(everything=True),
            start=period.start,
            end=period.end,
            org_ids=(personas.org.id,),
            **SELECTION[budget.subject](budget),
        )
        assert totals(selection).cost_nanos == raw


def test_spend_per_day_adds_up_to_the_period_spend(personas, budgets_of_every_kind):
    _send(personas, _random_events(personas))
    for status in budget_statuses(budgets_of_every_kind, NOW):
        days = spend_per_day(status.budget, status.period)
        tz = zone_of(personas.org)
        assert days[0][0] == status.period.start.astimezone(tz).date()
        assert sum(n for _, n in days) == status.spent_nanos


def test_nothing_from_the_previous_period_carries_over(personas):
    budget = make_budget(personas.org, "user", "10", user=personas.member, period="daily")
    today = period_at(budget, zone_of(personas.org), NOW)
    ingest(
        personas.org,
        [
            spend_event(
                "7", user="member@example.test", timestamp=today.start - timedelta(seconds=1)
            ),
            spend_event("2", user="member@example.test", timestamp=today.start),
        ],
        now=NOW,
    )
    status = budget_statuses([budget], NOW)[0]
    assert status.spent_nanos == 2 * 10**9
    assert status.remaining_usd == Decimal(8)
    # Yesterday, the same budget had the 7 dollars.
    yesterday = budget_statuses([budget], today.start - timedelta(minutes=1))[0]
    assert yesterday.spent_nanos == 7 * 10**9


def test_rebuilding_the_counters_from_the_roll_up_gives_the_same_rows(personas):
    _send(personas, _random_events(personas, n=300))
    before = set(
        BudgetSpend15m.objects.values_list("subject", "subject_id", "bucket", "cost_nanos")
    )
    assert budget_spend_rebuild(organization_id=personas.org.id) == len(before)
    after = set(BudgetSpend15m.objects.values_list("subject", "subject_id", "bucket", "cost_nanos"))
    assert after == before


def test_other_organizations_spend_never_counts(personas):
    budget = make_budget(personas.org, "org", "10")
    when = NOW - timedelta(hours=1)
    ingest(personas.other_org, [spend_event("5", timestamp=when)], now=NOW)
    ingest(personas.org, [spend_event("1", timestamp=when)], now=NOW)
    assert budget_statuses([budget], NOW)[0].spent_nanos == 10**9


# ---------------------------------------------------------------------------------------
# Changing a budget


def test_changing_the_period_mid_way_recomputes_the_reset_and_keeps_spend_in_it(personas):
    budget = make_budget(personas.org, "org", "100", period="monthly")
    # June 1st (this month), June 15th (Monday this week), and today.
    ingest(
        personas.org,
        [
            spend_event("10", timestamp=datetime(2026, 6, 1, 8, tzinfo=UTC)),
            spend_event("20", timestamp=datetime(2026, 6, 15, 9, tzinfo=UTC)),
            spend_event("5", timestamp=NOW - timedelta(hours=1)),
        ],
        now=NOW,
    )
    monthly = budget_statuses([budget], NOW)[0]
    assert monthly.spent_nanos == 35 * 10**9
    assert monthly.resets_at == datetime(2026, 6, 30, 22, tzinfo=UTC)  # July 1st, Berlin
    assert not monthly.changed_in_period

    budget.period, budget.week_start = "weekly", 0
    budget_save(budget=budget)
    budget.refresh_from_db()
    weekly = budget_statuses([budget], NOW)[0]
    # The new current period is this week (from Monday June 15th, Berlin): the 20 and
    # the 5 already spent in it stay counted; the 10 of June 1st is not in it.
    assert weekly.period.start == datetime(2026, 6, 14, 22, tzinfo=UTC)
    assert weekly.resets_at == datetime(2026, 6, 21, 22, tzinfo=UTC)
    assert weekly.spent_nanos == 25 * 10**9
    assert budget.changed_at is not None
    assert budget_statuses([budget], budget.changed_at)[0].changed_in_period


def test_changing_the_amount_takes_effect_at_once(personas):
    budget = make_budget(personas.org, "org", "100")
    ingest(personas.org, [spend_event("60", timestamp=NOW - timedelta(hours=1))], now=NOW)
    assert budget_statuses([budget], NOW)[0].state == "ok"
    budget.amount_usd = Decimal("50")
    budget_save(budget=budget)
    status = budget_statuses([budget], NOW)[0]
    assert status.state == "over"
    assert status.remaining_nanos == 0
    assert status.share == Decimal("120.0")


def test_saving_without_a_change_keeps_changed_at_empty(personas):
    budget = make_budget(personas.org, "org", "100")
    budget.name = "Renamed"
    budget_save(budget=budget)
    budget.refresh_from_db()
    assert budget.changed_at is None


# ---------------------------------------------------------------------------------------
# State and forecast


@pytest.mark.parametrize(
    ("spent", "thresholds", "state"),
    [
        ("79.99", [50, 80, 100], "ok"),
        ("80", [50, 80, 100], "warning"),
        ("99.999999999", [50, 80, 100], "warning"),
        ("100", [50, 80, 100], "over"),
        ("60", [50, 100], "warning"),
        ("60", [], "ok"),
        ("85", [], "warning"),
    ],
)
def test_state_follows_the_budgets_own_thresholds(personas, spent, thresholds, state):
    budget = make_budget(personas.org, "org", "100", thresholds=thresholds)
    ingest(personas.org, [spend_event(spent, timestamp=NOW - timedelta(minutes=30))], now=NOW)
    assert budget_statuses([budget], NOW)[0].state == state


def test_forecast_gives_the_run_out_date_at_the_recent_rate(personas):
    # Weekly from Monday June 15th (Berlin): 10 USD a day for the last two days, 100 a week.
    budget = make_budget(personas.org, "org", "100", period="weekly", week_start=0)
    events = [spend_event("10", timestamp=NOW - timedelta(days=d, minutes=5)) for d in (0, 1)]
    ingest(personas.org, events, now=NOW)
    status = budget_statuses([budget], NOW)[0]
    forecast = status.forecast()
    # 20 USD over the 7-day window: 20/7 a day; 80 left -> 28 days: after the reset.
    assert forecast.runs_out_at is None
    assert "not run out" in forecast.text
    ingest(personas.org, [spend_event("60", timestamp=NOW - timedelta(hours=2))], now=NOW)
    forecast = budget_statuses([budget], NOW)[0].forecast()
    # 80 spent over 7 days; 20 left at 80/7 a day: 1.75 days from now, before the reset.
    assert forecast.runs_out_at == NOW + timedelta(days=1.75)
    assert forecast.runs_out_at < status.resets_at


def test_forecast_of_a_used_up_budget_says_so(personas):
    budget = make_budget(personas.org, "org", "1")
    ingest(personas.org, [spend_event("1", timestamp=NOW - timedelta(minutes=3))], now=NOW)
    forecast = budget_statuses([budget], NOW)[0].forecast()
    assert forecast.used_up and "used up" in forecast.text


def test_forecast_without_recent_spend_is_not_at_this_rate(personas):
    budget = make_budget(personas.org, "org", "1")
    assert budget_statuses([budget], NOW)[0].forecast().text == "Does not run out at this rate."


def test_countdown_to_the_reset(personas):
    budget = make_budget(personas.org, "org", "1", period="daily")
    status = budget_statuses([budget], NOW)[0]
    # 12:20:07 in Berlin: 11 hours 39 minutes (and 53 s) to midnight.
    assert status.countdown == {"days": 0, "hours": 11, "minutes": 39}
