"""Small dependency-free SVG plots for the benchmark report page (inline, so the page stays one file).

Every label is escaped: result files are data, never markup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

COLOURS = ("#c0392b", "#2471a3", "#229954", "#b9770e", "#7d3c98", "#17202a", "#ca6f1e", "#138d75")
Point = tuple[float, float]


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    step = (high - low) / count if high > low else 1.0
    return [low + i * step for i in range(count + 1)]


def xy_plot(series: dict[str, Sequence[Point]], title: str, x_label: str, y_label: str, *,
            log_y: bool = False, lines: bool = True, point_labels: dict[str, str] | None = None,
            width: int = 640, height: int = 300) -> str:
    """One SVG: each series as a coloured polyline (or bare markers with `lines=False`) with a legend.

    `log_y` plots log10(y) (y must be > 0; other points are dropped). `point_labels` names a
    series' single point beside its marker (used by scatters, where each series is one method)."""
    left, right, top, bottom = 64, 150, 30, 42
    fy = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    pts = {name: [(x, fy(y)) for x, y in s if y is not None and (y > 0 or not log_y)] for name, s in series.items()}
    xs = [x for s in pts.values() for x, _ in s] or [0.0, 1.0]
    ys = [y for s in pts.values() for _, y in s] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = (min(ys), max(ys)) if log_y else (min(0.0, min(ys)), max(ys) * 1.1 or 1.0)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 1, y_hi + 1
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * pw

    def py(y: float) -> float:
        return top + ph - (y - y_lo) / (y_hi - y_lo) * ph

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" font-family="sans-serif" font-size="11" role="img" aria-label="{escape(title)}">'),
           f'<text x="{left}" y="18" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in _ticks(y_lo, y_hi):
        label = f"{10 ** t:.3g}" if log_y else f"{t:.3g}"
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 5}" y="{py(t) + 4:.1f}" text-anchor="end">{label}</text>')
    for t in _ticks(x_lo, x_hi):
        out.append(f'<text x="{px(t):.1f}" y="{top + ph + 15}" text-anchor="middle">{t:.3g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" text-anchor="middle">'
               f'{escape(y_label)}{" (log scale)" if log_y else ""}</text>')
    for i, (name, s) in enumerate(pts.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(s))
        if lines and len(s) > 1:
            out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in s:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{colour}"/>')
            if point_labels and name in point_labels:
                out.append(f'<text x="{px(x) + 6:.1f}" y="{py(y) - 6:.1f}" fill="{colour}">{escape(point_labels[name])}</text>')
        ly = top + 12 + 16 * i
        out.append(f'<rect x="{left + pw + 10}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{left + pw + 24}" y="{ly + 1}">{escape(name[:22])}</text>')
    out.append("</svg>")
    return "".join(out)
