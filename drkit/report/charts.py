"""Charts as inline SVG, written by hand.

Hand-written rather than matplotlib or Vega-Lite: the charts are simple (points over time, a
target line, a calendar grid), and writing the SVG directly keeps the report one self-contained
file with nothing to load (no fonts, no script, no network), keeps text as text (searchable,
printable, crisp in the PDF), costs milliseconds for thousands of points instead of a second of
plotting-library import, and lets every point carry the id of the record it shows
(``data-ref`` and a ``<title>`` tooltip), so a reader can trace any dot to a drill or a backup.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import escape

from drkit.config.durations import format_duration

WIDTH, HEIGHT = 720, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 28, 34
COLORS = {
    "full": "#1f5fa8",
    "diff": "#7a4fb0",
    "incr": "#3a9a5b",
    "pass": "#2e7d32",
    "fail": "#c62828",
    "target": "#c62828",
    "age": "#1f5fa8",
    "wal": "#e08a00",
}


# Past this many points a chart's dots carry their record's id (data-ref) but no tooltip text:
# thousands of tooltips would double the file for dots too small to hover.
_MAX_TOOLTIPS = 2000


@dataclass
class Point:
    at: datetime
    value: float
    ref: str  # the record this point comes from: a drill id or a backup label
    color: str = ""


@dataclass
class Series:
    name: str
    color: str
    points: list[Point] = field(default_factory=list)


def seconds_label(value: float) -> str:
    return format_duration(value)


def bytes_label(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def time_chart(
    title: str,
    series: list[Series],
    start: datetime,
    end: datetime,
    *,
    fmt: Callable[[float], str] = seconds_label,
    target: float | None = None,
    target_label: str = "target",
    chart_id: str = "",
) -> str:
    """Points over ``[start, end)``, one color per series, a dashed target line if given."""
    values = [p.value for s in series for p in s.points]
    step = _tick_step(max([*values, target or 0.0, 1.0]) * 1.05, fmt is bytes_label)
    top = step * math.ceil(max([*values, target or 0.0, 1.0]) * 1.05 / step)
    span = max((end - start).total_seconds(), 1.0)
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM

    def x(at: datetime) -> float:
        return _LEFT + plot_w * min(max((at - start).total_seconds() / span, 0.0), 1.0)

    def y(value: float) -> float:
        return _TOP + plot_h * (1 - value / top)

    out = [_open(title, chart_id)]
    out += _axes(start, end, top, step, fmt, x, y)
    if target is not None:
        out.append(
            f'<line class="target" x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y(target):.1f}"'
            f' y2="{y(target):.1f}" stroke="{COLORS["target"]}" stroke-dasharray="6 4"/>'
            f'<text x="{WIDTH - _RIGHT - 2}" y="{y(target) - 4:.1f}" text-anchor="end"'
            f' fill="{COLORS["target"]}">{escape(target_label)} {escape(fmt(target))}</text>'
        )
    radius = 3.5 if len(values) < 400 else 1.6
    tooltips = len(values) <= _MAX_TOOLTIPS
    for s in series:
        for p in s.points:
            ref = escape(p.ref)
            tip = f"<title>{ref}: {escape(fmt(p.value))}</title>" if tooltips else ""
            out.append(
                f'<circle class="point" data-ref="{ref}" cx="{x(p.at):.1f}"'
                f' cy="{y(p.value):.1f}" r="{radius}" fill="{p.color or s.color}">{tip}</circle>'
            )
    out.append(_legend(series))
    out.append("</svg>")
    return "".join(out)


def calendar(
    title: str, rows: list[str], columns: list[str], cells: dict[tuple[str, str], tuple[str, str]]
) -> str:
    """A grid: one row per drill kind, one column per period; ``cells[(row, column)]`` is
    (status, tooltip). Empty cells are periods the kind is not due in."""
    cell_w = min(110, (WIDTH - 120) // max(len(columns), 1))
    height = _TOP + 26 * len(rows) + 40
    fills = {"passed": "#2e7d32", "failed": "#e08a00", "missing": "#c62828", "due": "#9e9e9e"}
    out = [_open(title, "cadence-calendar", height)]
    for j, column in enumerate(columns):
        out.append(
            f'<text x="{120 + j * cell_w + cell_w / 2:.0f}" y="{_TOP - 8}"'
            f' text-anchor="middle">{escape(column)}</text>'
        )
    for i, row in enumerate(rows):
        top = _TOP + i * 26
        out.append(f'<text x="4" y="{top + 17}">{escape(row)}</text>')
        for j, column in enumerate(columns):
            cell = cells.get((row, column))
            if cell is None:
                continue
            status, tip = cell
            out.append(
                f'<rect class="cell {status}" data-ref="{escape(tip)}" x="{120 + j * cell_w + 2}"'
                f' y="{top + 2}" width="{cell_w - 4}" height="22" rx="3" fill="{fills[status]}">'
                f"<title>{escape(tip)}</title></rect>"
                f'<text x="{120 + j * cell_w + cell_w / 2:.0f}" y="{top + 17}" fill="#fff"'
                f' text-anchor="middle">{escape(status)}</text>'
            )
    out.append("</svg>")
    return "".join(out)


def _open(title: str, chart_id: str, height: int = HEIGHT) -> str:
    ident = f' id="{escape(chart_id)}"' if chart_id else ""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart"{ident} role="img"'
        f' viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}"'
        f' font-family="sans-serif" font-size="11"><title>{escape(title)}</title>'
        f'<text x="4" y="14" font-weight="bold">{escape(title)}</text>'
    )


def _axes(
    start: datetime,
    end: datetime,
    top: float,
    step: float,
    fmt: Callable[[float], str],
    x: Callable[[datetime], float],
    y: Callable[[float], float],
) -> list[str]:
    out = [
        f'<line x1="{_LEFT}" x2="{_LEFT}" y1="{_TOP}" y2="{HEIGHT - _BOTTOM}" stroke="#555"/>',
        f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{HEIGHT - _BOTTOM}"'
        f' y2="{HEIGHT - _BOTTOM}" stroke="#555"/>',
    ]
    for i in range(round(top / step) + 1):
        value = step * i
        out.append(
            f'<line x1="{_LEFT - 3}" x2="{WIDTH - _RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}"'
            f' stroke="#ddd"/><text x="{_LEFT - 6}" y="{y(value) + 4:.1f}"'
            f' text-anchor="end">{escape(fmt(value))}</text>'
        )
    ticks = _month_ticks(start, end)
    for tick in ticks:
        out.append(
            f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{HEIGHT - _BOTTOM}"'
            f' y2="{HEIGHT - _BOTTOM + 4}" stroke="#555"/><text x="{x(tick) + 3:.1f}"'
            f' y="{HEIGHT - _BOTTOM + 16}">{tick.strftime("%b %d")}</text>'
        )
    return out


# Gridline steps a reader takes in at a glance: seconds to days, and 1-2-5 byte multiples.
_SECONDS_STEPS: tuple[int, ...] = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
_SECONDS_STEPS += (7200, 10800, 14400, 21600, 43200, 86400, 172800, 432000, 864000)
_BYTE_STEPS = tuple(m * 1024**e for e in range(6) for m in (1, 2, 5, 10, 20, 50, 100, 200, 500))


def _tick_step(top: float, in_bytes: bool) -> float:
    """The smallest readable step that draws at most five gridlines above zero."""
    for step in _BYTE_STEPS if in_bytes else _SECONDS_STEPS:
        if top / step <= 5:
            return float(step)
    return top / 5


def _month_ticks(start: datetime, end: datetime) -> list[datetime]:
    """The first of each month in the span (about weekly ticks for spans under two months)."""
    if (end - start).days <= 62:
        return [start + timedelta(days=7 * i) for i in range((end - start).days // 7 + 1)]
    ticks, at = [], start.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    step = 1 if (end - start).days <= 400 else 3
    while at < end:
        if at >= start:
            ticks.append(at)
        month = at.month - 1 + step
        at = at.replace(year=at.year + month // 12, month=month % 12 + 1)
    return ticks


def _legend(series: list[Series]) -> str:
    out, left = [], _LEFT + 4
    for s in series:
        if not s.points:
            continue
        out.append(
            f'<rect x="{left}" y="{HEIGHT - 12}" width="9" height="9" fill="{s.color}"/>'
            f'<text x="{left + 13}" y="{HEIGHT - 4}">{escape(s.name)} ({len(s.points)})</text>'
        )
        left += 20 + 7 * (len(s.name) + 6)
    return "".join(out)
