"""Budgets: periods, spend, forecasts, who may see a budget, and spend alerts.

Periods. A budget (or pool) splits time into periods by its rule (daily, weekly from a
start weekday, monthly from a day of the month, every N days from an anchor date), in
its organization's time zone. Every period starts at a local midnight, so its bounds
fall on 15-minute marks of UTC in every zone in use, DST changes included.

Spend. Ingestion adds each event's cost to BudgetSpend15m rows of its organization,
user, team, project and token (`budget_spend_record`, in the ingest transaction). A
budget's spend in a period is the sum of its subject's rows in the period's buckets:
exact, independent of the budget's rule, so a budget changed mid-period counts what was
already spent in its new period, and old periods never leak into a new one.

Alerts. Each threshold of a budget alerts at most once per period: a BudgetAlert row
per (budget, period start, threshold) is inserted if absent, and only the transaction
that inserted it schedules the delivery. Ingestion only schedules a check (on commit,
never waiting on or failing because of the broker); `budgets_sweep`, run by Celery beat,
finds anything a lost message missed. Delivery is by email to the subject's owners and
the organization's admins, and to the organization's webhooks (JSON, HMAC-signed).
"""

import calendar
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time as time_module
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from urllib.parse import urlencode, urlparse
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q, QuerySet, Sum
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from accounts.models import ApiToken, Organization, Role, User
from analytics.visibility import Scope, viewer_scope

from .models import (
    BUCKET_SECONDS,
    AlertState,
    AlertWebhook,
    Budget,
    BudgetAlert,
    BudgetSpend15m,
    BudgetSubject,
    PeriodKind,
    PeriodRule,
    ScopeUsage15m,
    nanos_to_usd,
)

log = logging.getLogger(__name__)

DAY = timedelta(days=1)
FORECAST_WINDOW = timedelta(days=7)
WARNING_SHARE = 80  # percent: "warning" when no threshold below 100 % says otherwise
WEEKDAYS = list(calendar.day_name)

# ---------------------------------------------------------------------------------------
# Periods


@dataclass(frozen=True)
class Period:
    """[start, end) in UTC; both are local midnights of the rule's time zone."""

    start: datetime
    end: datetime

    @property
    def start_epoch(self) -> int:
        return int(self.start.timestamp())

    @property
    def end_epoch(self) -> int:
        return int(self.end.timestamp())

    def contains(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


def zone_of(organization: Organization) -> ZoneInfo:
    return ZoneInfo(organization.timezone or "UTC")


def local_midnight(day: date, tz: ZoneInfo) -> datetime:
    """The first instant of local `day`, in UTC.

    Where clocks skip midnight (a DST change at 00:00), fold=0 maps the missing 00:00
    to the instant of the change, which is the day's first instant.
    """
    return datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)


def _month_day(year: int, month: int, day: int) -> date:
    """Day `day` of the month, or its last day when the month is shorter."""
    return date(year, month, min(day, calendar.monthrange(year, month)[1]))


