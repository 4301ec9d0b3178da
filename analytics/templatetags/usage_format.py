"""Number formatting for people: 1.2M tokens, $1,234.56, 350 ms, +12.5 %."""

from django import template

register = template.Library()


@register.filter
def compact(value) -> str:
    if value is None or value == "":
        return "–"
    value = float(value)
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            scaled = value / limit
            return f"{scaled:.1f}{suffix}" if abs(scaled) < 100 else f"{scaled:.0f}{suffix}"
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


@register.filter
def ms(value) -> str:
    if value is None or value == "":
        return "–"
    value = float(value)
    if value >= 10_000:
        return f"{value / 1000:,.1f} s"
    return f"{value:,.0f} ms"


@register.filter
def pct(value) -> str:
    if value is None or value == "":
        return "–"
    value = float(value) * 100
    return f"{value:.1f} %" if abs(value) < 10 else f"{value:.0f} %"


@register.filter
def signed_pct(value) -> str:
    if value is None:
        return ""
    value = float(value) * 100
    arrow = "▲" if value > 0 else ("▼" if value < 0 else "")
    return f"{arrow} {abs(value):.1f} %" if abs(value) < 10 else f"{arrow} {abs(value):.0f} %"


@register.filter
def delta_class(change, key: str = "") -> str:
    """Colour a change: more failures or latency is bad, more usage is neutral."""
    if change is None or change == 0:
        return "flat"
    worse_when_up = key in {"failed", "failure_rate"} or "latency" in key
    if worse_when_up:
        return "bad" if change > 0 else "good"
    return "up" if change > 0 else "down"


@register.filter
def cell(value, kind: str) -> str:
    if kind == "int":
        return "–" if value is None or value == "" else f"{int(value):,}"
    if kind == "ms":
        return ms(value)
    if kind == "pct":
        return signed_pct(value) if value is not None else "–"
    if value is None:
        return ""
    return str(value)


@register.filter
def get_item(mapping, key):
    return mapping.get(key) if hasattr(mapping, "get") else None
