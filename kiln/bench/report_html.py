"""The benchmark report as one self-contained HTML page: kiln serve's `/report` and
`kiln bench report -o report.html`.

The tables are the README's, from the same renderer (kiln.bench.report): its markdown is turned into
HTML here by a converter for exactly the subset that renderer writes (pipe tables, paragraphs, `- `
lists, **bold**, `code`, a paragraph wrapped in _…_, ![images] of result files). Everything is
HTML-escaped before any tag is added, so nothing in a result file can become markup. Plots are
inline SVG and images of result files are inlined, so the page needs no other request.
"""

from __future__ import annotations

import re
from html import escape
from pathlib import Path
from typing import Any

from kiln.bench import report
from kiln.bench.report_plots import xy_plot

# Section titles, in README order (the README's headings for the same tables).
TITLES = {
    "throughput": "Offline batch throughput", "latency": "Single-stream latency",
    "vs_llamacpp": "Kernel-level speed vs llama.cpp", "serve_single_stream": "kiln serve for one user",
    "fused_kernels": "Fused kernels", "quant_kernels": "Quantized matmul kernels",
    "quant_quality": "Quantization quality", "perplexity": "Perplexity", "spec_decode": "Speculative decoding",
    "serving": "Serving under load", "soak": "A long day of traffic (soak)", "plan_advise": "kiln plan and kiln advise",
    "kquant_quality": "K-quant files: kiln vs llama-quantize",
}
NOT_PRESENT = ("The benchmark results are not present in this install: they are the files "
               "benchmarks/results/*.json of kiln's source checkout, which the package does not ship. "
               "Run kiln from a checkout (pip install -e .) or write the page there with "
               "`kiln bench report -o report.html`.")

_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:16px;color:#1b1b1b}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}td.r,th.r{text-align:right}code{background:#f3f3f3;padding:0 3px;border-radius:3px}
section{border-top:1px solid #ddd;margin-top:18px}nav a{margin-right:10px}.notice{background:#fff3cd;padding:10px;
border:1px solid #e0c36b}svg.plot{max-width:100%;height:auto;margin:6px 8px 0 0}em{color:#555}"""


def _title(name: str) -> str:
    return TITLES.get(name, name.replace("_", " "))


def _inline(text: str) -> str:
    """Escape, then `code` spans and **bold** (never inside code)."""
    parts = text.split("`")
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{escape(part)}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escape(part)))
    return "".join(out)


def _table(lines: list[str]) -> str:
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    aligns = ["r" if c.endswith(":") else "" for c in cells(lines[1])]
    head = "".join(f'<th class="{a}">{_inline(c)}</th>' for c, a in zip(cells(lines[0]), aligns))
    body = "".join("<tr>" + "".join(f'<td class="{a}">{_inline(c)}</td>' for c, a in zip(cells(line), aligns)) + "</tr>"
                   for line in lines[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(alt: str, src: str) -> str:
    """Inline an SVG result file (keeps the page self-contained); anything else becomes its alt text."""
    path = report.ROOT / src
    if path.suffix == ".svg" and path.is_file() and path.resolve().is_relative_to(report.RESULTS.resolve()):
        svg = path.read_text()
        return svg[svg.index("<svg"):]  # checked-in figure written by benchmarks/svg_plot.py (escaped labels)
    return f"<p><em>[{escape(alt)}]</em></p>"


def markdown_to_html(md: str) -> str:
    """The subset of markdown kiln.bench.report writes → HTML (blocks split on blank lines)."""
    html = []
    for block in re.split(r"\n\s*\n", md.strip()):
        lines = block.strip().splitlines()
        if not lines:
            continue
        if all(line.lstrip().startswith("|") for line in lines) and len(lines) >= 2:
            html.append(_table(lines))
        elif all(line.startswith("- ") for line in lines):
            html.append("<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>")
        elif len(lines) == 1 and (m := re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", lines[0].strip())):
            html.append(_image(m.group(1), m.group(2)))
        else:
            text = " ".join(line.strip() for line in lines)
            if text.startswith("_") and text.endswith("_"):
                html.append(f"<p><em>{_inline(text[1:-1])}</em></p>")
            else:
                html.append(f"<p>{_inline(text)}</p>")
    return "\n".join(html)


def _plots(name: str) -> list[str]:
    """The figures drawn beside a table, from the same result file (none when it is absent)."""
    d: dict[str, Any] | None = report._load(name)
    if d is None:
        return []
    if name == "serving":
        series = {sys: [(p["request_rate"], p["ttft_p95_s"]) for p in s["points"]] for sys, s in d["systems"].items()}
        return [xy_plot(series, "p95 time to first token vs request rate", "request rate (req/s)", "TTFT p95 (s)",
                        log_y=True)]
    if name == "spec_decode" and "workloads" in d:
        out = []
        for w in d["workloads"].values():
            runs = [(r["speculation_off"].get("batch", int(b.removeprefix("batch_"))), r) for b, r in w["runs"].items()]
            series = {"speculation off": [(b, r["speculation_off"]["output_tok_s"]) for b, r in runs],
                      "speculation on": [(b, r["speculation_on"]["output_tok_s"]) for b, r in runs]}
            out.append(xy_plot(series, f"throughput vs concurrency: {w['title']}", "requests at once",
                               "output tok/s"))
        return out
    if name == "quant_quality":
        rows = [r for r in d["results"] if "ppl" in r]
        series = {r["method"]: [(r["size_bytes"] / 2 ** 20, r["ppl"])] for r in rows}
        return [xy_plot(series, "size × quality of each quantization method", "size on disk (MiB)",
                        "WikiText-2 perplexity", lines=False)]
    return []


def render_report_html() -> str:
    """The whole page. Invariant: one <section id=NAME> per table of kiln.bench.report.TABLES, in that
    order, whether or not its result file exists (absent ones say "not measured yet")."""
    present = report.results_present()
    sections = []
    for name, table in report.TABLES.items():
        body = markdown_to_html(table()) + "".join(_plots(name))
        sections.append(f'<section id="{name}"><h2>{escape(_title(name))}</h2>{body}</section>')
    nav = " ".join(f'<a href="#{n}">{escape(_title(n))}</a>' for n in report.TABLES)
    notice = "" if present else f'<p class="notice" id="not-present">{escape(NOT_PRESENT)}</p>'
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>kiln benchmark report</title>"
            f"<meta name=viewport content='width=device-width'><link rel=icon href='data:,'><style>{_CSS}</style></head>"
            f"<body data-results-present={'yes' if present else 'no'}>"
            f"<h1>kiln benchmark report</h1>"
            f"{notice}<nav>{nav}</nav>{''.join(sections)}"
            "<p><em>Rendered by kiln.bench.report_html from benchmarks/results/*.json — the same tables as "
            "the README's.</em></p></body></html>")


def write_report(path: str | Path) -> Path:
    """`kiln bench report -o FILE`: write the page as one file (inline CSS and SVG, no other request)."""
    out = Path(path)
    out.write_text(render_report_html(), encoding="utf-8")
    return out
