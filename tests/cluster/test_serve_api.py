"""The OpenAI server's API behaviour through the Ray Serve ingress: authentication, error statuses (also
for errors raised inside a replica), back-pressure, per-replica /metrics, `pagoda status`."""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagoda.cluster import cli as cluster_cli

pytestmark = pytest.mark.timeout(300)


def test_api_key_is_required_on_inference_routes(serving_app):
    with serving_app.client(api_key=None) as http:
        response = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200                      # probes stay open
        assert http.get("/metrics").status_code == 200
    with serving_app.client(api_key="wrong") as http:
        assert http.post("/v1/chat/completions", json={"model": "tiny", "messages": []}).status_code == 401
        assert http.get("/v1/models").status_code == 401


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (json.dumps({"model": "tiny", "prompt": "hi", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": "5"}).encode(), 400, "max_tokens"),
    # raised inside the replica (prompt longer than the context): the client sees the engine's message
    (json.dumps({"model": "tiny", "prompt": list(range(3, 300))}).encode(), 400, "max_model_len"),
    (json.dumps({"model": "tiny", "prompt": [100000]}).encode(), 400, "outside the vocabulary"),
    (json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(), 404, "does not exist"),
    (json.dumps({"model": "tiny", "prompt": "x" * 70000}).encode(), 413, "over the limit"),
])
def test_errors_have_the_servers_statuses(serving_app, body, status, fragment):
    with serving_app.client() as http:
        response = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert fragment in message and "Traceback" not in message and "ray::" not in message


def test_errors_inside_a_stream_request_are_statuses_too(serving_app):
    with serving_app.client() as http:
        response = http.post("/v1/chat/completions", json={
            "model": "tiny", "stream": True, "max_tokens": 300,
            "messages": [{"role": "user", "content": "hello " * 300}]})
    assert response.status_code == 400 and "max_model_len" in response.json()["error"]["message"]


def test_back_pressure_answers_503_with_retry_after(serving_app):
    # tiny-tp2 takes 2 requests at once and queues 1 more at the router: the rest are refused.
    # NOTE: one at a time, not a burst: Serve counts a request as queued while it is being routed,
    # so two that arrive together at an idle replica can already overflow a queue of 1.
    # (max_tokens: what fits the tiny model's 256-token context, so each runs for seconds)
    body = {"model": "tiny-tp2", "prompt": "Once upon a time", "max_tokens": 240, "ignore_eos": True}

    def post(_: int = 0) -> httpx.Response:
        with serving_app.client() as http:
            return http.post("/v1/completions", json=body)

    with ThreadPoolExecutor(3) as pool:
        running = []
        for _ in range(2):
            running.append(pool.submit(post))
            time.sleep(0.5)             # routed and running by now (each runs for seconds)
        queued = pool.submit(post)
        time.sleep(0.5)                 # waiting in the router's queue by now
        refused = [post() for _ in range(2)]
        served = [future.result(timeout=120) for future in [*running, queued]]
    assert [r.status_code for r in served] == [200, 200, 200], [r.text for r in served]
    assert [r.status_code for r in refused] == [503, 503], [r.text for r in refused]
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full" for r in refused)


def test_metrics_are_per_replica(serving_app):
    with serving_app.client() as http:
        http.post("/v1/completions", json={"model": "tiny", "prompt": "metrics please", "max_tokens": 2})
    rows = serving_app.status()

    def scraped() -> dict | None:
        with serving_app.client(api_key=None) as http:
            text = http.get("/metrics").text
        families = {family.name: family for family in text_string_to_metric_families(text)}
        running = families.get("pagoda:num_requests_running")
        success = families.get("pagoda:request_success")
        # NOTE: replicas report every 0.5 s: the request's success counter appears with the next report
        if not running or len(running.samples) < len(rows) or not success or not success.samples:
            return None
        return families

    families = serving_app.wait_for(scraped, 30, "every replica in /metrics")
    series = {(s.labels["model_name"], s.labels["replica"]) for s in families["pagoda:num_requests_running"].samples}
    assert {(row["model"], row["replica"]) for row in rows} <= series
    assert "pagoda:time_to_first_token_seconds" in families and "pagoda:request_success" in families
    success = [s for s in families["pagoda:request_success"].samples if s.name.endswith("_total")]
    assert all("replica" in s.labels for s in success) and success


def test_pagoda_status_prints_replicas(serving_app, capsys):
    assert cluster_cli.status(argparse.Namespace(address=None, app_name=serving_app.app_name)) == 0
    out = capsys.readouterr().out
    assert "model-tiny" in out and "model-tiny-tp2" in out and "RUNNING" in out
    for row in serving_app.status():
        assert row["replica"] in out
    assert cluster_cli.status(argparse.Namespace(address=None, app_name="no-such-app")) == 1