def _shift_month(year: int, month: int, by: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + by
    return index // 12, index % 12 + 1


def period_start_date(rule: PeriodRule, day: date) -> date:
    """The local date on which the period containing local `day` starts."""
    if rule.period == PeriodKind.DAILY:
        return day
    if rule.period == PeriodKind.WEEKLY:
        return day - timedelta(days=(day.weekday() - rule.week_start) % 7)
    if rule.period == PeriodKind.MONTHLY:
        this_month = _month_day(day.year, day.month, rule.month_day)
        if day >= this_month:
            return this_month
        year, month = _shift_month(day.year, day.month, -1)
        return _month_day(year, month, rule.month_day)
    if rule.period == PeriodKind.EVERY_N_DAYS:
        n, anchor = _every_n(rule)
        return anchor + timedelta(days=((day - anchor).days // n) * n)
    raise ValueError(f"Unknown period kind {rule.period!r}")


def period_end_date(rule: PeriodRule, start: date) -> date:
    """The local date on which the period starting on `start` ends (exclusive)."""
    if rule.period == PeriodKind.DAILY:
        return start + DAY
    if rule.period == PeriodKind.WEEKLY:
        return start + timedelta(days=7)
    if rule.period == PeriodKind.MONTHLY:
        year, month = _shift_month(start.year, start.month, 1)
        return _month_day(year, month, rule.month_day)
    if rule.period == PeriodKind.EVERY_N_DAYS:
        return start + timedelta(days=_every_n(rule)[0])
    raise ValueError(f"Unknown period kind {rule.period!r}")


def _every_n(rule: PeriodRule) -> tuple[int, date]:
    # A rule saved through the forms always has both; be total anyway.
    return max(rule.every_n_days or 1, 1), rule.anchor or date(2000, 1, 3)


def period_at(rule: PeriodRule, tz: ZoneInfo, moment: datetime) -> Period:
    """The period of `rule` (in zone `tz`) that contains `moment`."""
    start = period_start_date(rule, moment.astimezone(tz).date())
    end = period_end_date(rule, start)
    return Period(local_midnight(start, tz), local_midnight(end, tz))


def period_dates(period: Period, tz: ZoneInfo) -> list[date]:
    """The local days of `period`, in order."""
    first = period.start.astimezone(tz).date()
    last = (period.end - timedelta(seconds=1)).astimezone(tz).date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def describe_rule(rule: PeriodRule) -> str:
    """The rule in words, e.g. "Monthly, from the 31st (the last day in shorter months)"."""
    if rule.period == PeriodKind.DAILY:
        return "Daily, from midnight"
    if rule.period == PeriodKind.WEEKLY:
        return f"Weekly, from {WEEKDAYS[rule.week_start]}"
    if rule.period == PeriodKind.MONTHLY:
        if rule.month_day == 1:
            return "Monthly (calendar month)"
        note = " (the last day in shorter months)" if rule.month_day > 28 else ""
        return f"Monthly, from the {_ordinal(rule.month_day)}{note}"
    n, anchor = _every_n(rule)
    return f"Every {n} day{'s' if n != 1 else ''}, counting from {anchor.isoformat()}"


# ---------------------------------------------------------------------------------------
# Spend counters


def bucket_of(moment: datetime) -> int:
    epoch = int(moment.timestamp())
    return epoch - epoch % BUCKET_SECONDS


def event_subjects(organization_id: int, token_id: int | None, event) -> Iterable[tuple]:
    """The (subject, id) counter keys one event counts in."""
    yield BudgetSubject.ORGANIZATION.value, organization_id
    if event.user_id:
        yield BudgetSubject.USER.value, event.user_id
    if event.team_id:
        yield BudgetSubject.TEAM.value, event.team_id
    if event.project_id:
        yield BudgetSubject.PROJECT.value, event.project_id
    if token_id:
        yield BudgetSubject.TOKEN.value, token_id


def budget_spend_record(*, organization_id: int, token_id: int | None, events) -> None:
    """Add freshly inserted events' cost to the spend counters (inside the ingest
    transaction). Rows are upserted in key order, like the roll-ups, so concurrent
    batches lock them in the same order."""
    rows: dict[tuple, int] = defaultdict(int)
    org = organization_id
    for event in events:
        cost = event.cost_nanos
        if not cost:
            continue
        # Inlined event_subjects(): this loop runs for every ingested event.
        epoch = int(event.timestamp.timestamp())
        bucket = epoch - epoch % BUCKET_SECONDS
        rows[(org, "org", org, bucket)] += cost
        if event.user_id:
            rows[(org, "user", event.user_id, bucket)] += cost
        if event.team_id:
            rows[(org, "team", event.team_id, bucket)] += cost
        if event.project_id:
            rows[(org, "project", event.project_id, bucket)] += cost
        if token_id:
            rows[(org, "token", token_id, bucket)] += cost
    if rows:
        _spend_upsert([(*key, cost) for key, cost in sorted(rows.items())])


def _spend_upsert(rows: list[tuple]) -> None:
    table = connection.ops.quote_name(BudgetSpend15m._meta.db_table)
    with connection.cursor() as cursor:
        for start in range(0, len(rows), 1000):
            chunk = rows[start : start + 1000]
            cursor.execute(
                f"INSERT INTO {table} (organization_id, subject, subject_id, bucket, cost_nanos) "
                f"VALUES {', '.join(['(%s, %s, %s, %s, %s)'] * len(chunk))} "
                "ON CONFLICT (organization_id, subject, subject_id, bucket) "
                f"DO UPDATE SET cost_nanos = {table}.cost_nanos + EXCLUDED.cost_nanos",
                [value for row in chunk for value in row],
            )


_ROLLUP_COLUMNS = {
    BudgetSubject.USER.value: "user_id",
    BudgetSubject.TEAM.value: "team_id",
    BudgetSubject.PROJECT.value: "project_id",
    BudgetSubject.TOKEN.value: "api_token_id",
}


@transaction.atomic
def budget_spend_rebuild(
    *, organization_id: int, start: int | None = None, end: int | None = None
) -> int:
    """Recompute an organization's spend counters from the wide roll-up (only buckets in
    [start, end) when given).

    For code that rewrites event costs (repricing) or a check after a migration; the
    ingest path keeps the counters right without it. Returns the rows written.
    """
    window = {}
    if start is not None:
        window["bucket__gte"] = start
    if end is not None:
        window["bucket__lt"] = end
    BudgetSpend15m.objects.filter(organization_id=organization_id, **window).delete()
    source = ScopeUsage15m.objects.filter(
        organization_id=organization_id, cost_nanos__gt=0, **window
    )
    rows = [
        (organization_id, BudgetSubject.ORGANIZATION.value, organization_id, r["bucket"], r["c"])
        for r in source.values("bucket").annotate(c=Sum("cost_nanos")).order_by("bucket")
    ]
    for subject, column in _ROLLUP_COLUMNS.items():
        grouped = (
            source.exclude(**{column: 0})
            .values(column, "bucket")
            .annotate(c=Sum("cost_nanos"))
            .order_by(column, "bucket")
        )
        rows += [(organization_id, subject, r[column], r["bucket"], r["c"]) for r in grouped]
    if rows:
        _spend_upsert(rows)
    return len(rows)


def subject_spend(
    organization_id: int, subject: str, subject_id: int, start: datetime, end: datetime
) -> int:
    """Cost in nanos of one subject in [start, end) (both on 15-minute marks)."""
    total = BudgetSpend15m.objects.filter(
        organization_id=organization_id,
        subject=subject,
        subject_id=subject_id,
        bucket__gte=bucket_of(start),
        bucket__lt=int(end.timestamp()),
    ).aggregate(total=Sum("cost_nanos"))["total"]
    return int(total or 0)


def budgets_spend(budgets: list[Budget], now: datetime) -> dict[int, tuple[Period, int]]:
    """{budget id: (current period, spend in it)}.

    One statement for up to 100 budgets: a UNION ALL of one SUM per budget, each over
    its own subject's contiguous range of the counter's primary key, so each branch is a
    tight index range scan (an OR of the ranges, or FILTERed sums, made the planner scan
    far more rows).
    """
    items = [(b, period_at(b, zone_of(b.organization), now)) for b in budgets]
    out: dict[int, tuple[Period, int]] = {b.id: (p, 0) for b, p in items}
    table = connection.ops.quote_name(BudgetSpend15m._meta.db_table)
    branch = (
        f"SELECT %s, SUM(cost_nanos) FROM {table} WHERE organization_id = %s "
        "AND subject = %s AND subject_id = %s AND bucket >= %s AND bucket < %s"
    )
    with connection.cursor() as cursor:
        for start in range(0, len(items), SPEND_QUERY_CHUNK):
            chunk = items[start : start + SPEND_QUERY_CHUNK]
            params = []
            for index, (budget, period) in enumerate(chunk):
                params += [
                    start + index,
                    budget.organization_id,
                    budget.subject,
                    budget.subject_id,
                    period.start_epoch,
                    period.end_epoch,
                ]
            cursor.execute(" UNION ALL ".join([branch] * len(chunk)), params)
            for index, total in cursor.fetchall():
                budget, period = items[index]
                out[budget.id] = (period, int(total or 0))
    return out


# Branches per statement: SQLite allows at most 500 terms in a compound SELECT.
SPEND_QUERY_CHUNK = 100


def spend_per_day(budget: Budget, period: Period) -> list[tuple[date, int]]:
    """[(local date, spend in nanos)] for every day of `period`, zero days included."""
    tz = zone_of(budget.organization)
    days = {day: 0 for day in period_dates(period, tz)}
    rows = BudgetSpend15m.objects.filter(
        organization_id=budget.organization_id,
        subject=budget.subject,
        subject_id=budget.subject_id,
        bucket__gte=period.start_epoch,
        bucket__lt=period.end_epoch,
    ).values_list("bucket", "cost_nanos")
    for bucket, cost in rows:
        day = datetime.fromtimestamp(bucket, tz).date()
        days[day] = days.get(day, 0) + cost
    return sorted(days.items())


# ---------------------------------------------------------------------------------------
# Status and forecast


@dataclass(frozen=True)
class Forecast:
    """When the budget runs out at the recent rate, if it does before the reset."""

    runs_out_at: datetime | None  # None: not at this rate (or already used up)
    used_up: bool
    rate_nanos_per_day: int
    window: timedelta

    @property
    def text(self) -> str:
        if self.used_up:
            return "The budget is used up for this period."
        if self.runs_out_at is None:
            return "Does not run out at this rate."
        return (
            f"Runs out on {timezone.localtime(self.runs_out_at):%a %-d %b %Y, %H:%M} at this rate."
        )


@dataclass(frozen=True)
class BudgetStatus:
    budget: Budget
    period: Period
    spent_nanos: int
    now: datetime

    @property
    def limit_nanos(self) -> int:
        return self.budget.limit_nanos

    @property
    def remaining_nanos(self) -> int:
        return max(self.limit_nanos - self.spent_nanos, 0)

    @property
    def share(self) -> Decimal:
        """Percent of the amount spent (may exceed 100)."""
        if not self.limit_nanos:
            return Decimal(0)
        return (Decimal(self.spent_nanos) * 100 / Decimal(self.limit_nanos)).quantize(
            Decimal("0.1")
        )

    @property
    def state(self) -> str:
        """ok / warning / over."""
        if self.spent_nanos >= self.limit_nanos:
            return "over"
        below = [t for t in self.budget.thresholds if t < 100]
        warning_at = max(below) if below else WARNING_SHARE
        if self.spent_nanos * 100 >= warning_at * self.limit_nanos:
            return "warning"
        return "ok"

    @property
    def resets_at(self) -> datetime:
        return self.period.end

    @property
    def time_to_reset(self) -> timedelta:
        return max(self.period.end - self.now, timedelta(0))

    @property
    def countdown(self) -> dict:
        seconds = int(self.time_to_reset.total_seconds())
        return {
            "days": seconds // 86400,
            "hours": seconds % 86400 // 3600,
            "minutes": seconds % 3600 // 60,
        }

    @property
    def changed_in_period(self) -> bool:
        """The budget was changed during its current period (the page explains it)."""
        return self.budget.changed_at is not None and self.budget.changed_at >= self.period.start

    @property
    def spent_usd(self) -> Decimal:
        return nanos_to_usd(self.spent_nanos)

    @property
    def remaining_usd(self) -> Decimal:
        return nanos_to_usd(self.remaining_nanos)

    @property
    def limit_usd(self) -> Decimal:
        return nanos_to_usd(self.limit_nanos)

    def forecast(self) -> Forecast:
        return budget_forecast(self)


def budget_statuses(budgets: Iterable[Budget], now: datetime | None = None) -> list[BudgetStatus]:
    now = now or timezone.now()
    budgets = list(budgets)
    spend = budgets_spend(budgets, now)
    return [
        BudgetStatus(budget=b, period=spend[b.id][0], spent_nanos=spend[b.id][1], now=now)
        for b in budgets
    ]


def budget_forecast(status: BudgetStatus) -> Forecast:
    """Extrapolate the spend of the last min(period length, 7 days) to the reset."""
    budget, period, now = status.budget, status.period, status.now
    window = min(period.end - period.start, FORECAST_WINDOW)
    window_start = now - window
    recent = subject_spend(
        budget.organization_id, budget.subject, budget.subject_id, window_start, period.end
    )
    seconds = int(window.total_seconds())
    rate_per_day = recent * 86400 // seconds if seconds else 0
    if status.spent_nanos >= status.limit_nanos:
        return Forecast(None, True, rate_per_day, window)
    if recent <= 0:
        return Forecast(None, False, 0, window)
    # Integer arithmetic: remaining / (recent / window), in seconds.
    runs_out = now + timedelta(seconds=status.remaining_nanos * seconds / recent)
    if runs_out >= period.end:
        return Forecast(None, False, rate_per_day, window)
    return Forecast(runs_out, False, rate_per_day, window)


# ---------------------------------------------------------------------------------------
# Who may see and change budgets


def budgets_visible_q(scope: Scope) -> Q:
    """Budgets a viewer with `scope` may see: a budget shows spend of its subject, so it
    is visible only to someone who may see all of that subject's events."""
    if scope.everything:
        return Q()
    q = Q(pk__in=[])
    if scope.org_ids:
        q |= Q(organization_id__in=scope.org_ids)
    if scope.team_ids:
        q |= Q(subject=BudgetSubject.TEAM, team_id__in=scope.team_ids)
    if scope.project_ids:
        q |= Q(subject=BudgetSubject.PROJECT, project_id__in=scope.project_ids)
    if scope.user_id:
        q |= Q(subject=BudgetSubject.USER, user_id=scope.user_id)
    if scope.token_ids:
        q |= Q(subject=BudgetSubject.TOKEN, api_token_id__in=scope.token_ids)
    return q


def visible_budgets(user) -> QuerySet[Budget]:
    """The only authority on which budgets `user` may read (built on viewer_scope)."""
    return Budget.objects.filter(budgets_visible_q(viewer_scope(user))).select_related(
        "organization", "user", "team", "project", "api_token"
    )


def visible_alerts(user) -> QuerySet[BudgetAlert]:
    return BudgetAlert.objects.filter(budget__in=visible_budgets(user).values("pk"))


def administered_orgs(user) -> QuerySet[Organization]:
    """Organizations whose budgets, webhooks and pools `user` may change."""
    scope = viewer_scope(user)
    if scope.everything:
        return Organization.objects.all()
    return Organization.objects.filter(id__in=scope.org_ids)


def manageable_budgets(user) -> QuerySet[Budget]:
    return Budget.objects.filter(organization__in=administered_orgs(user)).select_related(
        "organization", "user", "team", "project", "api_token"
    )


def budget_subject_name(budget: Budget) -> str:
    if budget.subject == BudgetSubject.ORGANIZATION:
        return budget.organization.name
    if budget.subject == BudgetSubject.USER:
        return budget.user.email
    if budget.subject == BudgetSubject.TEAM:
        return budget.team.name
    if budget.subject == BudgetSubject.PROJECT:
        return budget.project.name
    return budget.api_token.name


def budget_label(budget: Budget) -> str:
    return budget.name or f"{budget.get_subject_display()}: {budget_subject_name(budget)}"


def dashboard_link(status: BudgetStatus) -> str:
    """The dashboard filtered to the budget's subject and current period.

    Parameters: org, team, project, user, token (ids), start and end (ISO 8601 with
    the UTC offset of the organization's zone).
    """
    budget = status.budget
    tz = zone_of(budget.organization)
    params = {"org": budget.organization_id}
    column = {
        BudgetSubject.TEAM: "team",
        BudgetSubject.PROJECT: "project",
        BudgetSubject.USER: "user",
        BudgetSubject.TOKEN: "token",
    }.get(budget.subject)
    if column:
        params[column] = budget.subject_id
    params["start"] = status.period.start.astimezone(tz).isoformat()
    params["end"] = status.period.end.astimezone(tz).isoformat()
    try:
        base = reverse("dashboard")
    except NoReverseMatch:
        base = "/"
    return f"{base}?{urlencode(params)}"


# ---------------------------------------------------------------------------------------
# Changing budgets and webhooks


RULE_FIELDS = ("period", "week_start", "month_day", "every_n_days", "anchor")


def budget_save(*, budget: Budget, by: User | None = None) -> Budget:
    """Create or update a budget. A change of amount or period rule stamps changed_at
    (the pages then say that spend already in the new period stays counted) and checks
    the thresholds at once, since a lower amount may already be crossed."""
    with transaction.atomic():
        if budget.pk is None:
            budget.created_by = by
            budget.save()
        else:
            before = Budget.objects.select_for_update().get(pk=budget.pk)
            changed = any(
                getattr(before, f) != getattr(budget, f) for f in (*RULE_FIELDS, "amount_usd")
            )
            if changed:
                budget.changed_at = timezone.now()
            budget.save()
        budget_id = budget.pk
        transaction.on_commit(lambda: enqueue_budget_check(budget_id))
    return budget


def webhook_new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def webhook_save(*, webhook: AlertWebhook) -> AlertWebhook:
    if not webhook.secret:
        webhook.secret = webhook_new_secret()
    webhook.save()
    return webhook


def webhook_rotate_secret(*, webhook: AlertWebhook) -> AlertWebhook:
    webhook.secret = webhook_new_secret()
    webhook.save(update_fields=["secret"])
    return webhook


# ---------------------------------------------------------------------------------------
# Alerts: detection


def _reached(spent_nanos: int, limit_nanos: int, threshold: int) -> bool:
    return spent_nanos * 100 >= threshold * limit_nanos


def budgets_after_ingest(
    *, organization: Organization, token_id: int | None, events, spend_counted: bool = False
) -> None:
    """Ingestion's budget work, inside its transaction: count the spend (unless the
    insert already did, `spend_counted`), and if this batch took a budget across one of
    its thresholds, check that budget once the batch has committed (a Celery task; a
    broker outage only delays it to the next sweep)."""
    if not spend_counted:
        budget_spend_record(organization_id=organization.id, token_id=token_id, events=events)
    priced = [e for e in events if e.cost_nanos]
    if not priced:
        return
    budgets = list(Budget.objects.filter(organization=organization, is_active=True))
    if not budgets:
        return
    for budget in budgets:
        budget.organization = organization
    now = timezone.now()
    contributions = _batch_contributions(budgets, organization, token_id, priced, now)
    touched = [b for b in budgets if contributions.get(b.id)]
    if not touched:
        return
    for budget_id, (_, spent) in budgets_spend(touched, now).items():
        budget = next(b for b in touched if b.id == budget_id)
        before = spent - contributions[budget_id]
        if any(
            _reached(spent, budget.limit_nanos, t) and not _reached(before, budget.limit_nanos, t)
            for t in budget.thresholds
        ):
            transaction.on_commit(lambda bid=budget_id: enqueue_budget_check(bid))


def _batch_contributions(budgets, organization, token_id, events, now) -> dict[int, int]:
    """{budget id: cost of this batch's events in the budget's current period}."""
    tz = zone_of(organization)
    by_subject = defaultdict(list)
    for budget in budgets:
        by_subject[(budget.subject, budget.subject_id)].append((budget, period_at(budget, tz, now)))
    out: dict[int, int] = defaultdict(int)
    for event in events:
        for key in event_subjects(organization.id, token_id, event):
            for budget, period in by_subject.get(key, ()):
                if period.contains(event.timestamp):
                    out[budget.id] += event.cost_nanos
    return out


def budget_alerts_evaluate(
    *, budget: Budget, now: datetime | None = None, deliver: bool = True
) -> list[BudgetAlert]:
    """Insert an alert for every threshold the current period has reached and that has
    none yet; return the new ones. Delivery of each is scheduled after commit (or,
    with deliver=False, the alert is recorded as not sent: the demo data uses this)."""
    now = now or timezone.now()
    status = budget_statuses([budget], now)[0]
    created = []
    existing = set(
        BudgetAlert.objects.filter(
            organization_id=budget.organization_id,
            budget=budget,
            period_start=status.period.start,
        ).values_list("threshold", flat=True)
    )
    for threshold in sorted(set(budget.thresholds)):
        if threshold in existing or not _reached(status.spent_nanos, status.limit_nanos, threshold):
            continue
        try:
            with transaction.atomic():
                alert = BudgetAlert.objects.create(
                    organization_id=budget.organization_id,
                    budget=budget,
                    period_start=status.period.start,
                    period_end=status.period.end,
                    threshold=threshold,
                    spent_nanos=status.spent_nanos,
                    limit_nanos=status.limit_nanos,
                    state=AlertState.PENDING if deliver else AlertState.SKIPPED,
                )
        except IntegrityError:
            continue  # another transaction recorded this crossing first: it delivers
        created.append(alert)
        if deliver:
            transaction.on_commit(lambda aid=alert.id: enqueue_alert_delivery(aid))
    return created


@dataclass
class SweepResult:
    checked: int = 0
    created: int = 0
    resent: int = 0


def budgets_sweep(*, now: datetime | None = None) -> SweepResult:
    """Record every reached threshold that has no alert yet, and re-send alerts whose
    delivery never finished (lost to a broker outage or a crashed worker)."""
    now = now or timezone.now()
    result = SweepResult()
    budgets = list(Budget.objects.filter(is_active=True).select_related("organization"))
    for status in budget_statuses(budgets, now):
        result.checked += 1
        thresholds = status.budget.thresholds
        if thresholds and _reached(status.spent_nanos, status.limit_nanos, min(thresholds)):
            with transaction.atomic():
                result.created += len(budget_alerts_evaluate(budget=status.budget, now=now))
    stale = BudgetAlert.objects.filter(
        state=AlertState.PENDING, created_at__lt=now - timedelta(seconds=30)
    ).filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now))
    for alert_id in stale.values_list("id", flat=True):
        enqueue_alert_delivery(alert_id)
        result.resent += 1
    return result


# ---------------------------------------------------------------------------------------
# Alerts: delivery


class AlertDeliveryError(Exception):
    """A channel failed; the task retries, and channels already done are not repeated."""


CLAIM_SECONDS = 120


def alert_retry_delay(attempts: int) -> int:
    """Seconds before retry number `attempts` (1, 2, ...): BUDGET_ALERT_RETRY_SECONDS
    (30 s) doubling each time, at most 30 minutes."""
    return min(settings.BUDGET_ALERT_RETRY_SECONDS * 2 ** max(attempts - 1, 0), 1800)


def alert_recipients(budget: Budget) -> list[str]:
    """The subject's owners (the user, the token's owner, the team's leads, the
    project's admins) and the organization's admins; active people only."""
    org = budget.organization_id
    q = Q(memberships__organization_id=org, memberships__role=Role.ORG_ADMIN)
    if budget.subject == BudgetSubject.USER:
        q |= Q(pk=budget.user_id)
    elif budget.subject == BudgetSubject.TOKEN:
        q |= Q(pk=ApiToken.objects.filter(pk=budget.api_token_id).values("owner_id"))
    elif budget.subject == BudgetSubject.TEAM:
        q |= Q(
            memberships__organization_id=org,
            memberships__role=Role.TEAM_LEAD,
            memberships__team_id=budget.team_id,
        )
    elif budget.subject == BudgetSubject.PROJECT:
        q |= Q(
            memberships__organization_id=org,
            memberships__role=Role.PROJECT_ADMIN,
            memberships__project_id=budget.project_id,
        )
    return sorted(set(User.objects.filter(q, is_active=True).values_list("email", flat=True)))


def _site_url(path: str) -> str:
    return settings.SITE_URL.rstrip("/") + path


def alert_payload(alert: BudgetAlert) -> dict:
    budget = alert.budget
    return {
        "type": "budget.threshold_reached",
        "id": f"alert_{alert.id}",
        "created_at": alert.created_at.astimezone(UTC).isoformat(),
        "organization": {"id": budget.organization_id, "slug": budget.organization.slug},
        "budget": {
            "id": budget.id,
            "name": budget_label(budget),
            "scope": {
                "type": budget.subject,
                "id": budget.subject_id,
                "name": budget_subject_name(budget),
            },
            "limit_usd": f"{nanos_to_usd(alert.limit_nanos):f}",
            "period": budget.period,
            "url": _site_url(reverse("metering:budget-detail", args=[budget.id])),
        },
        "threshold_percent": alert.threshold,
        "spent_usd": f"{nanos_to_usd(alert.spent_nanos):f}",
        "period_start": alert.period_start.astimezone(UTC).isoformat(),
        "resets_at": alert.period_end.astimezone(UTC).isoformat(),
    }


def webhook_signature(secret: str, timestamp: int | str, body: bytes) -> str:
    """`sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" keyed by the secret>`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def webhook_verify(
    secret: str,
    *,
    signature: str,
    timestamp: str,
    body: bytes,
    tolerance: int = 300,
    now: float | None = None,
) -> bool:
    """What a receiver does: recompute the signature, compare in constant time, and
    refuse stale timestamps (replays)."""
    try:
        age = abs((now if now is not None else time_module.time()) - int(timestamp))
    except (TypeError, ValueError):
        return False
    if age > tolerance:
        return False
    return hmac.compare_digest(webhook_signature(secret, timestamp, body), signature)


def _check_destination(url: str) -> None:
    """Refuse webhooks to private, loopback and link-local addresses (SSRF) unless
    BUDGET_WEBHOOK_ALLOW_PRIVATE is on (development and tests)."""
    parsed = urlparse(url)
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise AlertDeliveryError(f"webhook URL {url!r} is not http(s)")
    if settings.BUDGET_WEBHOOK_ALLOW_PRIVATE:
        return
    if parsed.scheme != "https":
        raise AlertDeliveryError("webhooks must use https")
    for info in socket.getaddrinfo(parsed.hostname, parsed.port or 443):
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise AlertDeliveryError(f"webhook host {parsed.hostname} is not a public address")


def webhook_post(webhook: AlertWebhook, payload: dict) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    stamp = str(int(time_module.time()))
    _check_destination(webhook.url)
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        webhook.url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "llm-usage-dashboard/1 (budget alerts)",
            "X-Usage-Event": payload["type"],
            "X-Usage-Delivery": payload["id"],
            "X-Usage-Timestamp": stamp,
            "X-Usage-Signature": webhook_signature(webhook.secret, stamp, body),
        },
    )
    try:
        with urllib.request.urlopen(  # noqa: S310
            request, timeout=settings.BUDGET_WEBHOOK_TIMEOUT
        ) as response:
            if not 200 <= response.status < 300:
                raise AlertDeliveryError(f"webhook {webhook.url} answered {response.status}")
    except urllib.error.HTTPError as exc:
        raise AlertDeliveryError(f"webhook {webhook.url} answered {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise AlertDeliveryError(f"webhook {webhook.url} failed: {exc}") from exc


def _alert_email(alert: BudgetAlert) -> tuple[str, str]:
    budget = alert.budget
    tz = zone_of(budget.organization)
    label = budget_label(budget)
    spent, limit = nanos_to_usd(alert.spent_nanos), nanos_to_usd(alert.limit_nanos)
    subject = f"Budget {label} reached {alert.threshold} % (${spent:.2f} of ${limit:.2f})"
    body = "\n".join(
        [
            f"The budget {label} in {budget.organization.name} reached {alert.threshold} % "
            f"of its amount in the current period.",
            "",
            f"Spent:   ${spent:.2f} of ${limit:.2f}",
            f"Period:  {alert.period_start.astimezone(tz):%a %-d %b %Y %H:%M} to "
            f"{alert.period_end.astimezone(tz):%a %-d %b %Y %H:%M} ({tz.key})",
            f"Resets:  {alert.period_end.astimezone(tz):%a %-d %b %Y, %H:%M} ({tz.key})",
            "",
            _site_url(reverse("metering:budget-detail", args=[budget.id])),
        ]
    )
    return subject, body


def alert_deliver(*, alert_id: int, retry: bool = False, now: datetime | None = None) -> str:
    """Send one alert by email and to every active webhook of its organization.

    A delivery first claims the alert (a conditional UPDATE), so two workers never send
    it at the same time; each channel is marked done as soon as it succeeds, so a retry
    repeats only what failed. Raises AlertDeliveryError when a channel failed.
    Returns what happened: "sent", "not ours" (claimed elsewhere or already sent).
    """
    now = now or timezone.now()
    claim = BudgetAlert.objects.filter(pk=alert_id, state=AlertState.PENDING)
    if not retry:
        claim = claim.filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now))
    if not claim.update(
        claimed_until=now + timedelta(seconds=CLAIM_SECONDS), attempts=F("attempts") + 1
    ):
        return "not ours"
    alert = BudgetAlert.objects.select_related(
        "budget__organization",
        "budget__user",
        "budget__team",
        "budget__project",
        "budget__api_token",
    ).get(pk=alert_id)
    errors = []
    if alert.email_sent_at is None:
        recipients = alert_recipients(alert.budget)
        try:
            if recipients:
                subject, body = _alert_email(alert)
                send_mail(subject, body, None, recipients)
            BudgetAlert.objects.filter(pk=alert_id).update(
                email_sent_at=timezone.now(), email_recipients=recipients
            )
        except Exception as exc:  # any mail backend error: retry later
            errors.append(f"email: {exc}")
    done = set(alert.webhooks_done)
    payload = None
    hooks = AlertWebhook.objects.filter(organization_id=alert.organization_id, is_active=True)
    for hook in hooks.exclude(id__in=done):
        payload = payload or alert_payload(alert)
        try:
            webhook_post(hook, payload)
        except AlertDeliveryError as exc:
            errors.append(str(exc))
            continue
        done.add(hook.id)
        BudgetAlert.objects.filter(pk=alert_id).update(webhooks_done=sorted(done))
    if errors:
        failed = alert.attempts >= settings.BUDGET_ALERT_MAX_ATTEMPTS
        BudgetAlert.objects.filter(pk=alert_id).update(
            last_error="; ".join(errors)[:2000],
            state=AlertState.FAILED if failed else AlertState.PENDING,
            # Keep the sweep away until the task's own retry is due.
            claimed_until=None
            if failed
            else now + timedelta(seconds=alert_retry_delay(alert.attempts) + 60),
        )
        raise AlertDeliveryError("; ".join(errors))
    BudgetAlert.objects.filter(pk=alert_id).update(
        state=AlertState.SENT, delivered_at=timezone.now(), claimed_until=None, last_error=""
    )
    return "sent"


# ---------------------------------------------------------------------------------------
# Enqueueing: never let the broker fail or slow the caller


def enqueue_safely(task, *args, **options) -> bool:
    """Send `task` (with apply_async `options`) without retrying the broker connection;
    log and return False when the broker is unreachable (the beat sweep picks the work
    up later). With CELERY_TASK_ALWAYS_EAGER the task runs here, and its failure is
    logged too."""
    try:
        task.apply_async(args=args, retry=False, **options)
    except Exception:
        log.warning(
            "could not run or enqueue %s%r; the sweep will retry", task.name, args, exc_info=True
        )
        return False
    return True


def enqueue_budget_check(budget_id: int) -> bool:
    from .tasks import budget_check

    return enqueue_safely(budget_check, budget_id)


def enqueue_alert_delivery(alert_id: int) -> bool:
    from .tasks import alert_deliver as alert_deliver_task

    return enqueue_safely(alert_deliver_task, alert_id)


# ---------------------------------------------------------------------------------------
# Budgets that apply to a call (the check API and the personal page)


@dataclass(frozen=True)
class CallSubjects:
    """Who a model call would be counted against."""

    organization_id: int
    user_id: int | None = None
    team_ids: tuple[int, ...] = ()
    project_ids: tuple[int, ...] = ()
    token_id: int | None = None

    def q(self) -> Q:
        q = Q(subject=BudgetSubject.ORGANIZATION)
        if self.user_id:
            q |= Q(subject=BudgetSubject.USER, user_id=self.user_id)
        if self.team_ids:
            q |= Q(subject=BudgetSubject.TEAM, team_id__in=self.team_ids)
        if self.project_ids:
            q |= Q(subject=BudgetSubject.PROJECT, project_id__in=self.project_ids)
        if self.token_id:
            q |= Q(subject=BudgetSubject.TOKEN, api_token_id=self.token_id)
        return Q(organization_id=self.organization_id, is_active=True) & q
