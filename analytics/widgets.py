"""Dashboard widgets: each turns a Selection into table rows and a Plotly figure.

A widget's rows are the numbers its chart draws, so the chart/table switch and the CSV
download always agree. Each widget runs one grouped query (plus the raw edges the
query engine adds), never one per row.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from django.urls import reverse

from accounts.models import ApiToken, Organization, User
from metering.models import COMPLETION_OPERATIONS, NANOS_PER_USD, Operation

from . import charts
from .queries import (
    DAY,
    HOUR,
    MINUTE,
    WIDTHS,
    Bucketing,
    Selection,
    Totals,
    auto_width,
    distinct_counts,
    grouped_totals,
    latency_percentiles,
    latency_series_groups,
    models_seen,
    side_by_side,
    top,
)

EMBEDDING_OPERATIONS = (Operation.EMBEDDING,)


@dataclass(frozen=True)
class Money:
    """How money is shown: US dollars, or credits at the organization's rate."""

    unit: str = "usd"
    rate: Decimal = Decimal(1)

    @classmethod
    def for_org(cls, org: Organization | None) -> "Money":
        if org is not None and org.display_unit == "credits":
            return cls("credits", org.credits_per_usd)
        return cls()

    def amount(self, nanos: int) -> Decimal:
        usd = Decimal(nanos) / NANOS_PER_USD
        return usd * self.rate if self.unit == "credits" else usd

    def format(self, nanos: int) -> str:
        value = self.amount(nanos)
        if self.unit == "credits":
            return f"{value:,.0f} credits" if abs(value) >= 100 else f"{value:,.2f} credits"
        if value == 0:
            return "$0.00"
        if abs(value) < Decimal("0.01"):
            return f"${value:.4f}"
        return f"${value:,.2f}"

    @property
    def label(self) -> str:
        return "credits" if self.unit == "credits" else "USD"


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    kind: str = "text"  # text | int | money | ms | pct | time | link
    csv_key: str = ""  # the exact value for CSV when `key` holds a formatted one

    @property
    def export_key(self) -> str:
        return self.csv_key or self.key


@dataclass
class WidgetData:
    name: str
    title: str
    columns: list[Column]
    rows: list[dict]
    figure: dict | None = None
    empty_message: str = ""
    note: str = ""
    controls: dict = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.rows or all(not r.get("has_data", True) for r in self.rows)


@dataclass
class Context:
    sel: Selection
    tz: ZoneInfo
    money: Money
    describe: str
    bucket_param: str = "auto"
    split: str = "io"
    ranked_kind: str = ""

    @property
    def bucketing(self) -> Bucketing:
        width = WIDTHS.get(self.bucket_param) or auto_width(self.sel.start, self.sel.end)
        # Never more than ~1,500 points: a 90-day range in minutes is refused politely.
        span = (self.sel.end - self.sel.start).total_seconds()
        while span / width > 1500 and width < DAY:
            width = HOUR if width == MINUTE else DAY
        return Bucketing(width, self.tz)


def _x(keys: list[int], tz: ZoneInfo) -> list[str]:
    return [datetime.fromtimestamp(k, tz).strftime("%Y-%m-%d %H:%M") for k in keys]


def _time_rows(ctx: Context, dims: tuple[str, ...] = ()) -> tuple[list[int], dict]:
    b = ctx.bucketing
    keys = b.keys(int(ctx.sel.start.timestamp()), int(ctx.sel.end.timestamp()))
    grouped = grouped_totals(ctx.sel, dims, b)
    return keys, grouped.rows


def _empty(ctx: Context, what: str = "requests") -> str:
    return f"No {what}{(' ' + ctx.describe) if ctx.describe else ''}."


# ---------------------------------------------------------------------------------------
# Metrics bar


def _delta(now: float | None, before: float | None) -> float | None:
    if now is None or before in (None, 0):
        return None
    return (now - before) / before


def _latency_average(sel: Selection, ops, by_op) -> float | None:
    """Average latency of `ops`, from `by_op` (totals grouped by operation over `sel`)."""
    wanted = {o for o in ops if not sel.operations or o in sel.operations}
    totals = Totals()
    for key, t in by_op.rows.items():
        if key[1] in wanted:
            totals.add(t)
    return totals.latency_ms_avg


