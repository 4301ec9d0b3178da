"""Budget periods: every kind, in several time zones, across DST changes and month ends.

Periods start at local midnight of the organization's zone: a day across a DST change
has 23 or 25 hours, a month ends on its own last day (February 29 in a leap year), and
a "from the 31st" month starts on the last day of shorter months.
"""

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.budgets import Period, describe_rule, period_at, period_dates
from metering.models import Budget

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")
KATHMANDU = ZoneInfo("Asia/Kathmandu")
CHATHAM = ZoneInfo("Pacific/Chatham")
HAVANA = ZoneInfo("America/Havana")  # DST starts at midnight: 00:00 does not exist
SYDNEY = ZoneInfo("Australia/Sydney")


def rule(period: str, **fields) -> Budget:
    return Budget(period=period, **fields)


def local(tz: ZoneInfo, *args, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=tz, fold=fold)


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def bounds(p: Period, tz: ZoneInfo) -> tuple[datetime, datetime]:
    return p.start.astimezone(tz), p.end.astimezone(tz)


# ---------------------------------------------------------------------------------------
# Daily


def test_daily_period_is_the_local_calendar_day():
    p = period_at(rule("daily"), BERLIN, local(BERLIN, 2026, 6, 10, 23, 59))
    assert bounds(p, BERLIN) == (local(BERLIN, 2026, 6, 10), local(BERLIN, 2026, 6, 11))
    assert p.start == utc(2026, 6, 9, 22)


def test_daily_period_on_the_spring_dst_day_has_23_hours():
    p = period_at(rule("daily"), BERLIN, local(BERLIN, 2026, 3, 29, 12))
    assert p.start == utc(2026, 3, 28, 23)
    assert p.end == utc(2026, 3, 29, 22)
    assert p.end - p.start == timedelta(hours=23)


def test_daily_period_on_the_autumn_dst_day_has_25_hours():
    p = period_at(rule("daily"), BERLIN, local(BERLIN, 2026, 10, 25, 2, 30, fold=1))
    assert p.start == utc(2026, 10, 24, 22)
    assert p.end == utc(2026, 10, 25, 23)
    assert p.end - p.start == timedelta(hours=25)


def test_daily_period_in_new_york_across_its_dst_change():
    p = period_at(rule("daily"), NEW_YORK, utc(2026, 3, 8, 12))
    assert p.start == utc(2026, 3, 8, 5)  # midnight EST
    assert p.end == utc(2026, 3, 9, 4)  # midnight EDT
    assert p.end - p.start == timedelta(hours=23)


def test_daily_period_where_midnight_does_not_exist_starts_at_the_change():
    p = period_at(rule("daily"), HAVANA, local(HAVANA, 2026, 3, 8, 12))
    start, end = bounds(p, HAVANA)
    assert (start.date(), start.hour, start.minute) == (date(2026, 3, 8), 1, 0)
    assert end == local(HAVANA, 2026, 3, 9)
    assert p.end - p.start == timedelta(hours=23)


@pytest.mark.parametrize(
    ("tz", "start_utc"),
    [
        (KOLKATA, utc(2026, 1, 14, 18, 30)),  # +05:30
        (KATHMANDU, utc(2026, 1, 14, 18, 15)),  # +05:45
        (CHATHAM, utc(2026, 1, 14, 10, 15)),  # +13:45 in summer
    ],
)
def test_daily_periods_in_odd_offsets_start_on_a_quarter_hour(tz, start_utc):
    p = period_at(rule("daily"), tz, local(tz, 2026, 1, 15, 9))
    assert p.start == start_utc
    assert p.start_epoch % 900 == 0 and p.end_epoch % 900 == 0


# ---------------------------------------------------------------------------------------
# Weekly


def test_weekly_period_starts_on_the_chosen_weekday():
    # 2026-06-10 is a Wednesday; weeks from Sunday (6) start on 2026-06-07.
    p = period_at(rule("weekly", week_start=6), NEW_YORK, local(NEW_YORK, 2026, 6, 10, 8))
    assert bounds(p, NEW_YORK) == (local(NEW_YORK, 2026, 6, 7), local(NEW_YORK, 2026, 6, 14))


