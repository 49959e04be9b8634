"""Vega-Lite specs for the Dashboard's figures, built from app.dashboard_data's frames (pure).

Gradio's native plots draw points and lines but no error bars, so the figures that carry an
uncertainty are plain Vega-Lite specs shown by `gr.Plot` (the Vega renderer Gradio ships for
Altair charts; no Altair needed). Every chart names what its bars mean, and a figure without
enough data says so in its subtitle instead of drawing a flat line or a zero-width interval.
"""
from __future__ import annotations

import math

import pandas as pd

PALETTE = ("#e4572e", "#2e86ab", "#76b041", "#9b5de5", "#f3a712", "#17becf", "#8c564b",
           "#e377c2", "#6c757d", "#bcbd22")  # Gradio maps a colour scale to its theme's
TEXT = "#808080"  # readable on the light and the dark theme
SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"


def base(title: str, subtitle: str | list[str] = "", height: int = 240) -> dict:
    """Title and size. No width: Gradio sets it to the container's and follows resizes; its
    theme (fonts, text colours) replaces `config` (see app.ui_dashboard.plot_value)."""
    lines = [s for s in ([subtitle] if isinstance(subtitle, str) else subtitle) if s]
    return {"$schema": SCHEMA, "height": height, "background": "transparent",
            "title": {"text": title, "subtitle": lines, "subtitleColor": TEXT}}


