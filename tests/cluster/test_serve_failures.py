"""Killing a replica actor under load: no non-streamed request is lost (each is retried once on the other
replica), no stream is silently truncated (it finishes, or ends with an error event), and Serve brings
up a replacement."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

pytestmark = pytest.mark.timeout(300)

# long enough that the replicas (reporting every 0.5 s) show them in flight even on a fast idle machine
MAX_TOKENS = 160


def _replica_actor_names(app_name: str, deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(prefix)]


def test_killing_a_replica_under_load_loses_no_request(serving_app):
    assert serving_app.running_replicas("model-tiny") == 2
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 0}
    started = threading.Event()

    def plain(index: int) -> tuple[int, dict]:
        with serving_app.client() as http:
            started.set()
            response = http.post("/v1/completions", json={**body, "prompt": f"{index} Once upon a time"})
            return response.status_code, response.json()

    def streamed(index: int) -> list:
        with serving_app.client() as http:
            with http.stream("POST", "/v1/completions",
                             json={**body, "prompt": f"stream {index}", "stream": True, "logprobs": 0}) as response:
                assert response.status_code == 200
                return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]

    with ThreadPoolExecutor(16) as pool:
        plain_futures = [pool.submit(plain, index) for index in range(12)]
        stream_futures = [pool.submit(streamed, index) for index in range(4)]
        started.wait(10)

        def busiest() -> str | None:
            rows = serving_app.replicas("tiny").values()
            row = max(rows, key=lambda r: r["running"] + r["waiting"])
            return row["replica"] if row["running"] + row["waiting"] >= 2 else None

        replica_id = serving_app.wait_for(busiest, 30, "requests in flight", interval_s=0.1)
        [victim] = [name for name in _replica_actor_names(serving_app.app_name, "model-tiny")
                    if name.endswith("#" + replica_id)]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        plain_results = [future.result(timeout=180) for future in plain_futures]
        stream_results = [future.result(timeout=180) for future in stream_futures]

    for status, payload in plain_results:
        assert status == 200, payload
        assert payload["usage"]["completion_tokens"] == MAX_TOKENS
    for events in stream_results:
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        finished = [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
        errors = [c for c in chunks if "error" in c]
        # either the whole completion, or an explicit error as the last event: never a silent cut
        assert (finished and not errors and len([c for c in chunks if c.get("choices")]) >= 1) or \
               (errors and chunks[-1] is errors[0] and not finished), chunks

    deadline = time.monotonic() + 120
    while serving_app.running_replicas("model-tiny") < 2 or len(serving_app.replicas("tiny")) < 2:
        assert time.monotonic() < deadline, "no replacement replica came up"
        time.sleep(1)
    assert victim not in _replica_actor_names(serving_app.app_name, "model-tiny")
