"""The UI routes over HTTP (no browser): pages, static files, the two feeds, --no-ui, --api-key,
the report page with and without results, `kiln bench report`, and the shipped files."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import httpx
import pytest

from kiln.bench import report
from kiln.engine.metrics import EngineMetrics
from kiln.entrypoints.openai.ui_stats import StatsFeed, quantile

from .ui_helpers import MODEL, serve

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "kiln" / "entrypoints" / "openai" / "static"


def test_pages_and_static_files_are_served_with_a_self_only_csp(ui_url: str) -> None:
    for path, marker in (("/", 'id="composer"'), ("/dashboard", 'id="charts"'), ("/report", "kiln benchmark report")):
        r = httpx.get(ui_url + path, timeout=30)
        assert r.status_code == 200 and marker in r.text, path
        assert "default-src 'self'" in r.headers["content-security-policy"]
    for name in ("chat.js", "markdown.js", "dashboard.js", "ui.css"):
        assert httpx.get(f"{ui_url}/ui/static/{name}").status_code == 200
    # nothing in the shipped files points off this server
    for f in STATIC.iterdir():
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", f.read_text()), f.name


def test_model_output_never_reaches_innerhtml() -> None:
    """The static guarantee behind the browser test: no script writes markup from a string."""
    for f in STATIC.glob("*.js"):
        code = "\n".join(line for line in f.read_text().splitlines() if not line.lstrip().startswith("//"))
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", code), f.name


def test_stats_feed_reports_rates_and_window_percentiles() -> None:
    m = EngineMetrics()
    feed = StatsFeed(m, window_s=10.0)
    first = feed.payload(now=100.0)
    assert first["output_tok_s"] is None and first["ttft_p50_s"] is None
    for x in (0.02, 0.03, 0.3, 0.5):
        m.ttft.observe(x)
    m.generation_tokens.inc(50)
    m.prefix_queries.inc(4)
    m.prefix_hits.inc(1)
    p = feed.payload(now=102.0)
    assert p["output_tok_s"] == pytest.approx(25.0)
    assert p["ttft_p50_s"] == pytest.approx(0.05) and 0.4 < p["ttft_p95_s"] <= 0.5
    assert p["prefix_hit_rate"] == pytest.approx(0.25)
    # 20 s later the first snapshots are out of the window: nothing new happened in it
    feed.payload(now=115.0)
    late = feed.payload(now=124.0)
    assert late["output_tok_s"] == 0.0 and late["ttft_p50_s"] is None
    assert quantile([(1.0, 0.0), (float("inf"), 3.0)], 0.5) == 1.0  # all above the last bound


def test_stats_and_config_feeds(ui_url: str) -> None:
    stats = httpx.get(ui_url + "/ui/api/stats").json()
    for key in ("output_tok_s", "running", "waiting", "ttft_p95_s", "itl_p95_s", "kv_blocks_in_use",
                "prefix_hit_rate", "spec_acceptance", "finished"):
        assert key in stats
    cfg = httpx.get(ui_url + "/ui/api/config").json()
    assert cfg["loaded"] and cfg["model"] == MODEL
    assert "KV cache" in cfg["kv_cache"] and cfg["kernels"] and cfg["decode_step"] and cfg["linear_paths"]
    assert any(line.startswith("architecture") for line in cfg["model_info"])


def test_no_ui_leaves_the_api_unchanged(ui_engine) -> None:
    from kiln.entrypoints.openai.api_server import build_app

    with serve(build_app(ui_engine, MODEL, ui=False)) as url:
        for path in ("/", "/dashboard", "/report", "/ui/static/chat.js", "/ui/api/stats"):
            assert httpx.get(url + path).status_code == 404, path
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == MODEL


def test_pages_open_but_api_closed_under_an_api_key(ui_engine) -> None:
    from kiln.entrypoints.openai.api_server import build_app

    with serve(build_app(ui_engine, MODEL, api_key="sesame")) as url:
        for path in ("/", "/dashboard", "/ui/static/chat.js", "/ui/api/stats"):
            assert httpx.get(url + path).status_code == 200, path
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200


def test_report_says_when_results_are_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.bench.report_html import render_report_html

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    html = render_report_html()
    assert 'id="not-present"' in html and "not present in this install" in html
    assert html.count("<section") == len(report.TABLES)


def test_kiln_bench_report_writes_one_self_contained_file(tmp_path: Path) -> None:
    from kiln.entrypoints.cli import main

    out = tmp_path / "report.html"
    main(["bench", "report", "-o", str(out)])
    html = out.read_text()
    assert html.count("<section") == len(report.TABLES) and "data-results-present=yes" in html
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html)  # inline CSS and SVG only
    tables = sum(fn().count("\n|---") + fn().startswith("|---") for fn in report.TABLES.values())
    assert html.count("<table>") == tables


def test_static_files_are_package_data() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["kiln.entrypoints.openai"]
    for f in STATIC.iterdir():
        assert any(fnmatch.fnmatch(f"static/{f.name}", g) for g in globs), f.name
    assert any(r.startswith("selenium") for r in config["project"]["optional-dependencies"]["test"])
