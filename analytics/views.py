"""Dashboard pages and their HTMX partials. Every read starts from the visibility gate
(through UsageFilter and Selection); permission decisions are made here, not in
templates."""

from zoneinfo import ZoneInfo

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET
from django.views.decorators.vary import vary_on_headers

from accounts.middleware import viewer_timezone_name

from .exports import csv_response
from .filters import (
    FILTER_PARAMS,
    PRESETS,
    STATUS_CHOICES,
    UsageFilter,
    search_q,
    session_options,
    token_label,
)
from .queries import WIDTHS, models_seen, shared_reads, side_by_side
from .visibility import viewer_scope, visible_events, visible_organizations
from .widgets import WIDGETS, Context, Money, WidgetData

WIDGET_ORDER = [
    "metrics",
    "requests",
    "tokens",
    "cost",
    "latency",
    "models",
    "top_users",
    "top_models",
    "ranked",
]
# The full page's widgets in two groups read side by side: the metrics bar and the series
# charts, which share their per-bucket totals (`shared_reads`), and the rest.
SERIES_WIDGETS = ("metrics", "requests", "tokens", "cost")
OTHER_WIDGETS = tuple(name for name in WIDGET_ORDER if name not in SERIES_WIDGETS)
PICKERS = [
    ("team", "Team"),
    ("project", "Project"),
    ("user", "User"),
    ("model", "Model"),
    ("token", "API token"),
]


def _filter(request: HttpRequest) -> UsageFilter:
    return UsageFilter(request.GET, queryset=visible_events(request.user), request=request)


def _context(request: HttpRequest, flt: UsageFilter) -> Context | None:
    sel = flt.selection()
    if sel is None:
        return None
    tz = ZoneInfo(viewer_timezone_name(request.user))
    return Context(
        sel=sel,
        tz=tz,
        money=Money.for_org(flt.selected_org()),
        describe=flt.describe(),
        bucket_param=request.GET.get("bucket", "auto"),
        split=request.GET.get("split", "io"),
    )


def _filter_query(request: HttpRequest) -> str:
    """Only the global filter parameters, for links to other pages and widget URLs."""
    params = request.GET.copy()
    for key in list(params):
        if key not in FILTER_PARAMS and key not in ("bucket", "split"):
            del params[key]
    return params.urlencode()


DEFAULT_MODES = {"ranked": "table"}


def _widget_view_mode(request: HttpRequest, name: str) -> str:
    mode = request.GET.get(f"{name}_view") or DEFAULT_MODES.get(name, "chart")
    return mode if mode in ("chart", "table") else "chart"


def _render_widget(ctx: Context | None, name: str) -> WidgetData | None:
    return WIDGETS[name](ctx) if ctx is not None else None


@login_required
@require_GET
@vary_on_headers("HX-Request")
def dashboard(request: HttpRequest) -> HttpResponse:
    flt = _filter(request)
    partial = request.htmx and not request.htmx.history_restore_request
    ctx = _context(request, flt)
    page = {
        "f": flt,
        "ctx": ctx,
        "filter_query": _filter_query(request),
        "widget_names": WIDGET_ORDER,
        "invalid": ctx is None,
    }
    if partial:
        # Filter change: swap the widgets; each loads on its own (with a loading state).
        page["lazy"] = True
        page["sessions"] = session_options(flt) if ctx else []
        return render(request, "analytics/dashboard.html#widgets", page)
    page.update(_filter_bar(request, flt))
    with shared_reads():
        # The widgets that share per-bucket totals on this thread, the others beside them
        # (on PostgreSQL, on the side thread's own connection: `side_by_side`).
        here, beside = side_by_side(
            lambda: {name: _render_widget(ctx, name) for name in SERIES_WIDGETS},
            lambda: {name: _render_widget(ctx, name) for name in OTHER_WIDGETS},
        )
        data = here | beside
        page["widgets"] = [
            {"name": name, "data": data[name], "mode": _widget_view_mode(request, name)}
            for name in WIDGET_ORDER
        ]
    return render(request, "analytics/dashboard.html", page)


