"""Killing the engine core process inside a replica (the replica's actor lives on) under load: its
health check fails, Serve replaces it, and meanwhile nothing accepted is lost that had not started
streaming (the ingress retries it on the other replica); a stream that had started finishes or
ends with an error event, never silently."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray

pytestmark = pytest.mark.timeout(300)

MAX_TOKENS = 160


def _replica_actor_names(app_name: str, deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(prefix)]


def _engine_core_pid(actor_name: str) -> int:
    """The engine core process of a replica: the one child its actor process spawned."""
    actor_pid = ray.get(ray.get_actor(actor_name, namespace="serve").__ray_call__.remote(lambda _: os.getpid()),
                        timeout=30)
    cores = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == actor_pid and b"spawn_main" in command:
            cores.append(int(entry.name))
    assert len(cores) == 1, f"replica actor {actor_pid} has engine core processes {cores}"
    return cores[0]


def test_killing_a_replicas_engine_core_under_load_loses_no_request(serving_app):
    serving_app.wait_for(lambda: serving_app.running_replicas("model-tiny") == 2
                         and len(serving_app.replicas("tiny")) == 2, 120, "two tiny replicas")
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
        os.kill(_engine_core_pid(victim), signal.SIGKILL)
        plain_results = [future.result(timeout=180) for future in plain_futures]
        stream_results = [future.result(timeout=180) for future in stream_futures]
        # requests sent after the kill, before Serve has replaced the replica, are not lost either
        after = [future.result(timeout=180) for future in [pool.submit(plain, 100 + i) for i in range(4)]]

    for status, payload in plain_results + after:
        assert status == 200, payload
        assert payload["usage"]["completion_tokens"] == MAX_TOKENS
    for events in stream_results:
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        finished = [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
        errors = [c for c in chunks if "error" in c]
        assert (finished and not errors and finished[-1]["choices"][0]["finish_reason"] == "length") or \
               (errors and chunks[-1] is errors[0] and not finished), chunks

    # its health check failed, so Serve replaced the replica, and the new one serves
    deadline = time.monotonic() + 180
    while victim in _replica_actor_names(serving_app.app_name, "model-tiny") or \
            serving_app.running_replicas("model-tiny") < 2 or len(serving_app.replicas("tiny")) < 2:
        assert time.monotonic() < deadline, "the replica with the dead engine was not replaced"
        time.sleep(1)
    with serving_app.client() as http:
        assert http.get("/health").status_code == 200
        for index in range(4):
            response = http.post("/v1/completions", json={**body, "prompt": f"{index} after", "max_tokens": 8})
            assert response.status_code == 200, response.text