def metrics(ctx: Context) -> WidgetData:
    rows = []
    # Two independent reads: side by side on two connections where that helps.
    current, previous = side_by_side(
        lambda: _metric_values(ctx.sel), lambda: _metric_values(ctx.sel.shifted_back())
    )
    for key, label, kind in METRICS:
        value, before = current[key], previous[key]
        rows.append(
            {
                "key": key,
                "metric": label,
                "kind": kind,
                "value": value,
                "previous": before,
                "change": _delta(value, before),
                "display": _display(value, kind, ctx.money),
                "previous_display": _display(before, kind, ctx.money),
                "exact": _exact(value, kind, ctx.money),
                "previous_exact": _exact(before, kind, ctx.money),
            }
        )
    empty = current["requests"] == 0
    return WidgetData(
        name="metrics",
        title="Metrics",
        columns=[
            Column("metric", "Metric"),
            Column("display", "This period", csv_key="exact"),
            Column("previous_display", "Previous period", csv_key="previous_exact"),
            Column("change", "Change", "pct"),
        ],
        rows=rows,
        empty_message=_empty(ctx) if empty else "",
    )


METRICS = [
    ("requests", "Requests", "int"),
    ("failed", "Failed requests", "int"),
    ("failure_rate", "Failure rate", "pct"),
    ("input_tokens", "Input tokens", "int"),
    ("cached_input_tokens", "Cached input tokens", "int"),
    ("output_tokens", "Output tokens", "int"),
    ("total_tokens", "Total tokens", "int"),
    ("cost", "Cost", "money"),
    ("completion_latency_avg", "Completion latency (avg)", "ms"),
    ("completion_latency_p95", "Completion latency (p95)", "ms"),
    ("embedding_latency_avg", "Embedding latency (avg)", "ms"),
    ("embedding_latency_p95", "Embedding latency (p95)", "ms"),
    ("active_users", "Active users", "int"),
    ("assistants", "Assistants", "int"),
    ("workflows", "Workflows", "int"),
]


def _metric_values(sel: Selection) -> dict:
    by_op = grouped_totals(sel, ("operation",))
    total = by_op.total()
    p95 = latency_percentiles(
        sel, {"completion": COMPLETION_OPERATIONS, "embedding": EMBEDDING_OPERATIONS}
    )
    completion_avg = _latency_average(sel, COMPLETION_OPERATIONS, by_op)
    embedding_avg = _latency_average(sel, EMBEDDING_OPERATIONS, by_op)
    completion_p95, embedding_p95 = p95["completion"], p95["embedding"]
    distinct = distinct_counts(sel, ("user_id", "assistant", "workflow"))
    return {
        "requests": total.requests,
        "failed": total.failed_requests,
        "failure_rate": total.failure_rate,
        "input_tokens": total.input_tokens,
        "cached_input_tokens": total.cached_input_tokens,
        "output_tokens": total.output_tokens,
        "total_tokens": total.total_tokens,
        "cost": total.cost_nanos,
        "unpriced": total.unpriced_requests,
        "completion_latency_avg": completion_avg,
        "completion_latency_p95": completion_p95,
        "embedding_latency_avg": embedding_avg,
        "embedding_latency_p95": embedding_p95,
        "active_users": distinct["user_id"],
        "assistants": distinct["assistant"],
        "workflows": distinct["workflow"],
    }


def _exact(value, kind: str, money: Money):
    """The unformatted value for CSV: money in the display unit, latencies in ms."""
    if value is None:
        return None
    if kind == "money":
        return money.amount(value).quantize(Decimal("0.000000001"))
    if kind in ("ms", "pct"):
        return round(value, 6)
    return value


def _display(value, kind: str, money: Money) -> str:
    from .templatetags.usage_format import compact, ms, pct

    if value is None:
        return "–"
    if kind == "money":
        return money.format(value)
    if kind == "ms":
        return ms(value)
    if kind == "pct":
        return pct(value)
    return compact(value)


# ---------------------------------------------------------------------------------------
# Time series