def test_weekly_period_on_its_first_day_and_last_instant():
    week = rule("weekly", week_start=0)
    monday = period_at(week, BERLIN, local(BERLIN, 2026, 6, 8, 0, 0))
    assert monday.start == local(BERLIN, 2026, 6, 8).astimezone(UTC)
    last = period_at(week, BERLIN, monday.end - timedelta(microseconds=1))
    assert last == monday
    assert period_at(week, BERLIN, monday.end).start == monday.end


def test_weekly_period_across_dst_has_167_or_169_hours():
    week = rule("weekly", week_start=0)
    spring = period_at(week, BERLIN, local(BERLIN, 2026, 3, 27, 12))
    autumn = period_at(week, BERLIN, local(BERLIN, 2026, 10, 22, 12))
    assert spring.end - spring.start == timedelta(hours=167)
    assert autumn.end - autumn.start == timedelta(hours=169)


# ---------------------------------------------------------------------------------------
# Monthly


def test_calendar_month_from_january_31_to_february():
    month = rule("monthly", month_day=1)
    jan = period_at(month, BERLIN, local(BERLIN, 2027, 1, 31, 23, 30))
    assert bounds(jan, BERLIN) == (local(BERLIN, 2027, 1, 1), local(BERLIN, 2027, 2, 1))
    feb = period_at(month, BERLIN, jan.end)
    assert bounds(feb, BERLIN) == (local(BERLIN, 2027, 2, 1), local(BERLIN, 2027, 3, 1))
    assert feb.end - feb.start == timedelta(days=28)


def test_calendar_february_of_a_leap_year_has_29_days():
    feb = period_at(rule("monthly"), NEW_YORK, local(NEW_YORK, 2028, 2, 29, 18))
    assert bounds(feb, NEW_YORK) == (local(NEW_YORK, 2028, 2, 1), local(NEW_YORK, 2028, 3, 1))
    assert len(period_dates(feb, NEW_YORK)) == 29


def test_month_from_the_31st_starts_on_the_last_day_of_february():
    month = rule("monthly", month_day=31)
    jan = period_at(month, BERLIN, local(BERLIN, 2027, 2, 10))
    assert bounds(jan, BERLIN) == (local(BERLIN, 2027, 1, 31), local(BERLIN, 2027, 2, 28))
    feb = period_at(month, BERLIN, jan.end)
    assert bounds(feb, BERLIN) == (local(BERLIN, 2027, 2, 28), local(BERLIN, 2027, 3, 31))
    # The 31st again from March on: February's shortness does not stick.
    assert period_at(month, BERLIN, feb.end).start == local(BERLIN, 2027, 3, 31).astimezone(UTC)


def test_month_from_the_31st_in_a_leap_year_starts_on_february_29():
    month = rule("monthly", month_day=31)
    before = period_at(month, BERLIN, local(BERLIN, 2028, 2, 28, 23))
    assert bounds(before, BERLIN) == (local(BERLIN, 2028, 1, 31), local(BERLIN, 2028, 2, 29))
    leap_day = period_at(month, BERLIN, local(BERLIN, 2028, 2, 29, 0, 1))
    assert bounds(leap_day, BERLIN) == (local(BERLIN, 2028, 2, 29), local(BERLIN, 2028, 3, 31))


def test_month_from_the_30th_across_the_year_end():
    month = rule("monthly", month_day=30)
    p = period_at(month, KOLKATA, local(KOLKATA, 2027, 1, 5))
    assert bounds(p, KOLKATA) == (local(KOLKATA, 2026, 12, 30), local(KOLKATA, 2027, 1, 30))


def test_month_across_the_autumn_dst_change_in_the_southern_hemisphere():
    # Sydney leaves DST on the first Sunday of April: the month is an hour longer.
    p = period_at(rule("monthly"), SYDNEY, local(SYDNEY, 2026, 4, 15))
    assert p.start == utc(2026, 3, 31, 13)  # midnight +11:00
    assert p.end == utc(2026, 4, 30, 14)  # midnight +10:00
    assert p.end - p.start == timedelta(days=30, hours=1)


