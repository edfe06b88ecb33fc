"""Killing a replica actor under load: no non-streamed request is lost (each is retried once on the other
replica), no stream is silently truncated (it finishes, or ends with an error event), and Serve brings
up a replacement."""
from __future__ import annotations

import time

import pytest
import ray
from replica_kill import assert_nothing_lost, kill_busiest_replica_under_load, replica_actor_names

pytestmark = pytest.mark.timeout(300)

def test_killing_a_replica_under_load_loses_no_request(serving_app):
    assert serving_app.running_replicas("model-tiny") == 2
    victim, plain_results, stream_results, _ = kill_busiest_replica_under_load(
        serving_app, lambda name: ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True))

    assert_nothing_lost(plain_results, stream_results)

    deadline = time.monotonic() + 120
    while serving_app.running_replicas("model-tiny") < 2 or len(serving_app.replicas("tiny")) < 2:
        assert time.monotonic() < deadline, "no replacement replica came up"
        time.sleep(1)
    assert victim not in replica_actor_names(serving_app.app_name, "model-tiny")
