"""Cluster test helpers: the tiny checkpoint, one local Ray cluster per session and the Serve app on it.

The Ray tests share one Ray cluster and one Serve application (`serving_app`), deployed once: replicas
take ~20 s each to start on the shared CPUs, far more than any test. Ray is shut down right after the
last test of this folder (`pytest_runtest_teardown`), so no idle cluster slows the folders after it. The app
serves the same tiny checkpoint under three names:

    tiny       TP=1, 2 fixed replicas, engine core process   routing, affinity, failures
    tiny-tp2   TP=2 (Ray actors, gloo, async scheduling), 1 replica, max_ongoing_requests=2, max_queued_requests=1
                                                parity with TP=1, back-pressure
    tiny-auto  TP=1, autoscaled 1..2 (target 2 in flight, delays 1 s / 3 s)

Tests that change the replica set (kill, autoscale) wait until it is back to its configured shape.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

import model_factory

API_KEY = "cluster-test-key"
API_KEY_ENV = "PAGODA_CLUSTER_TEST_KEY"
APP_NAME = "pagoda-test"
ENGINE_ARGS = {"kv_cache_memory_bytes": 16777216, "device": "cpu", "max_num_seqs": 16}
LOGICAL_CPUS = 16


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint) -> Path:
    return tiny_checkpoint(model_factory.TinyModelSpec())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict[str, Any]]:
    """A local Ray cluster with Serve's HTTP proxy on a free port."""
    ray = pytest.importorskip("ray")
    from ray import serve

    # NOTE: set before ray.init: every worker process (replicas, TP actors) inherits them.
    os.environ.update({
        "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", API_KEY_ENV: API_KEY,
        # queue-length probes answer slowly on busy shared cores; 0.1 s makes the router log warnings
        "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0",
    })
    ray.init(num_cpus=LOGICAL_CPUS, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def stop() -> None:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()

    _LEAVING_FOLDER.append(stop)
    try:
        yield {"port": port, "address": ray.get_runtime_context().gcs_address}
    finally:
        stop()


_LEAVING_FOLDER: list[Callable[[], None]] = []


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After this folder's last test: stop Ray (session fixtures would keep it until the session ends)."""
    if nextitem is None or Path(nextitem.path).parent != Path(__file__).parent:
        while _LEAVING_FOLDER:
            _LEAVING_FOLDER.pop()()


@dataclass
class ServingApp:
    url: str
    app_name: str

    def client(self, api_key: str | None = API_KEY, timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def status(self) -> list[dict[str, Any]]:
        from ray import serve

        return serve.get_app_handle(self.app_name).status.remote().result(timeout_s=30)

    def replicas(self, model: str) -> dict[str, dict[str, Any]]:
        return {row["replica"]: row for row in self.status() if row["model"] == model}

    def wait_for(self, condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(interval_s)

    def running_replicas(self, deployment: str) -> int:
        from ray import serve

        application = serve.status().applications[self.app_name]
        states = application.deployments[deployment].replica_states
        return sum(count for state, count in states.items() if str(getattr(state, "value", state)) == "RUNNING")


@pytest.fixture(scope="session")
def serving_app(ray_cluster, tiny_model) -> ServingApp:
    from ray import serve

    from pagoda.cluster.app import ClusterTuning, build_application

    common = {"model": str(tiny_model), "num_gpus_per_worker": 0, "engine_args": ENGINE_ARGS}
    args = {
        "api_key_env": API_KEY_ENV,
        "max_request_body_bytes": 65536,
        "models": [
            # the engine core in its own process, as on GPU (a child of the replica actor)
            {**common, "served_model_name": "tiny", "num_replicas": 2,
             "engine_args": {**ENGINE_ARGS, "engine_core_process": True}},
            # async scheduling as on GPU: the Ray executor's deferred replies (Worker.step)
            {**common, "served_model_name": "tiny-tp2", "tensor_parallel_size": 2, "num_replicas": 1,
             "engine_args": {**ENGINE_ARGS, "async_scheduling": True},
             "max_ongoing_requests": 2, "max_queued_requests": 1, "target_ongoing_requests": 1},
            {**common, "served_model_name": "tiny-auto", "min_replicas": 1, "max_replicas": 2,
             "target_ongoing_requests": 2, "upscale_delay_s": 1, "downscale_delay_s": 3},
        ],
    }
    tuning = ClusterTuning(routing_stats_period_s=0.5, look_back_period_s=2.0, health_check_period_s=2.0,
                           graceful_shutdown_timeout_s=5.0)
    serve.run(build_application(args, tuning), name=APP_NAME, route_prefix="/")
    app = ServingApp(url=f"http://127.0.0.1:{ray_cluster['port']}", app_name=APP_NAME)
    # Every replica has reported once, so tests can diff stats from here.
    app.wait_for(lambda: len(app.status()) == 4, 60, "every replica's first report")
    return app