# ---------------------------------------------------------------------------------------
# Every N days


def test_every_n_days_counts_from_the_anchor():
    every = rule("every_n_days", every_n_days=14, anchor=date(2026, 1, 5))
    p = period_at(every, BERLIN, local(BERLIN, 2026, 2, 3, 12))
    assert bounds(p, BERLIN) == (local(BERLIN, 2026, 2, 2), local(BERLIN, 2026, 2, 16))


def test_every_n_days_before_the_anchor_counts_backwards():
    every = rule("every_n_days", every_n_days=10, anchor=date(2026, 1, 11))
    p = period_at(every, BERLIN, local(BERLIN, 2026, 1, 10, 23))
    assert bounds(p, BERLIN) == (local(BERLIN, 2026, 1, 1), local(BERLIN, 2026, 1, 11))


def test_every_n_days_across_dst_keeps_local_midnights():
    every = rule("every_n_days", every_n_days=3, anchor=date(2026, 3, 27))
    p = period_at(every, BERLIN, local(BERLIN, 2026, 3, 28, 12))
    assert bounds(p, BERLIN) == (local(BERLIN, 2026, 3, 27), local(BERLIN, 2026, 3, 30))
    assert p.end - p.start == timedelta(hours=71)


def test_every_n_days_over_february_29():
    every = rule("every_n_days", every_n_days=2, anchor=date(2028, 2, 28))
    p = period_at(every, NEW_YORK, local(NEW_YORK, 2028, 2, 29, 23, 59))
    assert bounds(p, NEW_YORK) == (local(NEW_YORK, 2028, 2, 28), local(NEW_YORK, 2028, 3, 1))


# ---------------------------------------------------------------------------------------
# Laws, for any rule, zone and moment

ZONES = [BERLIN, NEW_YORK, KOLKATA, KATHMANDU, CHATHAM, HAVANA, SYDNEY, ZoneInfo("UTC")]
rules = st.one_of(
    st.just(rule("daily")),
    st.builds(lambda d: rule("weekly", week_start=d), st.integers(0, 6)),
    st.builds(lambda d: rule("monthly", month_day=d), st.integers(1, 31)),
    st.builds(
        lambda n, a: rule("every_n_days", every_n_days=n, anchor=a),
        st.integers(1, 60),
        st.dates(date(2020, 1, 1), date(2030, 12, 31)),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    rules,
    st.sampled_from(ZONES),
    st.datetimes(datetime(2021, 1, 1), datetime(2029, 12, 31), timezones=st.just(UTC)),
)
def test_periods_contain_the_moment_start_at_local_midnight_and_tile_time(budget, tz, moment):
    p = period_at(budget, tz, moment)
    assert p.start <= moment < p.end
    # Boundaries are on the 15-minute marks the spend counters use.
    assert p.start_epoch % 900 == 0 and p.end_epoch % 900 == 0
    # A local midnight (or the first instant of a day whose midnight was skipped).
    start_local = p.start.astimezone(tz)
    assert start_local.hour <= 1 and start_local.minute == 0
    assert (p.start - timedelta(seconds=1)).astimezone(tz).date() < start_local.date()
    # Periods tile time: the next one starts where this one ends, the one before ends
    # where this one starts, and every moment inside maps back to this period.
    assert period_at(budget, tz, p.end).start == p.end
    assert period_at(budget, tz, p.start - timedelta(microseconds=1)).end == p.start
    assert period_at(budget, tz, p.start) == p


def test_rules_are_described_in_words():
    assert describe_rule(rule("daily")) == "Daily, from midnight"
    assert describe_rule(rule("weekly", week_start=6)) == "Weekly, from Sunday"
    assert describe_rule(rule("monthly", month_day=1)) == "Monthly (calendar month)"
    assert describe_rule(rule("monthly", month_day=31)) == (
        "Monthly, from the 31st (the last day in shorter months)"
    )
    assert describe_rule(rule("every_n_days", every_n_days=14, anchor=date(2026, 1, 5))) == (
        "Every 14 days, counting from 2026-01-05"
    )
