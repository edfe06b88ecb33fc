"""The console against a Ray Serve app (a local Ray cluster on CPU, the tiny random model, two fixed
replicas): the dashboard shows one row per replica, the same replicas the status document lists.

Skipped without Ray, as the cluster tests are.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterator

import httpx
import pytest

import model_factory

from .browser import ConsolePage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

APP_NAME = "pagoda-console-test"
MODEL = "tiny"
ENGINE_ARGS = {"kv_cache_memory_bytes": 16777216, "device": "cpu", "max_num_seqs": 8}
# NOTE: set before ray.init, so every replica process inherits them (one torch thread: shared CPUs).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app_url(browser_paths, tiny_checkpoint) -> Iterator[str]:
    """A local Ray cluster serving the tiny model on two replicas; stopped after this module."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from pagoda.cluster.app import ClusterTuning, build_application

    model: Path = tiny_checkpoint(model_factory.TinyModelSpec())
    saved = {name: os.environ.get(name) for name in RAY_ENV}
    os.environ.update(RAY_ENV)
    ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"models": [{"model": str(model), "served_model_name": MODEL, "num_gpus_per_worker": 0,
                            "engine_args": ENGINE_ARGS, "num_replicas": 2}]}
        tuning = ClusterTuning(routing_stats_period_s=0.5, look_back_period_s=2.0, health_check_period_s=2.0,
                               graceful_shutdown_timeout_s=5.0)
        serve.run(build_application(args, tuning), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def replica_ids(url: str) -> list[str]:
    document = httpx.get(f"{url}/v1/cluster/status", timeout=30).json()
    assert document["mode"] == "ray", document
    [model] = [m for m in document["models"] if m["name"] == MODEL]
    return sorted(stats["replica"] for stats in model["replica_stats"])


def test_dashboard_shows_both_replicas_of_a_ray_app(ray_app_url, page_factory):
    page: ConsolePage = page_factory(ray_app_url)
    page.open("/")
    page.click("#tab-dashboard")

    def rows() -> list[str]:
        return sorted(row.get_attribute("data-replica") for row in page.find_all("tr[data-replica]"))
    shown = page.wait(lambda: len(rows()) == 2 and rows(), 60, "two replica rows")
    assert len(set(shown)) == 2 and "standalone" not in shown, shown
    assert shown == replica_ids(ray_app_url)
    for replica in shown:
        state = page.text(f'tr[data-replica="{replica}"] .state').strip()
        assert state == "running", f"replica {replica} shows state {state!r}"
    assert "ray" in page.text("#last-refresh"), page.text("#last-refresh")

    # a request through the Serve proxy shows up on one of the two rows
    response = httpx.post(f"{ray_app_url}/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "hello", "max_tokens": 16, "ignore_eos": True})
    assert response.status_code == 200, response.text
    page.wait(lambda: any((page.number(f'tr[data-replica="{r}"] .tps') or 0) > 0 for r in shown), 20,
              "tokens/s above 0 on a replica row after a request")
    page.screenshot("dashboard-ray")


def test_replica_counts_come_from_serves_controller(ray_app_url):
    """The ingress reads Serve's own view (target and replica states) from the controller; this reads
    the same answer from the test's side and checks the document agrees with it."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    from pagoda.cluster.ingress import deployment_views

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    views = deployment_views(ray.get(controller.get_serve_instance_details.remote()), APP_NAME)
    [view] = [v for v in views.values() if len(v.replica_states) == 2]
    assert view.target == 2 and set(view.replica_states.values()) == {"RUNNING"}, view
    document = httpx.get(f"{ray_app_url}/v1/cluster/status", timeout=30).json()
    [model] = [m for m in document["models"] if m["name"] == MODEL]
    assert (model["replicas"]["current"], model["replicas"]["target"]) == (2, 2), model["replicas"]
    assert sorted(view.replica_states) == replica_ids(ray_app_url)
