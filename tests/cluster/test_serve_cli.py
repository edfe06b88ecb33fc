"""`pagoda serve MODEL --address ...` (the Ray path of the CLI) as a real subprocess: it joins the test's
Ray cluster, deploys its own application under a route prefix, serves, and removes it on Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(300)

APP_NAME = "pagoda-cli-test"


def test_pagoda_serve_deploys_serves_and_cleans_up(ray_cluster, tiny_model, tmp_path):
    from ray import serve

    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "pagoda.engine.entrypoints.cli", "serve", str(tiny_model),
               "--address", ray_cluster["address"], "--app-name", APP_NAME, "--route-prefix", "/cli",
               "--port", str(ray_cluster["port"]), "--num-replicas", "1", "--device", "cpu",
               "--kv-cache-memory-bytes", "16MiB", "--served-model-name", "cli-tiny"]
    env = {key: value for key, value in os.environ.items() if key != "PAGODA_API_KEY"}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{ray_cluster['port']}/cli"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                response = httpx.post(f"{url}/v1/completions", timeout=30,
                                      json={"model": "cli-tiny", "prompt": "Once upon a time", "max_tokens": 5})
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert response.json()["usage"]["completion_tokens"] == 5
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "cli-tiny"
        while "serving on http://" not in log.read_text():
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
    assert code == 0, log.read_text()[-3000:]
    assert APP_NAME not in serve.status().applications