def requests_over_time(ctx: Context) -> WidgetData:
    keys, rows = _time_rows(ctx)
    x = _x(keys, ctx.tz)
    ok, failed, table = [], [], []
    for key, label in zip(keys, x, strict=True):
        t = rows.get((key,), Totals())
        ok.append(t.requests - t.failed_requests)
        failed.append(t.failed_requests)
        table.append(
            {
                "time": label,
                "succeeded": t.requests - t.failed_requests,
                "failed": t.failed_requests,
                "requests": t.requests,
                "has_data": t.requests > 0,
            }
        )
    figure = charts.time_bars(
        x,
        [("Succeeded", ok, charts.OK_COLOR), ("Failed", failed, charts.FAIL_COLOR)],
        "Requests",
        ",d",
    )
    return WidgetData(
        name="requests",
        title="Requests over time",
        columns=[
            Column("time", "Time", "time"),
            Column("succeeded", "Succeeded", "int"),
            Column("failed", "Failed", "int"),
            Column("requests", "Total", "int"),
        ],
        rows=table,
        figure=figure,
        empty_message=_empty(ctx),
        controls={"bucket": True},
    )


def tokens_over_time(ctx: Context) -> WidgetData:
    if ctx.split == "model":
        return _tokens_by_model(ctx)
    keys, rows = _time_rows(ctx)
    x = _x(keys, ctx.tz)
    table, plain, cached, output = [], [], [], []
    for key, label in zip(keys, x, strict=True):
        t = rows.get((key,), Totals())
        plain.append(t.input_tokens - t.cached_input_tokens)
        cached.append(t.cached_input_tokens)
        output.append(t.output_tokens)
        table.append(
            {
                "time": label,
                "input": t.input_tokens - t.cached_input_tokens,
                "cached_input": t.cached_input_tokens,
                "output": t.output_tokens,
                "total": t.total_tokens,
                "has_data": t.requests > 0,
            }
        )
    figure = charts.time_bars(
        x,
        [
            ("Input (uncached)", plain, None),
            ("Cached input", cached, None),
            ("Output", output, None),
        ],
        "Tokens",
        ",d",
    )
    return WidgetData(
        name="tokens",
        title="Tokens over time",
        columns=[
            Column("time", "Time", "time"),
            Column("input", "Input (uncached)", "int"),
            Column("cached_input", "Cached input", "int"),
            Column("output", "Output", "int"),
            Column("total", "Total", "int"),
        ],
        rows=table,
        figure=figure,
        empty_message=_empty(ctx, "tokens"),
        controls={"bucket": True, "split": "io"},
    )


def _tokens_by_model(ctx: Context) -> WidgetData:
    keys, rows = _time_rows(ctx, ("model",))
    x = _x(keys, ctx.tz)
    per_model: dict[str, dict[int, int]] = {}
    totals_by_model: dict[str, int] = {}
    for (key, model), t in rows.items():
        per_model.setdefault(model, {})[key] = t.total_tokens
        totals_by_model[model] = totals_by_model.get(model, 0) + t.total_tokens
    ranked = sorted(totals_by_model, key=lambda m: (-totals_by_model[m], m))
    shown, rest = ranked[:8], ranked[8:]
    series = [(m, [per_model[m].get(k, 0) for k in keys], None) for m in shown]
    if rest:
        series.append(
            ("Other models", [sum(per_model[m].get(k, 0) for m in rest) for k in keys], None)
        )
    table = []
    for key, label in zip(keys, x, strict=True):
        for model in ranked:
            value = per_model[model].get(key, 0)
            if value:
                table.append({"time": label, "model": model, "tokens": value})
    return WidgetData(
        name="tokens",
        title="Tokens over time by model",
        columns=[
            Column("time", "Time", "time"),
            Column("model", "Model"),
            Column("tokens", "Tokens", "int"),
        ],
        rows=table,
        figure=charts.time_bars(x, series, "Tokens", ",d"),
        empty_message=_empty(ctx, "tokens"),
        controls={"bucket": True, "split": "model"},
    )


def cost_over_time(ctx: Context) -> WidgetData:
    keys, rows = _time_rows(ctx)
    x = _x(keys, ctx.tz)
    values, table = [], []
    for key, label in zip(keys, x, strict=True):
        t = rows.get((key,), Totals())
        amount = ctx.money.amount(t.cost_nanos)
        values.append(float(amount))
        table.append(
            {
                "time": label,
                "cost": str(amount.quantize(Decimal("0.000000001"))),
                "cost_display": ctx.money.format(t.cost_nanos),
                "has_data": t.requests > 0,
            }
        )
    hover = ",.2f" if ctx.money.unit == "credits" else "$,.4f"
    return WidgetData(
        name="cost",
        title=f"Cost over time ({ctx.money.label})",
        columns=[
            Column("time", "Time", "time"),
            Column("cost_display", f"Cost ({ctx.money.label})", "money", csv_key="cost"),
        ],
        rows=table,
        figure=charts.time_bars(x, [("Cost", values, None)], ctx.money.label, hover),
        empty_message=_empty(ctx, "spend"),
        controls={"bucket": True},
    )


