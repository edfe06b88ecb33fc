"""`pagoda serve MODEL --address ...` (the Ray path of the CLI) as real subprocesses on the test's Ray
cluster: one deploys its own application under a route prefix, serves, and removes it on Ctrl-C; two
of them (and an application someone else deployed) share the cluster without disturbing each other."""
from __future__ import annotations

import signal
import time

import httpx
import pytest
from cli_process import ServeProcesses, completes
from conftest import free_port

pytestmark = pytest.mark.timeout(600)

APP_NAME = "pagoda-cli-test"
MINE, THEIRS = "pagoda-cli-mine", "pagoda-cli-theirs"
# Ctrl-C must end `pagoda serve` within seconds (it waits for Serve's delete 10 s at most).
EXIT_WITHIN_S = 30


def _flags(ray_cluster, tiny_model, *extra: str) -> list[str]:
    return [str(tiny_model), "--address", ray_cluster["address"], "--port", str(ray_cluster["port"]),
            "--num-replicas", "1", "--device", "cpu", "--kv-cache-memory-bytes", "16MiB", *extra]


def _wait_gone(app_name: str, timeout_s: float = 60) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while app_name in serve.status().applications:
        assert time.monotonic() < deadline, f"application {app_name!r} still there after {timeout_s:.0f} s"
        time.sleep(0.5)


def test_pagoda_serve_deploys_serves_and_cleans_up(ray_cluster, tiny_model, tmp_path):
    url = f"http://127.0.0.1:{ray_cluster['port']}/cli"
    with ServeProcesses(tmp_path) as start:
        process = start(_flags(ray_cluster, tiny_model, "--app-name", APP_NAME, "--route-prefix", "/cli",
                               "--served-model-name", "cli-tiny"))
        try:
            process.wait_serving(url, "cli-tiny", timeout_s=180)     # and it printed that very URL
            assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "cli-tiny"
        finally:
            code, seconds = process.stop(signal.SIGINT)
    assert code == 0, process.tail()
    assert seconds < EXIT_WITHIN_S, f"{seconds:.0f} s to stop:\n{process.tail()}"
    _wait_gone(APP_NAME)


def test_two_pagoda_serve_processes_and_someone_elses_app_share_a_cluster(ray_cluster, tiny_model, tmp_path):
    from ray import serve

    port = ray_cluster["port"]

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Theirs:
        def __call__(self, request) -> str:
            return "theirs"

    serve.run(Theirs.bind(), name=THEIRS, route_prefix="/theirs")
    theirs_deployed_at = serve.status().applications[THEIRS].last_deployed_time_s
    try:
        with ServeProcesses(tmp_path) as start:
            # 1. What would disturb others is refused before anything changes (side by side: each run
            #    is mostly Python's and Ray's start-up).
            same_name = start(_flags(ray_cluster, tiny_model, "--app-name", THEIRS, "--route-prefix", "/mine"))
            same_route = start(_flags(ray_cluster, tiny_model, "--app-name", MINE, "--route-prefix", "/theirs"))
            other_port = free_port()
            wrong_port = start(_flags(ray_cluster, tiny_model, "--app-name", MINE, "--route-prefix", "/mine",
                                      "--port", str(other_port)))      # the last --port wins
            for refused in (same_name, same_route, wrong_port):
                code, output = refused.finish(120)
                assert code == 2, output[-3000:]
            assert (f"a Serve application named {THEIRS!r} already runs on this Ray cluster"
                    in same_name.output), same_name.tail()
            assert "deployed by someone else (not `pagoda serve`)" in same_name.output
            assert "--app-name NAME" in same_name.output and "--replace" in same_name.output
            assert f"route prefix '/theirs' is taken by Serve application {THEIRS!r}" in same_route.output
            assert "--route-prefix" in same_route.output
            assert f"HTTP proxy on port {port}" in wrong_port.output, wrong_port.tail()
            assert f"--port {other_port} cannot be honoured" in wrong_port.output
            assert serve.status().applications[THEIRS].last_deployed_time_s == theirs_deployed_at

            # 2. The first `pagoda serve` deploys beside them.
            url = f"http://127.0.0.1:{port}/mine"
            first = start(_flags(ray_cluster, tiny_model, "--app-name", MINE, "--route-prefix", "/mine",
                                 "--served-model-name", "mine"))
            first.wait_serving(url, "mine", timeout_s=240)

            # 3. A second one with the same name refuses, naming the first ...
            code, output = start(_flags(ray_cluster, tiny_model, "--app-name", MINE, "--route-prefix", "/mine2")
                                 ).finish(120)
            assert code == 2 and f"deployed by `pagoda serve` (pid {first.pid} on " in output, output[-3000:]
            # ... unless told to --replace it.
            second = start(_flags(ray_cluster, tiny_model, "--app-name", MINE, "--route-prefix", "/mine",
                                  "--served-model-name", "mine", "--replace"))
            second.wait_serving(url, "mine", timeout_s=240)
            assert "replacing Serve application" in second.output

            # 4. Ctrl-C on the first: it exits within seconds and leaves the application, now the second's.
            code, seconds = first.stop(signal.SIGINT)
            assert code == 0 and seconds < EXIT_WITHIN_S, (seconds, first.tail())
            assert f"leaving Serve application {MINE!r} alone" in first.output
            assert MINE in serve.status().applications and completes(url, "mine")

            # 5. SIGTERM on the second: it deletes its own application, and only that.
            code, seconds = second.stop(signal.SIGTERM)
            assert code == 0 and seconds < EXIT_WITHIN_S, (seconds, second.tail())
            _wait_gone(MINE)
        theirs = serve.status().applications[THEIRS]
        assert theirs.status == "RUNNING" and theirs.last_deployed_time_s == theirs_deployed_at
        assert httpx.get(f"http://127.0.0.1:{port}/theirs", timeout=30).text == "theirs"
    finally:
        for name in (MINE, THEIRS):
            if name in serve.status().applications:
                serve.delete(name)
