"""The events log, an event's details, a user's page, and CSV exports of the log.

Every read starts from the gate: the log and its exports through `EventLogFilter`
(over `visible_events`), an event through `visible_events`, a person through
`visible_users`. Anything outside the viewer's scope answers 404. One view serves the
full page and its HTMX fragment; the state (filters, sort, page) lives in the URL.
"""

import json
from datetime import datetime, timedelta
from functools import partial

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, QueryDict
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET
from django.views.decorators.vary import vary_on_headers

from metering.models import UsageEvent

from . import eventlog
from .eventlog import (
    COLUMNS,
    EXPORT_HEADER,
    IO_CHOICES,
    LOG_FILTER_PARAMS,
    POOL_CHOICES,
    EventLogFilter,
    Ordering,
    count_events,
    event_amount,
    export_filename,
    export_rows,
    format_amount,
    format_event_cost,
    log_filter,
    log_page,
    usd_text,
)
from .exports import csv_response
from .filters import FILTER_PARAMS, UsageFilter, session_options
from .queries import side_by_side
from .views import _context, _filter_bar, _widget_view_mode
from .visibility import visible_events, visible_users
from .widgets import WIDGETS, Money

STATE_PARAMS = ("sort", "dir")
USER_WIDGETS = ["metrics", "requests", "tokens", "cost", "top_models"]


# ---------------------------------------------------------------------------------------
# URL state


def _params(data, keep=(*LOG_FILTER_PARAMS, *STATE_PARAMS)) -> QueryDict:
    """The parameters worth keeping in links: known ones, without empty values."""
    params = QueryDict(mutable=True)
    for key in keep:
        values = [v for v in data.getlist(key) if v.strip()]
        if values:
            params.setlist(key, values)
    return params


def _url(path: str, params: QueryDict, **changes) -> str:
    query = params.copy()
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = str(value)
    encoded = query.urlencode()
    return f"{path}?{encoded}" if encoded else path


def _positive_int(raw, default: int = 1) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return default
    return value if value >= 1 else default


def _period_params(request: HttpRequest, flt: UsageFilter, when: datetime) -> QueryDict:
    """The period of the current view if it holds `when`, else a day either side of it,
    so a link from an event always finds that event."""
    period = flt.period
    if period.start <= when < period.end:
        return _params(request.GET, keep=("period", "start", "end"))
    local = when.astimezone(period.tz).replace(tzinfo=None)
    params = QueryDict(mutable=True)
    params["period"] = "custom"
    params["start"] = f"{local - timedelta(days=1):%Y-%m-%dT%H:%M}"
    params["end"] = f"{local + timedelta(days=1):%Y-%m-%dT%H:%M}"
    return params


# ---------------------------------------------------------------------------------------
# The log


def _cost_text(nanos: int, money: Money) -> str:
    return money.format(nanos) if money.unit == "credits" else format_event_cost(nanos)


def _rows(page, io: str, money: Money, params: QueryDict) -> list[dict]:
    detail_query = params.urlencode()
    rows = []
    for event in page.rows:
        detail = reverse("event-detail", args=[event.pk])
        rows.append(
            {
                "event": event,
                "amount": format_amount(event_amount(event, io), event.resource_type),
                "amount_value": event_amount(event, io),
                "cost": _cost_text(event.cost_nanos, money),
                "cost_usd": usd_text(event.cost_nanos),
                "detail_url": f"{detail}?{detail_query}" if detail_query else detail,
                "user_url": (
                    _url(
                        reverse("user-detail", args=[event.user_id]),
                        _params(params, keep=("period", "start", "end")),
                    )
                    if event.user_id
                    else ""
                ),
            }
        )
    return rows


