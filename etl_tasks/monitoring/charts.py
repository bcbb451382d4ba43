"""SVG charts drawn in Python for `etl report`: plain markup, no script, nothing fetched.

Each mark (bar or point) carries `data-series`, `data-run` and `data-value` and a `<title>`
tooltip, so a reader hovering a mark sees its figure and a test can hold the page against
the store. Every text goes through `html.escape`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

WIDTH, HEIGHT = 560, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 30, 36  # TOP leaves a row for the legend
MIN_BAR = 1.5  # px: a non-zero value stays visible beside values a thousand times larger
PALETTE = ("#2b6cb0", "#dd6b20", "#2f855a", "#805ad5", "#c53030", "#319795", "#b7791f",
           "#4a5568")


@dataclass(frozen=True)
class Group:
    """One run on an ordinal axis: its label (end time), its id and a value per series."""

    label: str
    run_id: str
    values: Mapping[str, float | None]


@dataclass(frozen=True)
class Point:
    """One run on a time axis."""

    at: datetime
    value: float
    run_id: str


def number(value: float) -> str:
    """A figure for people: thousands separated, at most four significant digits for
    fractions."""
    if value == int(value):
        return f"{value:,.0f}"
    return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"


def when(moment: datetime, span_s: float = 86400.0) -> str:
    """A UTC time label, as precise as a span of `span_s` seconds needs."""
    moment = moment.astimezone(UTC)
    if span_s < 600:
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%H:%M" if span_s < 86400 else "%m-%d %H:%M")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round values from at or below `lo` to at or above `hi`."""
    if hi <= lo:  # one value: a band around it, so it is drawn mid-height, not on an edge
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    # round(): 0.1 * 3 is 0.30000000000000004, which would print as such.
    return [round(i * step, 10) for i in range(first, last + 1)]


@dataclass(frozen=True)
class _Linear:
    """domain -> span, linearly (a span may run downwards: SVG's y grows down)."""

    domain: tuple[float, float]
    span: tuple[float, float]

    def __call__(self, value: float) -> float:
        (d0, d1), (r0, r1) = self.domain, self.span
        return r0 + (value - d0) / (d1 - d0) * (r1 - r0)


def _mark(shape: str, data: Mapping[str, str], value: float, tip: str,
          **geometry: float | str) -> str:
    """A bar or point with its figures as `data-*` attributes and a tooltip."""
    attrs = " ".join([*(f'data-{k}="{escape(v)}"' for k, v in data.items()),
                      f'data-value="{value:.12g}"',
                      *(f'{k}="{_fmt(v)}"' for k, v in geometry.items())])
    return f'<{shape} class="mark" {attrs}><title>{escape(tip)}</title></{shape}>'


def _fmt(value: float | str) -> str:
    return escape(value) if isinstance(value, str) else f"{value:.2f}"


def _text(x: float, y: float, text: str, anchor: str = "middle", css: str = "tick") -> str:
    return (f'<text class="{css}" x="{x:.2f}" y="{y:.2f}" text-anchor="{anchor}">'
            f"{escape(text)}</text>")


def _legend(names: Sequence[str], colours: Mapping[str, str]) -> list[str]:
    parts, x = [], float(LEFT)
    for name in names:
        parts.append(f'<rect class="swatch" x="{x:.2f}" y="8" width="10" height="10" '
                     f'fill="{colours[name]}"/>')
        parts.append(_text(x + 14, 17, name, "start", "legend"))
        x += 24 + 6.5 * len(name)
    return parts


def _y_axis(ticks: Sequence[float], y: _Linear) -> list[str]:
    parts = []
    for tick in ticks:
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(tick):.2f}" '
                     f'y2="{y(tick):.2f}"/>')
        parts.append(_text(LEFT - 6, y(tick) + 4, number(tick), "end"))
    return parts


def _frame(chart: str, label: str, body: Sequence[str], height: float = HEIGHT) -> str:
    return (f'<svg class="chart" data-chart="{escape(chart)}" viewBox="0 0 {WIDTH} '
            f'{height:.0f}" width="{WIDTH}" height="{height:.0f}" role="img" '
            f'aria-label="{escape(label)}">' + "".join(body) + "</svg>")


