"""Autoscaling by queue depth: `tiny-auto` (1..2 replicas, target 2 requests in flight per replica, upscale
after 1 s, downscale after 3 s) grows to 2 replicas under sustained load and shrinks back when idle."""
from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.timeout(300)

DEPLOYMENT = "model-tiny-auto"


def test_scales_out_under_load_and_back_when_idle(serving_app):
    assert serving_app.running_replicas(DEPLOYMENT) == 1
    stop = threading.Event()
    errors: list[str] = []

    def client_loop(index: int) -> None:
        body = {"model": "tiny-auto", "prompt": f"{index} Once upon a time", "max_tokens": 64, "ignore_eos": True}
        with serving_app.client() as http:
            while not stop.is_set():
                response = http.post("/v1/completions", json=body)
                if response.status_code != 200:
                    errors.append(response.text)

    clients = [threading.Thread(target=client_loop, args=(index,), daemon=True) for index in range(8)]
    for thread in clients:
        thread.start()
    try:
        # 8 in flight against a target of 2 per replica: Serve asks for more, capped at max_replicas=2.
        serving_app.wait_for(lambda: serving_app.running_replicas(DEPLOYMENT) == 2, 150, "a second replica",
                             interval_s=1.0)
        # the new replica takes work: both report generated tokens while the load lasts
        serving_app.wait_for(lambda: len([r for r in serving_app.replicas("tiny-auto").values()
                                          if r["generation_tokens"] > 0]) == 2, 60, "both replicas busy")
    finally:
        stop.set()
        for thread in clients:
            thread.join(120)
    assert not errors, errors[:3]
    serving_app.wait_for(lambda: serving_app.running_replicas(DEPLOYMENT) == 1, 90, "scale-down to 1",
                         interval_s=1.0)