def latency_over_time(ctx: Context) -> WidgetData:
    b = ctx.bucketing
    keys = b.keys(int(ctx.sel.start.timestamp()), int(ctx.sel.end.timestamp()))
    x = _x(keys, ctx.tz)
    series_spec = [
        ("Completion", COMPLETION_OPERATIONS, None),
        ("Embedding", EMBEDDING_OPERATIONS, None),
    ]
    series, table = (
        [],
        {k: {"time": label, "has_data": False} for k, label in zip(keys, x, strict=True)},
    )
    by_group = latency_series_groups(ctx.sel, b, {name: ops for name, ops, _ in series_spec})
    for name, _, _ in series_spec:
        values = by_group.get(name)
        if not values:
            continue
        avg = [
            round(values[k][0], 1) if k in values and values[k][0] is not None else None
            for k in keys
        ]
        p95 = [values[k][1] if k in values else None for k in keys]
        series.append((f"{name} avg", avg, None, "solid"))
        series.append((f"{name} p95", p95, None, "dot"))
        for k, a, p in zip(keys, avg, p95, strict=True):
            table[k][f"{name.lower()}_avg"] = a
            table[k][f"{name.lower()}_p95"] = p
            table[k]["has_data"] = table[k]["has_data"] or a is not None
    columns = [Column("time", "Time", "time")]
    for name, _, _ in series_spec:
        if any(s[0].startswith(name) for s in series):
            columns += [
                Column(f"{name.lower()}_avg", f"{name} avg", "ms"),
                Column(f"{name.lower()}_p95", f"{name} p95", "ms"),
            ]
    return WidgetData(
        name="latency",
        title="Latency over time",
        columns=columns,
        rows=[table[k] for k in keys],
        figure=charts.time_lines(x, series, "ms", ",.0f") if series else None,
        empty_message=_empty(ctx),
        controls={"bucket": True},
    )


# ---------------------------------------------------------------------------------------
# Rankings


def requests_by_model(ctx: Context) -> WidgetData:
    grouped = grouped_totals(ctx.sel, ("model",))
    counts = {key[1]: t for key, t in grouped.rows.items()}
    models = set(counts)
    if not ctx.sel.models:
        models |= models_seen(ctx.sel)
    else:
        models |= set(ctx.sel.models)
    ordered = sorted(models, key=lambda m: (-(counts[m].requests if m in counts else 0), m))
    rows = []
    for model in ordered:
        t = counts.get(model, Totals())
        rows.append(
            {
                "model": model,
                "requests": t.requests,
                "failed": t.failed_requests,
                "total_tokens": t.total_tokens,
                "has_data": t.requests > 0,
            }
        )
    return WidgetData(
        name="models",
        title="Requests by model",
        columns=[
            Column("model", "Model"),
            Column("requests", "Requests", "int"),
            Column("failed", "Failed", "int"),
            Column("total_tokens", "Tokens", "int"),
        ],
        rows=rows,
        figure=charts.horizontal_bars(ordered, [r["requests"] for r in rows], "Requests", ",d"),
        empty_message=_empty(ctx),
        note="Models used in the last 90 days are listed even with no requests in this period.",
    )


def top_users(ctx: Context) -> WidgetData:
    ranked = top(ctx.sel, "user_id", 5)
    users = User.objects.in_bulk([uid for uid, _ in ranked if uid])
    rows = []
    for i, (uid, t) in enumerate(ranked, start=1):
        user = users.get(uid)
        rows.append(
            {
                "rank": i,
                "user": (user.display_name if user else "Unattributed"),
                "email": user.email if user else "",
                "link_param": f"user={uid}" if uid else "",
                # Ranked from the viewer's scope, so the person is one they may open.
                "detail_url": reverse("user-detail", args=[uid]) if uid else "",
                "requests": t.requests,
                "total_tokens": t.total_tokens,
                "cost_display": ctx.money.format(t.cost_nanos),
                "cost": ctx.money.amount(t.cost_nanos),
            }
        )
    return WidgetData(
        name="top_users",
        title="Top 5 users by tokens",
        columns=[
            Column("rank", "#", "int"),
            Column("user", "User", "link"),
            Column("requests", "Requests", "int"),
            Column("total_tokens", "Tokens", "int"),
            Column("cost_display", "Cost", "money", csv_key="cost"),
        ],
        rows=rows,
        figure=charts.horizontal_bars(
            [r["user"] for r in rows], [r["total_tokens"] for r in rows], "Tokens", ",d"
        ),
        empty_message=_empty(ctx, "usage by users"),
    )