def _filter_bar(request: HttpRequest, flt: UsageFilter) -> dict:
    chosen = flt.chosen()
    scope = viewer_scope(request.user)
    orgs = list(visible_organizations(request.user).order_by("name")[:200])
    pickers = []
    for name, label in PICKERS:
        selected = chosen.get(name) or []
        # "Me" is its own choice in the user picker, not a second entry for oneself.
        me_selected = int(name == "user" and request.user in selected)
        shown = [v for v in selected if not (me_selected and v == request.user)]
        pickers.append(
            {
                "name": name,
                "label": label,
                "me_selected": me_selected,
                "selected": [_option(name, v) for v in shown],
                "options": _options(request, flt, name, "", exclude=selected)[:20],
            }
        )
    return {
        "presets": [(k, v[0]) for k, v in PRESETS.items()],
        "period": flt.period,
        "orgs": orgs,
        "show_org": scope.everything or len(orgs) > 1,
        "all_orgs_allowed": scope.everything,
        "pickers": pickers,
        "operations": flt.filters["operation"].extra["choices"],
        "statuses": STATUS_CHOICES,
        "chosen": chosen,
        "sessions": session_options(flt),
        "bucket_choices": [("auto", "Auto"), *((k, k) for k in WIDTHS)],
    }


def _option(kind: str, value) -> dict:
    if kind == "model":
        return {"value": value, "label": value}
    if kind == "token":
        return {"value": value.pk, "label": token_label(value)}
    if kind == "user":
        return {"value": value.pk, "label": f"{value.display_name} <{value.email}>"}
    return {"value": value.pk, "label": f"{value.name} ({value.organization.slug})"}


def _options(
    request: HttpRequest, flt: UsageFilter, kind: str, term: str, exclude=()
) -> list[dict]:
    """Option list for a picker: only what the viewer may see, matching `term`."""
    if kind == "model":
        sel = flt.selection()
        models = sorted(models_seen(sel)) if sel else []
        excluded = set(exclude)
        return [
            {"value": m, "label": m}
            for m in models
            if term.lower() in m.lower() and m not in excluded
        ][:50]
    queryset = flt.filters[kind].queryset(request)
    if term:
        queryset = queryset.filter(search_q(kind, term))
    if exclude:
        queryset = queryset.exclude(pk__in=[v.pk for v in exclude])
    org = flt.selected_org()
    if org is not None and kind != "user":
        queryset = queryset.filter(organization=org)
    order = "email" if kind == "user" else "name"
    return [_option(kind, obj) for obj in queryset.order_by(order)[:50]]


@login_required
@require_GET
def filter_options(request: HttpRequest, kind: str) -> HttpResponse:
    """Type-ahead partial for a picker (HTMX)."""
    if kind not in dict(PICKERS):
        raise Http404
    flt = _filter(request)
    term = request.GET.get("q", "").strip()[:100]
    chosen = flt.chosen().get(kind) or []
    options = _options(request, flt, kind, term, exclude=chosen)
    return render(
        request, "analytics/dashboard.html#picker_options", {"name": kind, "options": options}
    )


@login_required
@require_GET
def widget(request: HttpRequest, name: str) -> HttpResponse:
    """One widget as a partial, or its numbers as CSV (?format=csv)."""
    if name not in WIDGETS:
        raise Http404
    flt = _filter(request)
    ctx = _context(request, flt)
    with shared_reads():  # a widget asks some questions twice (the viewer's rows, totals)
        data = _render_widget(ctx, name)
    if request.GET.get("format") == "csv":
        if data is None:
            raise Http404
        return csv_response(
            f"{name}.csv",
            [c.label for c in data.columns],
            ([row.get(c.export_key) for c in data.columns] for row in data.rows),
        )
    return render(
        request,
        "analytics/dashboard.html#widget",
        {
            "w": {"name": name, "data": data, "mode": _widget_view_mode(request, name)},
            "filter_query": _filter_query(request),
            "invalid": ctx is None,
        },
    )
