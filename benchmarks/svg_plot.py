"""A dependency-free SVG line chart for benchmark results (the README shows it as an image).

Kept tiny on purpose: a few series over one x axis, each panel with its own y axis, labelled ticks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float | None]]  # (x, y); None y: a gap
    colour: str


@dataclass(frozen=True)
class Panel:
    title: str
    y_label: str
    series: Sequence[Series]


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        high = low + 1.0
    step = (high - low) / count
    return [low + i * step for i in range(count + 1)]


def line_chart(panels: Sequence[Panel], x_label: str, width: int = 760, panel_height: int = 170) -> str:
    """SVG text: the panels stacked, sharing the x range of all their points."""
    left, right, top_pad, bottom_pad = 70, 20, 28, 34
    xs = [x for p in panels for s in p.series for x, y in s.points if y is not None]
    x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 1.0)
    height = len(panels) * (panel_height + top_pad + bottom_pad)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    plot_w = width - left - right
    for index, panel in enumerate(panels):
        y0 = index * (panel_height + top_pad + bottom_pad) + top_pad
        ys = [y for s in panel.series for _, y in s.points if y is not None]
        y_high = max(ys) * 1.1 if ys else 1.0
        y_low = 0.0

        def px(x: float) -> float:
            return left + (x - x_low) / ((x_high - x_low) or 1.0) * plot_w

        def py(y: float) -> float:
            return y0 + panel_height - (y - y_low) / ((y_high - y_low) or 1.0) * panel_height

        out.append(f'<text x="{left}" y="{y0 - 10}" font-weight="bold">{escape(panel.title)}</text>')
        out.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel_height}" fill="none" stroke="#999"/>')
        for tick in _ticks(y_low, y_high):
            out.append(f'<line x1="{left - 4}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" '
                       'stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" text-anchor="end">{tick:.3g}</text>')
        out.append(f'<text x="14" y="{y0 + panel_height / 2:.0f}" transform="rotate(-90 14 {y0 + panel_height / 2:.0f})" '
                   f'text-anchor="middle">{escape(panel.y_label)}</text>')
        for tick in _ticks(x_low, x_high, 6):
            out.append(f'<text x="{px(tick):.1f}" y="{y0 + panel_height + 14}" text-anchor="middle">{tick:.3g}</text>')
        out.append(f'<text x="{left + plot_w / 2:.0f}" y="{y0 + panel_height + 28}" text-anchor="middle">'
                   f'{escape(x_label)}</text>')
        for n, series in enumerate(panel.series):
            runs: list[list[str]] = [[]]
            for x, y in series.points:
                if y is None:
                    runs.append([])
                else:
                    runs[-1].append(f"{px(x):.1f},{py(y):.1f}")
            for run in runs:
                if len(run) > 1:
                    out.append(f'<polyline points="{" ".join(run)}" fill="none" stroke="{series.colour}" stroke-width="1.8"/>')
                elif run:
                    out.append(f'<circle cx="{run[0].split(",")[0]}" cy="{run[0].split(",")[1]}" r="2" fill="{series.colour}"/>')
            lx = left + 10 + n * 190
            out.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{y0 + 12}" y2="{y0 + 12}" stroke="{series.colour}" stroke-width="2"/>')
            out.append(f'<text x="{lx + 22}" y="{y0 + 16}">{escape(series.label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