def _headers(path: str, params: QueryDict, ordering: Ordering) -> list[dict]:
    headers = []
    for column in COLUMNS.values():
        active = column.key == ordering.column
        if active:
            direction = "asc" if ordering.descending else "desc"
        else:
            direction = "desc" if column.default_descending else "asc"
        headers.append(
            {
                "key": column.key,
                "label": column.label,
                "numeric": column.numeric,
                "href": _url(path, params, sort=column.key, dir=direction),
                "active": active,
                "aria_sort": (
                    ("descending" if ordering.descending else "ascending") if active else "none"
                ),
            }
        )
    return headers


def _pagination(path: str, params: QueryDict, page, count) -> dict:
    number = page.number
    last = count.pages() if count.exact else None
    window = sorted({1, 2, 3, number - 1, number, number + 1, *((last - 1, last) if last else ())})
    numbers = [n for n in window if n >= 1 and (last is None or n <= last)]
    if last is None:
        numbers = [n for n in numbers if n <= number + 1 or n <= 3]
        if not page.has_next:
            numbers = [n for n in numbers if n <= number]
    links, previous = [], 0
    for n in numbers:
        if n - previous > 1:
            links.append({"gap": True})
        links.append({"number": n, "href": _url(path, params, page=n), "current": n == number})
        previous = n
    if page.has_previous:
        prev_href = (
            _url(path, params, before=page.previous_cursor, page=number - 1)
            if page.previous_cursor
            else _url(path, params)
        )
    else:
        prev_href = ""
    return {
        "links": links,
        "previous": prev_href,
        "next": _url(path, params, after=page.next_cursor, page=number + 1)
        if page.has_next
        else "",
        "number": number,
        "last": last,
        "estimated_pages": None if last else count.pages(),
        "keep": [(k, v) for k, values in params.lists() for v in values],
    }


def _log_context(request: HttpRequest, flt: EventLogFilter) -> dict:
    path = reverse("events")
    params = _params(request.GET)
    ordering = Ordering.parse(params.get("sort"), params.get("dir"), flt.amount_io)
    count, page = log_page(
        flt,
        ordering,
        after=request.GET.get("after"),
        before=request.GET.get("before"),
        page=_positive_int(request.GET.get("page")),
    )
    money = Money.for_org(flt.selected_org())
    return {
        "f": flt,
        "log_params": params.urlencode(),
        "filter_query": _params(request.GET, keep=FILTER_PARAMS).urlencode(),
        "ordering": ordering,
        "headers": _headers(path, params, ordering),
        "rows": _rows(page, ordering.io, money, params),
        "page": page,
        "count": count,
        "pagination": _pagination(path, params, page, count),
        "invalid": flt.is_bound and not flt.is_valid(),
        "export_url": _url(reverse("events-export"), params),
        "export_async": count.value > settings.EXPORT_ASYNC_THRESHOLD,
        "resources": flt.filters["resource"].extra["choices"],
        "pools": POOL_CHOICES,
        "io_choices": IO_CHOICES,
        "chosen_extra": {name: request.GET.get(name, "") for name in eventlog.EXTRA_FILTER_PARAMS},
    }


@login_required
@require_GET
@vary_on_headers("HX-Request")
def events(request: HttpRequest) -> HttpResponse:
    """The events log: full page, or (HTMX) the log alone after a filter/sort/page change."""
    flt = log_filter(request.GET, request.user, request=request)
    if request.htmx and not request.htmx.history_restore_request:
        page = _log_context(request, flt)
        page.update(oob=True, chosen=flt.chosen(), sessions=session_options(flt))
        return render(request, "analytics/events.html#log", page)
    # The full page: the log on this thread and the filter bar's options beside it (on
    # PostgreSQL, on the side thread's own connection: `side_by_side`). The filter's
    # lazily computed state (validation, organization, period, queryset, the viewer's
    # scope) is settled first, so both threads only read it.
    flt.selection(), flt.qs
    page, bar = side_by_side(lambda: _log_context(request, flt), lambda: _filter_bar(request, flt))
    page.update(bar)
    return render(request, "analytics/events.html", page)


