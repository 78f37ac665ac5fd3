"""The pages in a real headless Chromium against a real server on the default model (kiln issue 22).

Each test writes a screenshot to benchmarks/results/ui_*.png (checked in, shown in the README).
They skip, saying how to install them, where chromium/chromedriver/selenium are absent.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from kiln.bench import report

from .ui_helpers import INSTALL_HINT, MODEL, screenshot, serve, wait_for

pytest.importorskip("selenium", reason=INSTALL_HINT + ": selenium is not installed")
# selenium is optional: imported only once the skip above has let the module through
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

HOSTILE = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> **not bold in a user message**'


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def _open_chat(drv: Any, url: str, **settings: str) -> None:
    drv.get(url + "/")
    wait_for(lambda: drv.find_elements(By.CSS_SELECTOR, "#model option"), 20, what="the model list from /v1/models")
    for field, value in settings.items():
        el = drv.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)


def _send(drv: Any, text: str) -> Any:
    box = drv.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    return wait_for(lambda: (drv.find_elements(By.CSS_SELECTOR, ".msg.assistant") or [None])[-1], 10, what="an answer")


def _text(el: Any) -> str:
    return el.get_attribute("textContent") or ""


def test_chat_streams_an_answer_and_keeps_the_conversation(browser: Any, ui_url: str) -> None:
    _open_chat(browser, ui_url, max_tokens="60", seed="7", system="You are a helpful baker.")
    assert browser.find_element(By.ID, "model").get_attribute("value") == MODEL
    answer = _send(browser, "Give me three tips for baking bread.")
    lengths: list[int] = []

    def finished() -> bool:
        content = _text(answer.find_element(By.CSS_SELECTOR, ".content"))
        if content and (not lengths or lengths[-1] != len(content)):
            lengths.append(len(content))
        return answer.get_attribute("data-state") != "streaming"

    wait_for(finished, 120, interval=0.03, what="the streamed answer to finish")
    assert answer.get_attribute("data-state") == "done"
    assert len(lengths) >= 3, f"the answer appeared in {len(lengths)} step(s), not streamed: {lengths}"
    stats = _text(answer.find_element(By.CSS_SELECTOR, ".stats"))
    assert "tok/s" in stats and "TTFT" in stats and "tokens" in stats, stats
    screenshot(browser, "chat")
    # multi-turn, and kept in localStorage across a reload
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("12")  # the second turn only needs to exist
    second = _send(browser, "And one more?")
    wait_for(lambda: second.get_attribute("data-state") != "streaming", 120, what="the second answer")
    browser.refresh()
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 4, 10, what="the conversation after a reload")
    saved = json.loads(browser.execute_script("return localStorage.getItem('kiln.conversations')"))
    assert [m["role"] for m in saved[0]["messages"]] == ["user", "assistant", "user", "assistant"]


def test_stop_aborts_the_request_on_the_server(browser: Any, ui_url: str) -> None:
    aborted = _metric(ui_url, 'kiln:request_success_total{finish_reason="abort"}')
    _open_chat(browser, ui_url, max_tokens="1500", extra='{"ignore_eos": true}')
    answer = _send(browser, "Tell me a very long story about a lighthouse keeper.")
    wait_for(lambda: len(_text(answer.find_element(By.CSS_SELECTOR, ".content"))) > 20, 60, what="the answer to start")
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: answer.get_attribute("data-state") == "stopped", 10, what="the page to show the stop")
    wait_for(lambda: _metric(ui_url, 'kiln:request_success_total{finish_reason="abort"}') >= aborted + 1, 15,
             what="the abort in /metrics")
    wait_for(lambda: _metric(ui_url, "kiln:num_requests_running") == 0, 15, what="nothing running")
    assert "stopped" in _text(answer.find_element(By.CSS_SELECTOR, ".stats"))
    assert browser.find_element(By.ID, "send").is_enabled()
    screenshot(browser, "chat_stopped")


def test_markup_in_messages_renders_as_text(browser: Any, ui_url: str) -> None:
    _open_chat(browser, ui_url, max_tokens="24")
    answer = _send(browser, HOSTILE)
    wait_for(lambda: answer.get_attribute("data-state") != "streaming", 120, what="the answer")
    user = browser.find_elements(By.CSS_SELECTOR, ".msg.user .content")[-1]
    assert _text(user) == HOSTILE
    # a model answer full of markup, as if the model had written it: markdown renders, markup does not
    evil = ("Here:\n\n<img src=x onerror=\"window.__xss = 3\"><script>window.__xss = 4</script>\n\n"
            "**bold** and `<b>code</b>`\n\n```html\n<script>alert(1)</script>\n```\n[x](javascript:alert(1))")
    chat = json.loads(browser.execute_script("return localStorage.getItem('kiln.conversations')"))
    chat[0]["messages"].append({"role": "assistant", "content": evil, "stats": "", "state": "done"})
    browser.execute_script("localStorage.setItem('kiln.conversations', arguments[0])", json.dumps(chat))
    browser.refresh()
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 3, 10, what="the messages")
    messages = browser.find_element(By.ID, "messages")
    assert not messages.find_elements(By.CSS_SELECTOR, "img, script, b, a")
    last = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")[-1]
    assert "<img src=x" in _text(last) and "<script>window.__xss = 4</script>" in _text(last)
    assert _text(last.find_element(By.CSS_SELECTOR, "strong")) == "bold"
    assert _text(last.find_element(By.CSS_SELECTOR, "pre code")) == "<script>alert(1)</script>"
    assert browser.execute_script("return window.__xss") is None
    screenshot(browser, "chat_markup")


def test_dashboard_plots_update_under_load(browser: Any, ui_url: str) -> None:
    browser.get(ui_url + "/dashboard")

    def points(chart: str) -> int:
        return int(browser.find_element(By.ID, f"chart-{chart}").get_attribute("data-points") or 0)

    wait_for(lambda: points("requests") >= 2, 15, what="the first polls")
    before = points("tok_s")
    seen_running: list[str] = []

    def load() -> None:
        def one(i: int) -> None:
            httpx.post(ui_url + "/v1/chat/completions", timeout=120, json={
                "model": MODEL, "max_tokens": 48, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Count to twenty, take {i}."}]})
        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    loader = threading.Thread(target=load)
    loader.start()

    def busy() -> bool:
        text = _text(browser.find_element(By.CSS_SELECTOR, "#chart-requests .value"))
        seen_running.append(text)
        tok = _text(browser.find_element(By.CSS_SELECTOR, "#chart-tok_s .value")).split()[0]
        return tok not in ("–", "0.00") and not text.startswith("running 0.00")

    wait_for(busy, 60, interval=0.25, what="the plots to show the load")
    loader.join(timeout=180)
    assert not loader.is_alive()
    wait_for(lambda: _text(browser.find_element(By.CSS_SELECTOR, "#chart-requests .value")).startswith("running 0 "),
             15, what="the plots to show the load gone")
    wait_for(lambda: points("ttft") > 0 and points("itl") > 0, 15, what="latency percentiles")
    assert points("tok_s") > before
    assert int(browser.find_element(By.ID, "chart-kv").get_attribute("data-points")) > 0
    config = _text(browser.find_element(By.ID, "config"))
    for key in ("kv cache", "kernels", "decode step", "dtype", MODEL):
        assert key in config, key
    screenshot(browser, "dashboard", full_page=True)


def test_report_page_shows_every_table(browser: Any, ui_url: str) -> None:
    browser.get(ui_url + "/report")
    sections = browser.find_elements(By.CSS_SELECTOR, "section")
    assert [s.get_attribute("id") for s in sections] == list(report.TABLES)
    for name, table in report.TABLES.items():
        md = table()
        section = browser.find_element(By.ID, name)
        expected = md.count("\n|---") + md.startswith("|---")
        assert len(section.find_elements(By.TAG_NAME, "table")) == expected, name
        if md != "_not measured yet_":
            assert "not measured yet" not in _text(section), name
    assert browser.find_elements(By.CSS_SELECTOR, "svg.plot"), "no plots"
    screenshot(browser, "report", full_page=True)


def test_chat_page_weight_and_no_external_requests(browser: Any, ui_url: str) -> None:
    # a cold load: with the cache off every file is transferred and counted
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
    try:
        _open_chat(browser, ui_url)
    finally:
        browser.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": False})
    entries = browser.execute_script(
        "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))"
        ".map(e => ({name: e.name, transfer: e.transferSize, body: e.encodedBodySize}))")
    external = [e["name"] for e in entries if not e["name"].startswith(ui_url)]
    assert not external, f"requests off this server: {external}"
    # transferSize is 0 for a cached file: count the body then, so a warm cache cannot hide weight
    total = sum(max(e["transfer"], e["body"]) for e in entries)
    assert total < 200_000, f"the chat page loaded {total} bytes"
    print(f"chat page: {len(entries)} requests, {total} bytes")
    screenshot(browser, "chat_cold_load")  # the figure the README quotes (pytest -s)


def test_api_key_is_asked_once(_driver_session: Any, ui_engine: Any) -> None:
    from kiln.entrypoints.openai.api_server import build_app

    drv = _driver_session
    with serve(build_app(ui_engine, MODEL, api_key="sesame")) as url:
        drv.get(url + "/")
        alert = wait_for(lambda: _alert(drv), 10, what="the page to ask for the API key")
        alert.send_keys("sesame")
        alert.accept()
        wait_for(lambda: drv.find_elements(By.CSS_SELECTOR, "#model option"), 10, what="the models, with the key")
        drv.refresh()  # kept in localStorage: not asked again
        wait_for(lambda: drv.find_elements(By.CSS_SELECTOR, "#model option"), 10, what="the models after a reload")
        assert _alert(drv) is None
        answer = _send(drv, "Hi!")
        wait_for(lambda: answer.get_attribute("data-state") != "streaming", 120, what="an answer with the key")
        assert answer.get_attribute("data-state") == "done"
        screenshot(drv, "chat_api_key")
        drv.execute_script("localStorage.clear()")


def _alert(drv: Any) -> Any:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        alert = drv.switch_to.alert
        alert.text  # noqa: B018 (raises when there is none)
        return alert
    except NoAlertPresentException:
        return None
