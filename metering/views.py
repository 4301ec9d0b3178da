"""Pages for budgets, alerts and pools, and their settings.

Reads start from the gates: `visible_budgets` / `visible_alerts` (built on the
visibility gate's `viewer_scope`) for budgets, `administered_orgs` for every settings
page, `_pool_org` for pools. Anything outside them answers 404, never 403. Charts are
Plotly figures built here and handed over through json_script: static/js/app.js draws
them, static/js/spending.js keeps the reset countdowns current (no inline script).
"""

import csv
from datetime import datetime, timedelta
from decimal import Decimal

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.db.models import Q
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST
from django.views.decorators.vary import vary_on_headers

from accounts.models import Membership, Organization, User
from analytics.queries import DAY, HOUR, Bucketing
from analytics.visibility import viewer_scope, visible_organizations

from .budgets import (
    BudgetStatus,
    administered_orgs,
    budget_label,
    budget_save,
    budget_statuses,
    budget_subject_name,
    dashboard_link,
    describe_rule,
    local_midnight,
    manageable_budgets,
    period_at,
    spend_per_day,
    subject_spend,
    visible_alerts,
    visible_budgets,
    webhook_rotate_secret,
    webhook_save,
    zone_of,
)
from .forms import AlertWebhookForm, BudgetForm, PoolAllocationForm, PoolForm
from .models import (
    AlertWebhook,
    BudgetSubject,
    Pool,
    PoolAllocation,
    ResourceType,
    nanos_to_usd,
)
from .pools import (
    consumption_series,
    pool_bases_total,
    pool_top_users,
    surplus_series,
    user_pool_status,
)

STATE_COLORS = {"ok": "#1a7f37", "warning": "#9a6700", "over": "#cf222e"}
REMAINING_COLOR = "rgba(127,127,127,0.22)"


def _partial(request) -> bool:
    return bool(request.htmx) and not request.htmx.history_restore_request


# ---------------------------------------------------------------------------------------
# Money and time for people


def money(nanos: int, org: Organization) -> str:
    """Nanos in the organization's display unit: "$12.34" or "1,234.00 credits"."""
    usd = nanos_to_usd(nanos)
    if org.display_unit == "credits":
        return f"{usd * org.credits_per_usd:,.2f} credits"
    sign = "-" if usd < 0 else ""
    return f"{sign}${abs(usd):,.2f}"


def when(moment: datetime, org: Organization) -> str:
    """A moment in the organization's zone, with the zone named."""
    local = moment.astimezone(zone_of(org))
    return f"{local:%a %-d %b %Y, %H:%M} ({zone_of(org).key})"