# ---------------------------------------------------------------------------------------
# One event


def _event_links(request: HttpRequest, flt: UsageFilter, event: UsageEvent) -> dict:
    around = _period_params(request, flt, event.timestamp)
    log = reverse("events")
    links = {
        "log": _url(log, _params(request.GET)),
        "request_id": _url(log, around, request_id=event.request_id),
        "session": _url(log, around, session=event.session_id) if event.session_id else "",
        "user": "",
        "token_owner": "",
    }
    people = visible_users(request.user)
    wanted = {pk for pk in (event.user_id, getattr(event.api_token, "owner_id", None)) if pk}
    visible = set(people.filter(pk__in=wanted).values_list("pk", flat=True))
    if event.user_id in visible:
        links["user"] = _url(reverse("user-detail", args=[event.user_id]), around)
    owner_id = getattr(event.api_token, "owner_id", None)
    if owner_id in visible:
        links["token_owner"] = _url(reverse("user-detail", args=[owner_id]), around)
    return links


@login_required
@require_GET
@vary_on_headers("HX-Request")
def event_detail(request: HttpRequest, event_id: int) -> HttpResponse:
    """Every field of one event: a panel beside the log (HTMX) or a page of its own."""
    event = get_object_or_404(
        visible_events(request.user).select_related(
            "organization", "user", "team", "project", "api_token__owner"
        ),
        pk=event_id,
    )
    flt = log_filter(request.GET, request.user, request=request)
    io = flt.amount_io
    context = {
        "e": event,
        "amount": format_amount(event_amount(event, io), event.resource_type),
        "cost_usd": usd_text(event.cost_nanos),
        "cost": format_event_cost(event.cost_nanos),
        "metadata": (
            json.dumps(event.metadata, indent=2, sort_keys=True, ensure_ascii=False)
            if event.metadata is not None
            else ""
        ),
        "links": _event_links(request, flt, event),
        "filter_query": _params(request.GET, keep=FILTER_PARAMS).urlencode(),
    }
    if request.htmx and not request.htmx.history_restore_request:
        return render(request, "analytics/event_detail.html#detail", context)
    return render(request, "analytics/event_detail.html", context)


# ---------------------------------------------------------------------------------------
# One person


def _budget_statuses(viewer, person) -> list[dict]:
    """The person's own budgets that the viewer may see (budgets have their own gate)."""
    from metering import budgets

    mine = budgets.visible_budgets(viewer).filter(
        subject=budgets.BudgetSubject.USER, user=person, is_active=True
    )
    rows = []
    for status in budgets.budget_statuses(mine.order_by("organization__name", "id")):
        money = Money.for_org(status.budget.organization)
        rows.append(
            {
                "label": budgets.budget_label(status.budget),
                "organization": status.budget.organization.name,
                "spent": money.format(status.spent_nanos),
                "limit": money.format(status.limit_nanos),
                "remaining": money.format(status.remaining_nanos),
                "share": status.share,
                "bar": min(int(status.share), 100),
                "state": status.state,
                "resets_at": status.resets_at,
                "forecast": status.forecast().text,
            }
        )
    return rows


