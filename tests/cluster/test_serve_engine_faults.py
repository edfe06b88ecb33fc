"""Killing the engine core process inside a replica (the replica's actor lives on) under load: its
health check fails, Serve replaces it, and meanwhile nothing accepted is lost that had not started
streaming (the ingress retries it on the other replica); a stream that had started finishes or
ends with an error event, never silently."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import ray
from replica_kill import assert_nothing_lost, kill_busiest_replica_under_load, replica_actor_names

pytestmark = pytest.mark.timeout(300)

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
    victim, plain_results, stream_results, after = kill_busiest_replica_under_load(
        serving_app, lambda name: os.kill(_engine_core_pid(name), signal.SIGKILL), num_after=4)
    # (the `after` requests are sent after the kill, before Serve has replaced the replica: not lost either)

    assert_nothing_lost(plain_results + after, stream_results, finish_reason="length")

    # its health check failed, so Serve replaced the replica, and the new one serves
    deadline = time.monotonic() + 180
    while victim in replica_actor_names(serving_app.app_name, "model-tiny") or \
            serving_app.running_replicas("model-tiny") < 2 or len(serving_app.replicas("tiny")) < 2:
        assert time.monotonic() < deadline, "the replica with the dead engine was not replaced"
        time.sleep(1)
    with serving_app.client() as http:
        assert http.get("/health").status_code == 200
        for index in range(4):
            response = http.post("/v1/completions", json={"model": "tiny", "prompt": f"{index} after", "max_tokens": 8,
                                                            "ignore_eos": True, "temperature": 0})
            assert response.status_code == 200, response.text
