"""Plotly figures built on the server as plain figure dicts.

The page receives each figure through `json_script`; static/js/charts.js draws it with
the plotly.js that ships inside the plotly package. Colours follow the page's theme in
the browser, so figures carry no colours of their own except the series palette.
"""

PALETTE = [
    "#2f6feb",
    "#f0883e",
    "#3fb950",
    "#a371f7",
    "#db61a2",
    "#39c5cf",
    "#d29922",
    "#8b949e",
    "#f85149",
    "#56d364",
]
OK_COLOR = "#3fb950"
FAIL_COLOR = "#f85149"


def _layout(y_title: str = "", *, barmode: str | None = None, height: int = 280, **extra) -> dict:
    layout = {
        "height": height,
        "margin": {"l": 56, "r": 16, "t": 8, "b": 40},
        "hovermode": "x unified",
        "legend": {"orientation": "h", "y": -0.18},
        "xaxis": {"type": "date"},
        "yaxis": {"title": {"text": y_title}, "rangemode": "tozero", "automargin": True},
    }
    if barmode:
        layout["barmode"] = barmode
    layout.update(extra)
    return layout


def time_bars(
    x: list[str], series: list[tuple[str, list, str | None]], y_title: str, hover: str
) -> dict:
    """Stacked bars over time. series: [(name, values, colour or None)]."""
    data = []
    for i, (name, values, color) in enumerate(series):
        data.append(
            {
                "type": "bar",
                "name": name,
                "x": x,
                "y": values,
                "marker": {"color": color or PALETTE[i % len(PALETTE)]},
                "hovertemplate": f"%{{y:{hover}}}<extra>{name}</extra>",
            }
        )
    return {"data": data, "layout": _layout(y_title, barmode="stack", bargap=0.15)}


def time_lines(
    x: list[str], series: list[tuple[str, list, str | None, str]], y_title: str, hover: str
) -> dict:
    """Lines over time. series: [(name, values, colour or None, dash)]."""
    data = []
    for i, (name, values, color, dash) in enumerate(series):
        data.append(
            {
                "type": "scatter",
                "mode": "lines+markers" if len(x) <= 48 else "lines",
                "name": name,
                "x": x,
                "y": values,
                "connectgaps": False,
                "line": {"color": color or PALETTE[i % len(PALETTE)], "dash": dash},
                "hovertemplate": f"%{{y:{hover}}}<extra>{name}</extra>",
            }
        )
    return {"data": data, "layout": _layout(y_title)}


def horizontal_bars(
    labels: list[str], values: list, x_title: str, hover: str, color: str | None = None
) -> dict:
    height = max(160, 28 * len(labels) + 60)
    return {
        "data": [
            {
                "type": "bar",
                "orientation": "h",
                "y": labels,
                "x": values,
                "marker": {"color": color or PALETTE[0]},
                "hovertemplate": f"%{{y}}: %{{x:{hover}}}<extra></extra>",
            }
        ],
        "layout": {
            "height": height,
            "margin": {"l": 8, "r": 16, "t": 8, "b": 40},
            "xaxis": {"title": {"text": x_title}, "rangemode": "tozero"},
            "yaxis": {"autorange": "reversed", "automargin": True, "type": "category"},
            "hovermode": "closest",
        },
    }


def donut(
    labels: list[str], values: list, hole: float = 0.7, colors: list[str] | None = None
) -> dict:
    return {
        "data": [
            {
                "type": "pie",
                "labels": labels,
                "values": values,
                "hole": hole,
                "sort": False,
                "textinfo": "none",
                "marker": {"colors": colors or PALETTE},
                "hovertemplate": "%{label}: %{value}<extra></extra>",
            }
        ],
        "layout": {"height": 220, "margin": {"l": 8, "r": 8, "t": 8, "b": 8}, "showlegend": False},
    }