def countdown_text(delta: timedelta) -> str:
    seconds = max(int(delta.total_seconds()), 0)
    parts = [
        (seconds // 86400, "day"),
        (seconds % 86400 // 3600, "hour"),
        (seconds % 3600 // 60, "minute"),
    ]
    return " ".join(f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in parts)


def _fl(value: Decimal) -> float:
    # Floats only for drawing; every sum above is exact.
    return float(value)


def ring_figure(status: BudgetStatus) -> dict:
    used = min(status.spent_nanos, status.limit_nanos)
    left = max(status.limit_nanos - status.spent_nanos, 0)
    org = status.budget.organization
    return {
        "data": [
            {
                "type": "pie",
                "values": [_fl(nanos_to_usd(used)), _fl(nanos_to_usd(left))],
                "labels": ["Spent", "Remaining"],
                "customdata": [money(status.spent_nanos, org), money(left, org)],
                "hole": 0.72,
                "sort": False,
                "direction": "clockwise",
                "textinfo": "none",
                "hovertemplate": "%{label}: %{customdata}<extra></extra>",
                "marker": {"colors": [STATE_COLORS[status.state], REMAINING_COLOR]},
            }
        ],
        "layout": {
            "showlegend": False,
            "height": 220,
            "width": 220,
            "margin": {"t": 10, "b": 10, "l": 10, "r": 10},
            "paper_bgcolor": "rgba(0,0,0,0)",
            "annotations": [
                {
                    "text": f"{status.share}%",
                    "showarrow": False,
                    "font": {"size": 26},
                    "x": 0.5,
                    "y": 0.5,
                }
            ],
        },
    }


def daily_figure(days: list[tuple], org: Organization) -> dict:
    x = [d.isoformat() for d, _ in days]
    figure = {
        "data": [
            {
                "type": "bar",
                "x": x,
                "y": [_fl(nanos_to_usd(n)) for _, n in days],
                "customdata": [money(n, org) for _, n in days],
                "hovertemplate": "%{x}: %{customdata}<extra></extra>",
                "marker": {"color": "#2f6feb"},
                "name": "Spend",
            }
        ],
        "layout": {
            "height": 260,
            "margin": {"t": 10, "b": 40, "l": 50, "r": 10},
            "paper_bgcolor": "rgba(0,0,0,0)",
            "plot_bgcolor": "rgba(0,0,0,0)",
            "xaxis": {"type": "date", "tickformat": "%-d %b"},
            "yaxis": {"title": {"text": "USD"}, "rangemode": "tozero"},
            "bargap": 0.2,
        },
    }
    return figure


def status_card(status: BudgetStatus, *, with_days: bool = False) -> dict:
    """Everything a page shows about one budget's current period, formatted."""
    budget, org = status.budget, status.budget.organization
    forecast = status.forecast()
    card = {
        "status": status,
        "budget": budget,
        "label": budget_label(budget),
        "subject_name": budget_subject_name(budget),
        "rule": describe_rule(budget),
        "spent": money(status.spent_nanos, org),
        "limit": money(status.limit_nanos, org),
        "remaining": money(status.remaining_nanos, org),
        "over_by": money(status.spent_nanos - status.limit_nanos, org)
        if status.spent_nanos > status.limit_nanos
        else "",
        "share": status.share,
        "state": status.state,
        "period_start": when(status.period.start, org),
        "resets_at": when(status.period.end, org),
        "resets_epoch": status.period.end_epoch,
        "countdown": countdown_text(status.time_to_reset),
        "forecast": forecast.text
        if forecast.runs_out_at is None
        else f"Runs out on {when(forecast.runs_out_at, org)} at this rate.",
        "forecast_rate": money(forecast.rate_nanos_per_day, org),
        "changed_in_period": status.changed_in_period,
        "changed_at": when(budget.changed_at, org) if budget.changed_at else "",
        "ring": ring_figure(status),
        "ring_id": f"ring-{budget.id}",
        "dashboard_url": dashboard_link(status),
    }
    if with_days:
        days = spend_per_day(budget, status.period)
        card["days"] = [(d, money(n, org)) for d, n in days]
        card["daily"] = daily_figure(days, org)
        card["daily_id"] = f"daily-{budget.id}"
    return card


# ---------------------------------------------------------------------------------------
# Personal spending


def _applies_to(user) -> Q:
    """Budgets that count the user's calls: their own, their tokens', their teams' and
    projects' (by membership) and their organizations'. Shown only where visible."""
    memberships = Membership.objects.filter(user=user)
    return (
        Q(subject=BudgetSubject.USER, user=user)
        | Q(subject=BudgetSubject.TOKEN, api_token__owner=user)
        | Q(subject=BudgetSubject.TEAM, team__in=memberships.exclude(team=None).values("team"))
        | Q(
            subject=BudgetSubject.PROJECT,
            project__in=memberships.exclude(project=None).values("project"),
        )
        | Q(
            subject=BudgetSubject.ORGANIZATION,
            organization__in=memberships.values("organization"),
        )
    )


def _month_spend(user, now) -> list[dict]:
    """Without a budget: the person's own spend this calendar month, per organization."""
    out = []
    orgs = Organization.objects.filter(memberships__user=user).distinct().order_by("name")
    for org in orgs:
        tz = zone_of(org)
        start = local_midnight(now.astimezone(tz).date().replace(day=1), tz)
        end = now + timedelta(minutes=15)  # the current bucket included
        spent = subject_spend(org.id, BudgetSubject.USER, user.id, start, end)
        out.append({"org": org, "spent": money(spent, org), "since": when(start, org)})
    return out


@login_required
def spending(request):
    """What I spent this budget period, how much is left, when it resets."""
    now = timezone.now()
    budgets = visible_budgets(request.user).filter(_applies_to(request.user), is_active=True)
    statuses = budget_statuses(budgets.order_by("organization__name", "id"), now)
    own = [
        status_card(s, with_days=True) for s in statuses if s.budget.subject == BudgetSubject.USER
    ]
    others = [status_card(s) for s in statuses if s.budget.subject != BudgetSubject.USER]
    month_spend = [] if own else _month_spend(request.user, now)
    return render(
        request,
        "metering/spending.html",
        {"own": own, "others": others, "month_spend": month_spend, "now": now},
    )


# ---------------------------------------------------------------------------------------
# Budgets overview, detail, alerts

SORTS = {
    "name": lambda c: c["label"].lower(),
    "org": lambda c: c["budget"].organization.name.lower(),
    "subject": lambda c: (c["budget"].subject, c["subject_name"].lower()),
    "period": lambda c: c["budget"].period,
    "spent": lambda c: c["status"].spent_nanos,
    "limit": lambda c: c["status"].limit_nanos,
    "share": lambda c: c["status"].share,
    "state": lambda c: ("ok", "warning", "over").index(c["state"]),
    "resets": lambda c: c["status"].period.end,
}


def _overview_rows(statuses) -> list[dict]:
    rows = []
    for status in statuses:
        org = status.budget.organization
        rows.append(
            {
                "status": status,
                "budget": status.budget,
                "label": budget_label(status.budget),
                "subject_name": budget_subject_name(status.budget),
                "rule": describe_rule(status.budget),
                "spent": money(status.spent_nanos, org),
                "limit": money(status.limit_nanos, org),
                "share": status.share,
                "state": status.state,
                "resets_at": when(status.period.end, org),
                "dashboard_url": dashboard_link(status),
            }
        )
    return rows


COLUMNS = [
    ("name", "Budget", False),
    ("org", "Organization", False),
    ("subject", "For", False),
    ("period", "Period", False),
    ("spent", "Spent", True),
    ("limit", "Amount", True),
    ("share", "Used", True),
    ("state", "State", False),
    ("resets", "Resets", False),
]


def _sort_columns(sort: str) -> list[dict]:
    """Header links: a click sorts by the column (numbers largest first), a second
    click reverses."""
    out = []
    for key, label, numeric in COLUMNS:
        if sort == key:
            direction, following = "ascending", f"-{key}"
        elif sort == f"-{key}":
            direction, following = "descending", key
        else:
            direction, following = "", f"-{key}" if numeric else key
        out.append(
            {"key": key, "label": label, "num": numeric, "dir": direction, "next": following}
        )
    return out


@login_required
@vary_on_headers("HX-Request")
def budget_list(request):
    """Every budget the viewer may see, with spend against the amount; sortable and
    filterable, the state in the URL."""
    qs = visible_budgets(request.user)
    q = request.GET.get("q", "").strip()
    if q:
        qs = qs.filter(
            Q(name__icontains=q)
            | Q(user__email__icontains=q)
            | Q(team__name__icontains=q)
            | Q(project__name__icontains=q)
            | Q(api_token__name__icontains=q)
            | Q(organization__name__icontains=q)
        )
    subject = request.GET.get("subject", "")
    if subject in BudgetSubject.values:
        qs = qs.filter(subject=subject)
    orgs = (
        visible_organizations(request.user)
        .filter(budgets__in=visible_budgets(request.user))
        .distinct()
    )
    org = request.GET.get("org", "")
    if org.isdigit():
        qs = qs.filter(organization_id=int(org))
    active = request.GET.get("active", "yes")
    if active == "yes":
        qs = qs.filter(is_active=True)
    rows = _overview_rows(budget_statuses(qs))
    state = request.GET.get("state", "")
    if state in ("ok", "warning", "over"):
        rows = [r for r in rows if r["state"] == state]
    sort = request.GET.get("sort", "-share")
    key = SORTS.get(sort.lstrip("-"))
    if key is None:
        sort, key = "-share", SORTS["share"]
    rows.sort(key=key, reverse=sort.startswith("-"))
    context = {
        "rows": rows,
        "sort": sort,
        "filters": {"q": q, "subject": subject, "org": org, "state": state, "active": active},
        "orgs": orgs,
        "subjects": BudgetSubject.choices,
        "can_manage": administered_orgs(request.user).exists(),
        "columns": _sort_columns(sort),
    }
    template = "metering/budgets.html" + ("#budget-table" if _partial(request) else "")
    return render(request, template, context)


@login_required
def budget_detail(request, pk: int):
    budget = get_object_or_404(visible_budgets(request.user), pk=pk)
    status = budget_statuses([budget])[0]
    card = status_card(status, with_days=True)
    if request.GET.get("format") == "csv":
        return _days_csv(card, budget)
    alerts = visible_alerts(request.user).filter(budget=budget).order_by("-created_at")[:100]
    return render(
        request,
        "metering/budget_detail.html",
        {
            "card": card,
            "alerts": [_alert_row(a) for a in alerts],
            "can_edit": manageable_budgets(request.user).filter(pk=pk).exists(),
        },
    )


def _days_csv(card: dict, budget) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="budget-{budget.id}-per-day.csv"'
    writer = csv.writer(response)
    writer.writerow(["date", "spend_usd"])
    for day, cost in spend_per_day(budget, card["status"].period):
        writer.writerow([day.isoformat(), str(nanos_to_usd(cost))])
    return response


def _alert_row(alert) -> dict:
    org = alert.budget.organization
    return {
        "alert": alert,
        "label": budget_label(alert.budget),
        "created": when(alert.created_at, org),
        "period": f"{when(alert.period_start, org)} to {when(alert.period_end, org)}",
        "spent": money(alert.spent_nanos, org),
        "limit": money(alert.limit_nanos, org),
    }


@login_required
def alert_list(request):
    """Alert history of every budget the viewer may see."""
    alerts = (
        visible_alerts(request.user)
        .select_related(
            "budget__organization",
            "budget__user",
            "budget__team",
            "budget__project",
            "budget__api_token",
        )
        .order_by("-created_at", "-id")[:200]
    )
    return render(request, "metering/alerts.html", {"alerts": [_alert_row(a) for a in alerts]})


# ---------------------------------------------------------------------------------------
# Settings: budgets and webhooks (org admins)


def _admin_orgs_or_404(user):
    orgs = administered_orgs(user)
    if not orgs.exists():
        raise Http404
    return orgs


@login_required
def budget_settings(request):
    orgs = _admin_orgs_or_404(request.user)
    budgets = manageable_budgets(request.user).order_by("organization__name", "subject", "id")
    webhooks = AlertWebhook.objects.filter(organization__in=orgs).select_related("organization")
    return render(
        request,
        "metering/settings_budgets.html",
        {
            "budgets": [
                {
                    "budget": b,
                    "label": budget_label(b),
                    "rule": describe_rule(b),
                    "amount": f"${b.amount_usd:,.2f}",
                }
                for b in budgets
            ],
            "webhooks": webhooks,
        },
    )


@login_required
def budget_edit(request, pk: int | None = None):
    orgs = _admin_orgs_or_404(request.user)
    budget = get_object_or_404(manageable_budgets(request.user), pk=pk) if pk else None
    form = BudgetForm(request.POST or None, instance=budget, orgs=orgs)
    if request.method == "POST" and form.is_valid():
        saved = budget_save(budget=form.instance, by=request.user)
        if budget is None:
            messages.success(request, f"Budget {budget_label(saved)} created.")
        else:
            messages.success(
                request,
                f"Budget {budget_label(saved)} saved. The current period and the next reset are "
                "recomputed from the new settings; spend already made in the period stays counted.",
            )
        return redirect("metering:budget-detail", saved.pk)
    return render(request, "metering/budget_form.html", {"form": form, "budget": budget})


@login_required
@require_POST
def budget_delete(request, pk: int):
    _admin_orgs_or_404(request.user)
    budget = get_object_or_404(manageable_budgets(request.user), pk=pk)
    label = budget_label(budget)
    budget.delete()
    messages.success(request, f"Budget {label} deleted (its alert history with it).")
    return redirect("metering:settings-budgets")


def _webhooks_of(user):
    return AlertWebhook.objects.filter(organization__in=administered_orgs(user))


@login_required
def webhook_edit(request, pk: int | None = None):
    orgs = _admin_orgs_or_404(request.user)
    webhook = get_object_or_404(_webhooks_of(request.user), pk=pk) if pk else None
    form = AlertWebhookForm(request.POST or None, instance=webhook, orgs=orgs)
    if request.method == "POST" and form.is_valid():
        saved = webhook_save(webhook=form.instance)
        messages.success(request, "Webhook saved.")
        return redirect("metering:webhook-edit", saved.pk)
    return render(request, "metering/webhook_form.html", {"form": form, "webhook": webhook})


@login_required
@require_POST
def webhook_rotate(request, pk: int):
    _admin_orgs_or_404(request.user)
    webhook = get_object_or_404(_webhooks_of(request.user), pk=pk)
    webhook_rotate_secret(webhook=webhook)
    messages.success(request, "New signing secret created; update your receiver.")
    return redirect("metering:webhook-edit", webhook.pk)


@login_required
@require_POST
def webhook_delete(request, pk: int):
    _admin_orgs_or_404(request.user)
    get_object_or_404(_webhooks_of(request.user), pk=pk).delete()
    messages.success(request, "Webhook deleted.")
    return redirect("metering:settings-budgets")


# ---------------------------------------------------------------------------------------
# Settings: pools (org admins)


def _pools_of(user):
    return Pool.objects.filter(organization__in=administered_orgs(user)).select_related(
        "organization"
    )


@login_required
def pool_settings(request):
    _admin_orgs_or_404(request.user)
    pools = []
    for pool in _pools_of(request.user).order_by("organization__name", "resource_type"):
        bases = pool_bases_total(pool)
        pools.append(
            {
                "pool": pool,
                "rule": describe_rule(pool),
                "bases": bases,
                "surplus": pool.limit - bases,
            }
        )
    return render(request, "metering/settings_pools.html", {"pools": pools})


@login_required
def pool_edit(request, pk: int | None = None):
    orgs = _admin_orgs_or_404(request.user)
    pool = get_object_or_404(_pools_of(request.user), pk=pk) if pk else None
    form = PoolForm(request.POST or None, instance=pool, orgs=orgs, prefix="pool")
    allocation_form = PoolAllocationForm(pool=pool, prefix="alloc") if pool else None
    if request.method == "POST" and "pool-organization" in request.POST and form.is_valid():
        with transaction.atomic():
            saved = form.save(commit=False)
            if pool is not None and any(
                getattr(pool, f) != getattr(saved, f)
                for f in (
                    "period",
                    "week_start",
                    "month_day",
                    "every_n_days",
                    "anchor",
                    "limit",
                    "base_allocation",
                )
            ):
                saved.changed_at = timezone.now()
            saved.save()
        messages.success(
            request, "Pool saved. Events from now on are categorised by these settings."
        )
        return redirect("metering:pool-edit", saved.pk)
    if pool is not None and request.method == "POST" and "alloc-user" in request.POST:
        form = PoolForm(instance=pool, orgs=orgs, prefix="pool")
        allocation_form = PoolAllocationForm(request.POST, pool=pool, prefix="alloc")
        if allocation_form.is_valid():
            allocation = allocation_form.save(commit=False)
            allocation.pool = pool
            allocation.organization_id = pool.organization_id
            allocation.save()
            messages.success(
                request,
                f"Base allocation of {allocation.user.email} set to {allocation.base_allocation:,}.",
            )
            return redirect("metering:pool-edit", pool.pk)
    context = {"form": form, "pool": pool, "allocation_form": allocation_form}
    if pool is not None:
        context["allocations"] = pool.allocations.select_related("user").order_by("user__email")
        context["bases"] = pool_bases_total(pool)
    return render(request, "metering/pool_form.html", context)


@login_required
@require_POST
def pool_delete(request, pk: int):
    _admin_orgs_or_404(request.user)
    get_object_or_404(_pools_of(request.user), pk=pk).delete()
    messages.success(request, "Pool deleted; new events are no longer categorised.")
    return redirect("metering:settings-pools")


@login_required
@require_POST
def allocation_delete(request, pk: int):
    _admin_orgs_or_404(request.user)
    allocation = get_object_or_404(
        PoolAllocation.objects.filter(pool__in=_pools_of(request.user)), pk=pk
    )
    pool_id = allocation.pool_id
    allocation.delete()
    messages.success(request, "Override removed; the pool's default base applies.")
    return redirect("metering:pool-edit", pool_id)


# ---------------------------------------------------------------------------------------
# Pools page


def _pool_orgs(user):
    """Organizations whose pools the viewer may open: those they belong to (platform
    admins: all). Only those seen whole (org admins) show organization-wide numbers."""
    scope = viewer_scope(user)
    if scope.everything:
        return Organization.objects.all()
    return Organization.objects.filter(id__in=scope.member_org_ids | scope.org_ids)


def _pool_org(request):
    orgs = _pool_orgs(request.user)
    raw = request.GET.get("org", "")
    if raw:
        if not raw.isdigit():
            raise Http404
        return get_object_or_404(orgs, pk=int(raw))
    admin = (
        administered_orgs(request.user).filter(id__in=orgs.values("id")).order_by("name").first()
    )
    org = admin or orgs.order_by("name").first()
    if org is None:
        raise Http404
    return org


def _date_param(request, name: str, default):
    raw = request.GET.get(name, "")
    try:
        return datetime.strptime(raw, "%Y-%m-%d").date() if raw else default
    except ValueError:
        return default


def _range(request, tz):
    today = timezone.now().astimezone(tz).date()
    start = _date_param(request, "start", today - timedelta(days=6))
    end = _date_param(request, "end", today)
    if end < start:
        start, end = end, start
    end = min(end, start + timedelta(days=366))
    return start, end, local_midnight(start, tz), local_midnight(end + timedelta(days=1), tz)


def _series_figure(
    keys, series: dict[str, list], *, kind: str, unit: str, tz, colors: dict
) -> dict:
    x = [datetime.fromtimestamp(k, tz).strftime("%Y-%m-%d %H:%M") for k in keys]
    data = []
    for name, values in series.items():
        trace = {
            "x": x,
            "y": values,
            "name": name.replace("_", " ").capitalize(),
            "hovertemplate": f"%{{x}}: %{{y:,}} {unit}<extra>%{{fullData.name}}</extra>",
        }
        if kind == "bar":
            trace.update(type="bar", marker={"color": colors.get(name)})
        else:
            trace.update(
                type="scatter",
                mode="lines",
                line={"color": colors.get(name), "shape": "hv"},
            )
        data.append(trace)
    return {
        "data": data,
        "layout": {
            "height": 300,
            "barmode": "stack",
            "margin": {"t": 10, "b": 40, "l": 70, "r": 10},
            "paper_bgcolor": "rgba(0,0,0,0)",
            "plot_bgcolor": "rgba(0,0,0,0)",
            "legend": {"orientation": "h"},
            "yaxis": {"title": {"text": unit}},
        },
    }


UNITS = {"tokens": "tokens", "storage": "bytes", "ocr": "pages"}
POOL_COLORS = {
    "allocated": "#2f6feb",
    "surplus": "#d29922",
    "unpooled": "#8c959f",
    "surplus_remaining": "#1a7f37",
}


def _pool_context(request, org: Organization, user_id: int | None) -> dict:
    tz = zone_of(org)
    resource = request.GET.get("resource", ResourceType.TOKENS)
    if resource not in ResourceType.values:
        resource = ResourceType.TOKENS
    start_date, end_date, start, end = _range(request, tz)
    width = HOUR if end - start <= timedelta(days=14) else DAY
    bucketing = Bucketing(width, tz)
    now = timezone.now()
    pool = (
        Pool.objects.filter(organization=org, resource_type=resource)
        .select_related("organization")
        .first()
    )
    consumption = consumption_series(
        organization_id=org.id,
        resource_type=resource,
        start=start,
        end=end,
        bucketing=bucketing,
        user_id=user_id,
    )
    if pool is None:
        del consumption.values["allocated"], consumption.values["surplus"]
    elif not any(consumption.values["unpooled"]):
        del consumption.values["unpooled"]
    unit = UNITS[resource]
    context = {
        "org": org,
        "pool": pool,
        "resource": resource,
        "resources": ResourceType.choices,
        "start": start_date.isoformat(),
        "end": end_date.isoformat(),
        "tz": tz.key,
        "unit": unit,
        "consumption": _series_figure(
            consumption.keys, consumption.values, kind="bar", unit=unit, tz=tz, colors=POOL_COLORS
        ),
        "consumption_rows": _rows(consumption.keys, consumption.values, tz),
        "consumption_names": list(consumption.values),
        "consumption_id": "fig-consumption",
    }
    if pool is not None:
        context["rule"] = describe_rule(pool)
        context["period"] = period_at(pool, tz, now)
        if user_id is None:
            surplus = surplus_series(pool=pool, start=start, end=end, bucketing=bucketing, now=now)
            bases = pool_bases_total(pool)
            context.update(
                surplus=_series_figure(
                    surplus.keys, surplus.values, kind="line", unit=unit, tz=tz, colors=POOL_COLORS
                ),
                surplus_rows=_rows(surplus.keys, surplus.values, tz),
                bases=bases,
                surplus_total=pool.limit - bases,
                top_users=_top_users(pool, now),
            )
        else:
            context["mine"] = user_pool_status(pool, user_id, now)
    return context


def _rows(keys, values: dict, tz) -> list[tuple]:
    names = list(values)
    return [
        (datetime.fromtimestamp(k, tz).strftime("%Y-%m-%d %H:%M"), [values[n][i] for n in names])
        for i, k in enumerate(keys)
    ]


def _top_users(pool, now) -> list[dict]:
    rows = pool_top_users(pool, now)
    emails = dict(
        User.objects.filter(id__in=[r["user_id"] for r in rows]).values_list("id", "email")
    )
    for row in rows:
        row["email"] = emails.get(row["user_id"], "(no user)")
    return rows


@login_required
@vary_on_headers("HX-Request")
def pools(request):
    """Surplus fluctuation and consumption over time for one organization's pool.

    Org admins (and platform admins) see the whole organization; everyone else sees
    their own consumption and allocation only."""
    org = _pool_org(request)
    whole = viewer_scope(request.user).covers_whole_orgs({org.id})
    context = _pool_context(request, org, None if whole else request.user.id)
    context.update(whole=whole, orgs=_pool_orgs(request.user).order_by("name"))
    if request.GET.get("format") == "csv":
        return _series_csv(
            context,
            "surplus_rows"
            if request.GET.get("chart") == "surplus" and whole
            else "consumption_rows",
        )
    template = "metering/pools.html" + ("#pool-charts" if _partial(request) else "")
    return render(request, template, context)


def _series_csv(context: dict, rows_key: str) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    name = "surplus" if rows_key == "surplus_rows" else "consumption"
    response["Content-Disposition"] = (
        f'attachment; filename="pool-{context["resource"]}-{name}.csv"'
    )
    writer = csv.writer(response)
    names = ["surplus_remaining"] if rows_key == "surplus_rows" else context["consumption_names"]
    writer.writerow([f"bucket_start ({context['tz']})", *names])
    for label, values in context.get(rows_key, []):
        writer.writerow([label, *values])
    return response


@login_required
def user_pools(request, user_id: int):
    """One user's pool consumption: a partial for the user page (self or org admins)."""
    org = _pool_org(request)
    scope = viewer_scope(request.user)
    if not (scope.covers_whole_orgs({org.id}) or request.user.id == user_id):
        raise Http404
    if not Membership.objects.filter(organization=org, user_id=user_id).exists():
        raise Http404
    subject = get_object_or_404(User, pk=user_id)
    context = _pool_context(request, org, user_id)
    context.update(subject=subject, whole=False, consumption_id=f"fig-user-consumption-{user_id}")
    return render(request, "metering/user_pools.html", context)
