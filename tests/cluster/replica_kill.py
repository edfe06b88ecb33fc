"""Load on the tiny model's two replicas, then a kill inside the busiest one: the harness shared by the
replica-failure tests, which differ only in what they kill (the replica's actor, or its engine core)."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import ray

# long enough that the replicas (reporting every 0.5 s) show them in flight even on a fast idle machine
MAX_TOKENS = 160


def replica_actor_names(app_name: str, deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(prefix)]


def kill_busiest_replica_under_load(serving_app, kill: Callable[[str], None], num_after: int = 0,
                                    ) -> tuple[str, list[tuple[int, dict]], list[list[str]], list[tuple[int, dict]]]:
    """Sends 12 plain and 4 streamed completions, waits until one replica holds >= 2 of them, calls
    kill(that replica's actor name), then sends `num_after` more plain ones. Returns (victim, plain
    results as (status, body), each stream's `data:` payloads, the later plain results)."""
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 0}
    started = threading.Event()

    def plain(index: int) -> tuple[int, dict]:
        with serving_app.client() as http:
            started.set()
            response = http.post("/v1/completions", json={**body, "prompt": f"{index} Once upon a time"})
            return response.status_code, response.json()

    def streamed(index: int) -> list[str]:
        with serving_app.client() as http:
            with http.stream("POST", "/v1/completions",
                             json={**body, "prompt": f"stream {index}", "stream": True, "logprobs": 0}) as response:
                assert response.status_code == 200
                return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]

    def busiest() -> str | None:
        rows = serving_app.replicas("tiny").values()
        row = max(rows, key=lambda r: r["running"] + r["waiting"])
        return row["replica"] if row["running"] + row["waiting"] >= 2 else None

    with ThreadPoolExecutor(16) as pool:
        plain_futures = [pool.submit(plain, index) for index in range(12)]
        stream_futures = [pool.submit(streamed, index) for index in range(4)]
        started.wait(10)
        replica_id = serving_app.wait_for(busiest, 30, "requests in flight", interval_s=0.1)
        [victim] = [name for name in replica_actor_names(serving_app.app_name, "model-tiny")
                    if name.endswith("#" + replica_id)]
        kill(victim)
        plain_results = [future.result(timeout=180) for future in plain_futures]
        stream_results = [future.result(timeout=180) for future in stream_futures]
        after = [future.result(timeout=180) for future in [pool.submit(plain, 100 + i) for i in range(num_after)]]
    return victim, plain_results, stream_results, after


def assert_nothing_lost(plain_results: list, stream_results: list, finish_reason: Optional[str] = None) -> None:
    """Every plain request completed in full; every stream ended with [DONE] after either the whole
    completion (with `finish_reason`, when given) or an explicit error as its last event: never a
    silent cut."""
    for status, payload in plain_results:
        assert status == 200, payload
        assert payload["usage"]["completion_tokens"] == MAX_TOKENS
    for events in stream_results:
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        finished = [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
        errors = [c for c in chunks if "error" in c]
        complete = bool(finished) and not errors and (
            finish_reason is None or finished[-1]["choices"][0]["finish_reason"] == finish_reason)
        assert complete or (errors and chunks[-1] is errors[0] and not finished), chunks