def colours_for(names: Sequence[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def bars(chart: str, label: str, groups: Sequence[Group], series: Sequence[str], *,
         stacked: bool = False, unit: str = "") -> str:
    """Bars per run on an ordinal axis: side by side, or stacked (stage times)."""
    colours = colours_for(series)
    heights = [sum(v or 0.0 for v in g.values.values()) if stacked
               else max((v or 0.0 for v in g.values.values()), default=0.0) for g in groups]
    ticks = nice_ticks(0.0, max(heights, default=0.0) or 1.0)
    y = _Linear((ticks[0], ticks[-1]), (HEIGHT - BOTTOM, TOP))
    band = (WIDTH - LEFT - RIGHT) / max(len(groups), 1)
    width = band * 0.8 / (1 if stacked else len(series))
    every = math.ceil(len(groups) / 6)  # about six time labels, whatever the number of runs
    body = [*_legend(series, colours), *_y_axis(ticks, y)]
    for i, group in enumerate(groups):
        x, floor = LEFT + band * (i + 0.1), y(0.0)
        for j, name in enumerate(series):
            value = group.values.get(name)
            if value is None:
                continue
            h = max(y(0.0) - y(value), MIN_BAR if value > 0 else 0.0)
            left = x if stacked else x + j * width
            body.append(_mark("rect", {"series": name, "run": group.run_id}, value,
                              f"{group.label} {name}: {number(value)} {unit}".rstrip(),
                              x=left, y=floor - h, width=width, height=h,
                              fill=colours[name]))
            if stacked:
                floor -= h
        if i % every == 0:
            body.append(_text(LEFT + band * (i + 0.5), HEIGHT - BOTTOM + 14, group.label))
    body.append(_text((LEFT + WIDTH - RIGHT) / 2, HEIGHT - 4, "run end (UTC)", css="axis"))
    return _frame(chart, label, body)


def lines(chart: str, label: str, series: Mapping[str, Sequence[Point]],
          colours: Mapping[str, str], *, zero: bool = True, unit: str = "") -> str:
    """A line with a point per run for each series, on a time axis (run end)."""
    points = [p for ps in series.values() for p in ps]
    times = [p.at.timestamp() for p in points]
    t0, t1 = min(times), max(times)
    pad = (t1 - t0) * 0.04 or 60.0  # keep the first and last points off the frame
    x = _Linear((t0 - pad, t1 + pad), (LEFT, WIDTH - RIGHT))
    values = [p.value for p in points]
    ticks = nice_ticks(0.0 if zero else min(values), max(values))
    y = _Linear((ticks[0], ticks[-1]), (HEIGHT - BOTTOM, TOP))
    body = [*_legend(list(series), colours), *_y_axis(ticks, y)]
    for name, run_points in series.items():
        ordered = sorted(run_points, key=lambda p: p.at)
        path = " ".join(f"{'M' if i == 0 else 'L'}{x(p.at.timestamp()):.2f},{y(p.value):.2f}"
                        for i, p in enumerate(ordered))
        body.append(f'<path class="line" d="{path}" stroke="{colours[name]}"/>')
        for p in ordered:
            body.append(_mark("circle", {"series": name, "run": p.run_id}, p.value,
                              f"{name} {when(p.at)}: {number(p.value)} {unit}".rstrip(),
                              cx=x(p.at.timestamp()), cy=y(p.value), r=3.5,
                              fill=colours[name]))
    for k in range(5):
        moment = t0 - pad + (t1 - t0 + 2 * pad) * (k + 0.5) / 5
        body.append(_text(x(moment), HEIGHT - BOTTOM + 14,
                          when(datetime.fromtimestamp(moment, UTC), t1 - t0 + 2 * pad)))
    body.append(_text((LEFT + WIDTH - RIGHT) / 2, HEIGHT - 4, "run end (UTC)", css="axis"))
    return _frame(chart, label, body)


def hbars(chart: str, label: str, items: Sequence[tuple[str, float]], colour: str, *,
          series: str, unit: str = "") -> str:
    """Horizontal bars, largest first, each under its full label (rule names are long)."""
    row, top = 30, 10
    height = top + row * len(items) + 8
    ticks = nice_ticks(0.0, max((v for _, v in items), default=0.0) or 1.0)
    x = _Linear((ticks[0], ticks[-1]), (8, WIDTH - RIGHT - 60))
    body = []
    for i, (name, value) in enumerate(sorted(items, key=lambda item: (-item[1], item[0]))):
        y0 = top + i * row
        body.append(_text(8, y0 + 10, name, "start", "legend"))
        w = max(x(value) - x(0.0), MIN_BAR if value > 0 else 0.0)
        body.append(_mark("rect", {"series": series, "item": name}, value,
                          f"{name}: {number(value)} {unit}".rstrip(),
                          x=8, y=y0 + 14, width=w, height=10, fill=colour))
        body.append(_text(8 + w + 6, y0 + 23, number(value), "start"))
    return _frame(chart, label, body, height)