def records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts: NaN -> None (Vega drops those points), times as ISO text."""
    out = []
    for row in frame.to_dict("records"):
        out.append({k: (None if isinstance(v, float) and math.isnan(v) else
                        v.isoformat() if isinstance(v, pd.Timestamp) else v)
                    for k, v in row.items()})
    return out


def padded(values: list[float], *, floor: float | None = None,
           ceiling: float | None = None) -> list[float]:
    """[lo, hi] around the values with 8% room (a single value gets room of its own size)."""
    lo, hi = min(values), max(values)
    pad = 0.08 * (hi - lo) or 0.1 * abs(hi) or 0.1
    lo, hi = lo - pad, hi + pad
    return [max(lo, floor) if floor is not None else lo,
            min(hi, ceiling) if ceiling is not None else hi]


def colour(domain: list[str], fixed: dict[str, str] | None = None) -> dict:
    fixed = fixed or {}
    return {"domain": domain,
            "range": [fixed.get(d, PALETTE[i % len(PALETTE)]) for i, d in enumerate(domain)]}


LEGEND = {"orient": "bottom", "direction": "horizontal", "columns": 3}


def interval_chart(frame: pd.DataFrame, *, x: str, order: list[str], title: str,
                   y_title: str, subtitle: str | list[str] = "", unit: bool = False,
                   chance: float | None = None, colours: dict | None = None) -> dict:
    """Points with error bars (rule lo..hi) per category of `x`, one colour per series.

    frame: x, series, value, lo, hi (lo/hi None: no bar), n, note (shown where value is None).
    Every category in `order` gets a slot on the axis, with or without a value.
    """
    series = list(dict.fromkeys(frame["series"]))
    rows = records(frame)
    known = [v for r in rows for v in (r["value"], r["lo"], r["hi"]) if v is not None]
    y_domain = [0.0, 1.0] if unit else padded(known or [0.0, 1.0])
    y = {"type": "quantitative", "title": y_title, "scale": {"domain": y_domain, "zero": False}}
    enc = {"x": {"field": x, "type": "nominal", "sort": order, "scale": {"domain": order},
                 "axis": {"labelAngle": 0}, "title": None},
           "color": {"field": "series", "type": "nominal", "title": None,
                     "scale": colour(series, colours), "legend": LEGEND}}
    if len(series) > 1:
        enc["xOffset"] = {"field": "series", "type": "nominal", "sort": series}
    tooltip = [{"field": x}, {"field": "series"}, {"field": "value", "format": ".3f"},
               {"field": "lo", "title": "95% low", "format": ".3f"},
               {"field": "hi", "title": "95% high", "format": ".3f"}, {"field": "n"}]
    layers = [
        {"mark": {"type": "rule", "strokeWidth": 2},
         "encoding": {**enc, "y": {**y, "field": "lo"}, "y2": {"field": "hi"}}},
        {"mark": {"type": "point", "filled": True, "size": 70, "opacity": 1, "strokeWidth": 0},
         "encoding": {**enc, "y": {**y, "field": "value"}, "tooltip": tooltip}},
        {"transform": [{"filter": "datum.value === null && datum.note"}],
         "mark": {"type": "text", "fontSize": 11, "fill": TEXT, "strokeWidth": 0},
         "encoding": {"x": enc["x"], "y": {"datum": sum(y_domain) / 2, **y},
                      "text": {"field": "note"}}},
    ]
    if chance is not None:
        layers.append({"data": {"values": [{"chance": chance}]},
                       "mark": {"type": "rule", "strokeDash": [4, 4], "stroke": TEXT},
                       "encoding": {"y": {"field": "chance", **y}}})
    return {**base(title, subtitle), "data": {"values": rows}, "layer": layers}


def step_chart(frame: pd.DataFrame, *, title: str, y_title: str) -> dict:
    """One PPO metric over the continuous step axis (rounds run on), one colour per round.

    frame: step, value, version, lo, hi. A metric logged once per round (one row per version)
    is drawn as points joined across rounds, with its interval as a bar where one was
    recorded; a per-minibatch metric as one line per round. Axes fit the data.
    """
    rows = records(frame)
    versions = sorted(set(frame["version"]), key=lambda v: int(str(v).lstrip("v")))
    per_round = frame.groupby("version").size().max() == 1
    known = [v for r in rows for v in (r["value"], r.get("lo"), r.get("hi")) if v is not None]
    steps = [float(s) for s in frame["step"]]
    x_domain = [min(steps) - 1, max(steps) + 1] if per_round or len(set(steps)) == 1 else \
        [min(steps), max(steps)]
    axis = {"format": "d", "tickMinStep": 1}
    if x_domain[1] - x_domain[0] <= 12:  # few steps: ticks on the logged steps only
        axis["values"] = sorted({int(s) for s in steps})
    x = {"field": "step", "type": "quantitative", "title": "step",
         "scale": {"domain": x_domain, "nice": False, "zero": False}, "axis": axis}
    y = {"type": "quantitative", "title": y_title, "scale": {"domain": padded(known),
                                                             "zero": False}}
    color = {"field": "version", "type": "nominal", "title": "round (policy version)",
             "scale": colour(versions), "sort": versions}
    tooltip = [{"field": "version"}, {"field": "step"}, {"field": "value", "format": ".4g"}]
    has_bars = any(r.get("lo") is not None for r in rows)
    notes = []
    if per_round:
        notes.append("logged once per round" + (" (bars: 95% interval of the mean over the "
                                               "round's rollouts)" if has_bars else
                                               "; no spread recorded for it"))
        if len(versions) < 2:
            notes.append("one round so far: not enough data yet for a trend")
    layers = []
    if has_bars:
        layers.append({"mark": {"type": "rule", "strokeWidth": 2},
                       "encoding": {"x": x, "y": {**y, "field": "lo"}, "y2": {"field": "hi"},
                                    "color": color}})
    if per_round:
        layers.append({"mark": {"type": "line", "stroke": TEXT, "strokeDash": [3, 3]},
                       "encoding": {"x": x, "y": {**y, "field": "value"}}})
    else:
        layers.append({"mark": {"type": "line", "strokeWidth": 1.5},
                       "encoding": {"x": x, "y": {**y, "field": "value"}, "color": color,
                                    "detail": {"field": "version"}}})
    layers.append({"mark": {"type": "point", "filled": True, "strokeWidth": 0,
                            "size": 50 if per_round else 12},
                   "encoding": {"x": x, "y": {**y, "field": "value"}, "color": color,
                                "tooltip": tooltip}})
    return {**base(title, notes), "data": {"values": rows}, "layer": layers}


LABEL_PX = 80  # width per time label: "Nov 30" or "08:05" at Gradio's font, plus a gap
MINUTE_MS = 60_000


def time_axis(span_s: float) -> dict:
    """An x axis whose labels never overlap, at 390 px or 1280 px, over minutes or months.

    About one tick per LABEL_PX of the chart's own width (the `width` signal: a phone gets
    fewer); ticks never closer than a minute (tickMinStep 2 min keeps Vega from picking
    30-second ticks that would read "08:00" twice); a tick at midnight reads as its date, any
    other as its time, so hours that cross midnight stay unambiguous and labels stay short.
    Over a year, "Jan 2026". Any label that would still touch a neighbour is dropped (greedy),
    and the end labels are kept inside the chart (labelFlush).
    """
    label = ("timeFormat(datum.value, '%b %Y')" if span_s > 300 * 86400 else
             "hours(datum.value) == 0 && minutes(datum.value) == 0 ? "
             "timeFormat(datum.value, '%b %d') : timeFormat(datum.value, '%H:%M')")
    return {"labelExpr": label, "labelAngle": 0, "labelOverlap": "greedy",
            "labelSeparation": 8, "labelFlush": True, "tickMinStep": 2 * MINUTE_MS,
            "tickCount": {"expr": f"max(2, floor(width / {LABEL_PX}))"}}


def time_chart(frame: pd.DataFrame, *, title: str, y_title: str) -> dict:
    """Counts over time (x: time, one line + points per series: a single bucket still shows).

    Times are the store's UTC clock read as the browser's local time, so they show as UTC.
    Rendered as SVG: crisp at any zoom, and its labels are elements (the tests measure them).
    """
    rows = records(frame)
    series = list(dict.fromkeys(frame["series"]))
    span_s = (frame["time"].max() - frame["time"].min()).total_seconds()
    x = {"field": "time", "type": "temporal", "title": "time (UTC)", "axis": time_axis(span_s)}
    y = {"field": "value", "type": "quantitative", "title": y_title,
         "scale": {"domain": [0, max(1.0, float(frame["value"].max()) * 1.08)]}}
    # below the plot (at its right it took half a phone's width), one column on a phone
    legend = {**LEGEND, "columns": {"expr": "width < 480 ? 1 : 3"}}
    color = {"field": "series", "type": "nominal", "title": None, "scale": colour(series),
             "legend": legend}
    notes = [] if frame["time"].nunique() > 1 else ["one time bucket so far"]
    tooltip = [{"field": "series"}, {"field": "time", "type": "temporal",
                                     "format": "%Y-%m-%d %H:%M"}, {"field": "value"}]
    return {**base(title, notes), "data": {"values": rows},
            "usermeta": {"embedOptions": {"renderer": "svg"}}, "layer": [
        {"mark": {"type": "line"}, "encoding": {"x": x, "y": y, "color": color}},
        {"mark": {"type": "point", "filled": True, "size": 25, "strokeWidth": 0},
         "encoding": {"x": x, "y": y, "color": color, "tooltip": tooltip}}]}