@login_required
@require_GET
@vary_on_headers("HX-Request")
def user_detail(request: HttpRequest, user_id: int) -> HttpResponse:
    """One person's usage, as far as the viewer may see it (their scope ∩ that person)."""
    person = get_object_or_404(visible_users(request.user), pk=user_id)
    data = request.GET.copy()
    data.setlist("user", [str(person.pk)])
    flt = UsageFilter(data, queryset=visible_events(request.user), request=request)
    ctx = _context(request, flt)
    money = ctx.money if ctx else Money()
    filter_query = _params(data, keep=(*FILTER_PARAMS, "bucket", "split")).urlencode()
    period_query = _params(data, keep=("period", "start", "end"))
    session_rows = []
    if ctx is not None:
        for row in eventlog.sessions_of(flt.qs):
            row["cost"] = money.format(row["cost_nanos"] or 0)
            row["url"] = _url(
                reverse("events"), period_query, user=person.pk, session=row["session_id"]
            )
            session_rows.append(row)
    page = {
        "f": flt,
        "person": person,
        "ctx": ctx,
        "invalid": ctx is None,
        "filter_query": filter_query,
        "widgets": [
            {
                "name": name,
                "data": WIDGETS[name](ctx) if ctx else None,
                "mode": _widget_view_mode(request, name),
            }
            for name in USER_WIDGETS
        ],
        "session_rows": session_rows,
        "budgets": _budget_statuses(request.user, person),
        "events_url": _url(reverse("events"), period_query, user=person.pk),
    }
    if request.htmx and not request.htmx.history_restore_request:
        return render(request, "analytics/user_detail.html#user_page", page)
    bar = _filter_bar(request, flt)
    # The person is fixed by the URL: no user picker here.
    bar["pickers"] = [p for p in bar["pickers"] if p["name"] != "user"]
    page.update(bar)
    return render(request, "analytics/user_detail.html", page)


# ---------------------------------------------------------------------------------------
# CSV export


@login_required
@require_GET
def events_export(request: HttpRequest) -> HttpResponse:
    """The filtered log as CSV: streamed, or (above the threshold) written in the
    background with a progress page."""
    flt = log_filter(request.GET, request.user, request=request)
    params = _params(request.GET)
    ordering = Ordering.parse(params.get("sort"), params.get("dir"), flt.amount_io)
    threshold = settings.EXPORT_ASYNC_THRESHOLD
    count = count_events(flt, cap=threshold)
    if not count.exact:
        from .tasks import export_events

        job = eventlog.export_request(
            user=request.user,
            params=params.urlencode(),
            period=flt.period,
            total=count.value,
            total_exact=count.kind != "at_least",
        )
        transaction.on_commit(partial(export_events.delay, job["id"]))
        return redirect("events-export-status", export_id=job["id"])
    return csv_response(export_filename(), EXPORT_HEADER, export_rows(flt.qs, ordering))


def _own_export(request: HttpRequest, export_id) -> dict:
    job = eventlog.export_status(str(export_id))
    if job is None or job.get("user_id") != request.user.pk:
        raise Http404("No such export.")
    return job


@login_required
@require_GET
def export_status(request: HttpRequest, export_id) -> HttpResponse:
    """Progress of a background export (polled by HTMX every second until done)."""
    job = _own_export(request, export_id)
    total = max(job.get("total") or 0, job.get("done") or 0)
    if job["state"] == "done":
        percent = 100
    elif job.get("total_known") and total:
        percent = min(int(100 * job["done"] / total), 99)
    else:
        percent = None  # an indeterminate bar
    context = {
        "job": job,
        "percent": percent,
        "finished": job["state"] in ("done", "failed"),
        "status_url": reverse("events-export-status", args=[job["id"]]),
        "download_url": reverse("events-export-download", args=[job["id"]]),
        "log_url": _url(reverse("events"), QueryDict(job["params"])),
        "filter_query": _params(QueryDict(job["params"]), keep=FILTER_PARAMS).urlencode(),
    }
    if request.htmx and not request.htmx.history_restore_request:
        return render(request, "analytics/export_progress.html#progress", context)
    return render(request, "analytics/export_progress.html", context)


@login_required
@require_GET
def export_download(request: HttpRequest, export_id) -> FileResponse:
    job = _own_export(request, export_id)
    path = eventlog.export_path(job["id"])
    if job["state"] != "done" or not path.exists():
        raise Http404("This export is not ready.")
    response = FileResponse(
        path.open("rb"), as_attachment=True, filename=job["filename"], content_type="text/csv"
    )
    response["X-Content-Type-Options"] = "nosniff"
    return response
