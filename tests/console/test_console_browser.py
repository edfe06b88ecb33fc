"""The console in headless Chromium against a real standalone server on CPU (the default model):
the playground streams a chat completion and copies it as a working curl command, the dashboard
shows the server's replica and its numbers move under load, and a server with an API key asks for
the key before the dashboard loads.
"""
from __future__ import annotations

import json
import shlex
import threading
import time

import httpx
import pytest

from .browser import ConsolePage
from .console_server import start_default_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMPT = "Write a short story about a brave little robot"
MAX_TOKENS = 32


def curl_request(command: str) -> tuple[str, dict, dict]:
    """(url, headers, JSON body) of a copied curl command; fails if it is not one."""
    words = shlex.split(command.replace("\\\n", " "))
    assert words and words[0] == "curl", f"not a curl command: {command!r}"
    urls = [word for word in words if word.startswith("http")]
    assert len(urls) == 1, f"expected one URL in {command!r}"
    headers, body = {}, None
    for flag, value in zip(words, words[1:]):
        if flag in ("-H", "--header"):
            name, _, header = value.partition(":")
            headers[name.strip()] = header.strip()
        elif flag in ("-d", "--data", "--data-raw", "--data-binary", "--json"):
            body = json.loads(value)
    assert body is not None, f"no JSON body in {command!r}"
    return urls[0], headers, body


def stream_chat(url: str, prompt: str, max_tokens: int) -> None:
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for _ in response.iter_lines():
            pass


def test_playground_streams_a_chat_completion_and_copies_it_as_curl(console_server, page_factory):
    page: ConsolePage = page_factory(console_server.url)
    page.open("/")
    page.click("#tab-playground")
    page.wait(lambda: "default" in [o.get_attribute("value") for o in page.find_all("#model option")]
              or page.text("#model") == "default", 20, "the model list to show 'default'")
    page.set("#model", "default")
    page.set("#mode", "chat")
    page.set("#max-tokens", MAX_TOKENS)
    page.set("#temperature", 0)
    page.find("#prompt").clear()
    page.find("#prompt").send_keys(PROMPT)
    assert page.text("#output") == ""

    page.click("#send")
    # the answer must arrive token by token: sample the output while it streams
    lengths: list[int] = []
    deadline = time.monotonic() + 60
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        length = len(page.text("#output"))
        if length and (not lengths or length != lengths[-1]):
            lengths.append(length)
            stable_since = time.monotonic()
        if lengths and page.number("#tps") is not None and time.monotonic() - stable_since > 1.5:
            break
        time.sleep(0.03)
    else:
        raise AssertionError(f"the stream did not finish in 60 s; output lengths {lengths}, "
                             f"#error {page.text('#error')!r}")
    assert len(lengths) >= 3 and lengths == sorted(lengths), \
        f"#output did not grow while streaming (lengths sampled: {lengths})"
    assert page.number("#ttft") is not None and page.number("#ttft") > 0, f"#ttft shows {page.text('#ttft')!r}"
    assert page.number("#tps") > 0, f"#tps shows {page.text('#tps')!r}"
    assert page.text("#error").strip() == ""

    page.click("#copy-curl")
    command = page.wait(lambda: page.text("#copied").strip(), 5, "#copied to show the command")
    url, headers, body = curl_request(command)
    assert url == f"{console_server.url}/v1/chat/completions", command
    assert body["model"] == "default" and body["max_tokens"] == MAX_TOKENS and body["temperature"] == 0, body
    assert body["messages"][-1] == {"role": "user", "content": PROMPT}, body
    # the copied command is the request the page sent: replaying it works
    with httpx.stream("POST", url, headers=headers, json=body, timeout=60) as replay:
        assert replay.status_code == 200, replay.read()
        events = [line for line in replay.iter_lines() if line.startswith("data: ")]
    assert len(events) > 2 and events[-1] == "data: [DONE]", events
    page.screenshot("playground-after-streaming")