def top_models(ctx: Context) -> WidgetData:
    ranked = top(ctx.sel, "model", 5)
    rows = [
        {
            "rank": i,
            "model": model,
            "requests": t.requests,
            "total_tokens": t.total_tokens,
            "cost_display": ctx.money.format(t.cost_nanos),
            "cost": ctx.money.amount(t.cost_nanos),
        }
        for i, (model, t) in enumerate(ranked, start=1)
    ]
    return WidgetData(
        name="top_models",
        title="Top 5 models by tokens",
        columns=[
            Column("rank", "#", "int"),
            Column("model", "Model"),
            Column("requests", "Requests", "int"),
            Column("total_tokens", "Tokens", "int"),
            Column("cost_display", "Cost", "money", csv_key="cost"),
        ],
        rows=rows,
        figure=charts.horizontal_bars(
            [r["model"] for r in rows],
            [r["total_tokens"] for r in rows],
            "Tokens",
            ",d",
            charts.PALETTE[1],
        ),
        empty_message=_empty(ctx, "usage by models"),
    )


def ranked_kind(sel: Selection) -> str:
    if len(sel.token_ids) == 1:
        return "end_user"
    if sel.scope.everything and not sel.org_ids:
        return "organization"
    return "token"


def ranked_table(ctx: Context) -> WidgetData:
    kind = ranked_kind(ctx.sel)
    dim = {"end_user": "end_user", "organization": "organization_id", "token": "api_token_id"}[kind]
    ranked = top(ctx.sel, dim, 25)
    names: dict = {}
    owners: dict = {}
    if kind == "token":
        tokens = ApiToken.objects.select_related("owner").in_bulk([k for k, _ in ranked if k])
        for key, token in tokens.items():
            names[key] = token.name
            owners[key] = (token.owner.email if token.owner else "", token.service_account)
    elif kind == "organization":
        names = dict(
            Organization.objects.filter(id__in=[k for k, _ in ranked]).values_list("id", "name")
        )
    rows = []
    for i, (key, t) in enumerate(ranked, start=1):
        owner, service = owners.get(key, ("", ""))
        label = names.get(key) or (key if kind == "end_user" and key else "(none)")
        link = {"token": "token", "organization": "org", "end_user": "end_user"}[kind]
        rows.append(
            {
                "rank": i,
                "name": label,
                "link_param": f"{link}={key}" if key else "",
                "requests": t.requests,
                "input_tokens": t.input_tokens,
                "output_tokens": t.output_tokens,
                "total_tokens": t.total_tokens,
                "owner": owner,
                "service_account": service,
            }
        )
    title = {
        "end_user": "End users of this token",
        "organization": "Organizations",
        "token": "API tokens",
    }[kind]
    return WidgetData(
        name="ranked",
        title=title,
        columns=[
            Column("rank", "#", "int"),
            Column("name", "Name", "link"),
            Column("requests", "Requests", "int"),
            Column("input_tokens", "Input", "int"),
            Column("output_tokens", "Output", "int"),
            Column("total_tokens", "Total tokens", "int"),
            Column("owner", "Owner"),
            Column("service_account", "Service account"),
        ],
        rows=rows,
        figure=charts.horizontal_bars(
            [str(r["name"]) for r in rows[:10]],
            [r["total_tokens"] for r in rows[:10]],
            "Tokens",
            ",d",
            charts.PALETTE[3],
        ),
        empty_message=_empty(ctx),
        controls={"ranked_kind": kind},
    )


WIDGETS: dict[str, Callable[[Context], WidgetData]] = {
    "metrics": metrics,
    "requests": requests_over_time,
    "tokens": tokens_over_time,
    "cost": cost_over_time,
    "latency": latency_over_time,
    "models": requests_by_model,
    "top_users": top_users,
    "top_models": top_models,
    "ranked": ranked_table,
}