def test_dashboard_shows_the_standalone_replica_and_its_numbers_move(console_server, page_factory):
    status_url = f"{console_server.url}/v1/cluster/status"

    def finished() -> int:
        [model] = httpx.get(status_url, timeout=10).json()["models"]
        return model["replica_stats"][0]["requests_finished_total"]

    page: ConsolePage = page_factory(console_server.url)
    page.open("/")
    page.click("#tab-dashboard")
    row = 'tr[data-replica="standalone"]'
    page.wait(lambda: page.visible(row), 20, f"the dashboard row {row}")
    assert page.visible("#dashboard")
    assert len(page.find_all("tr[data-replica]")) == 1
    first_refresh = page.wait(lambda: page.text("#last-refresh").strip(), 10, "#last-refresh")
    tps_before = page.number(f"{row} .tps")
    finished_before = finished()

    # two requests while the page polls: its tokens/s moves and it refreshes
    requests = [threading.Thread(target=stream_chat, args=(console_server.url, PROMPT, MAX_TOKENS))
                for _ in range(2)]
    for thread in requests:
        thread.start()

    def moved() -> bool:
        tps = page.number(f"{row} .tps")
        return tps is not None and tps > 0 and tps != tps_before and finished() >= finished_before + 2
    page.wait(moved, 45, f"{row} .tps to move above 0 (was {tps_before}) after two requests")
    for thread in requests:
        thread.join(60)
    # once the requests are done the page says so: nothing running, and it keeps refreshing
    page.wait(lambda: page.text(f"{row} .running").strip() == "0", 10, f"{row} .running to drop back to 0")
    page.wait(lambda: page.text("#last-refresh").strip() != first_refresh, 10, "#last-refresh to update")
    assert page.text(f"{row} .state").strip() == "running", page.text(f"{row} .state")
    for cell in ("running", "waiting", "kv", "ttft", "itl"):
        assert page.text(f"{row} .{cell}").strip(), f"{row} .{cell} is empty"
    assert page.number(f"{row} .ttft") is not None, f"{row} .ttft shows {page.text(f'{row} .ttft')!r}"
    for chart in ("#chart-tps", "#chart-queue", "#chart-kv", "#chart-ttft"):
        assert page.find_all(chart) and page.find(chart).tag_name == "canvas", f"no canvas {chart}"
    page.screenshot("dashboard")


def test_the_page_asks_for_the_api_key_then_loads_the_dashboard(browser_paths, page_factory, tmp_path):
    server = start_default_server(tmp_path, api_key="secret")
    row = 'tr[data-replica="standalone"]'

    def asks_for_the_key() -> bool:
        focused = page.driver.execute_script("return document.activeElement && document.activeElement.id")
        return page.visible("#api-key") and page.visible("#error") and "API key" in page.text("#error") \
            and focused == "api-key"
    try:
        assert httpx.get(f"{server.url}/v1/cluster/status", timeout=10).status_code == 401
        assert httpx.get(f"{server.url}/", timeout=10).status_code == 200      # the page itself is public
        page: ConsolePage = page_factory(server.url)
        page.open("/")
        page.click("#tab-dashboard")
        page.wait(asks_for_the_key, 20, "the API key prompt (#api-key focused, #error naming it) after a 401")
        assert not page.find_all(row)
        page.find("#api-key").send_keys("secret")
        page.click("#api-key-save")
        page.wait(lambda: page.visible(row), 20, "the dashboard once the key is saved")
        assert not page.visible("#error"), page.text("#error")
        # the key is kept for the browser session: a reload needs no prompt
        page.driver.refresh()
        page.click("#tab-dashboard")
        page.wait(lambda: page.visible(row), 20, "the dashboard after a reload")
        assert page.text("#api-key") == "secret" and not page.visible("#error"), page.text("#error")
        page.screenshot("dashboard-with-api-key")
    finally:
        server.stop()
