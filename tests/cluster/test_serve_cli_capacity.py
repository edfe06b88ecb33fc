"""`pagoda serve` on a Ray cluster of 2 CPUs and no GPU (the size of a small machine): a deployment that
can never be placed fails within seconds with the arithmetic and the flags to change, instead of
waiting forever; two replicas and the ingress, by default, fit and serve.

The cluster is a local Ray instance of its own (not conftest's 16 logical CPUs), held by a small
Python process: closing its stdin shuts that Ray down, and the fixture kills it if that hangs.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from cli_process import ENV, ServeProcesses
from conftest import free_port

pytestmark = pytest.mark.timeout(600)

# Starts Ray with 2 CPUs, prints its address, and stops it when stdin closes.
_HOLD_RAY = """
import sys, ray
ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""


@pytest.fixture(scope="module")
def two_cpu_cluster() -> Iterator[str]:
    pytest.importorskip("ray")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, **ENV}, text=True)
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 120)
        address = holder.stdout.readline().strip() if ready else ""
        assert address, f"the 2-CPU Ray cluster did not start (exit code {holder.poll()})"
        yield address
    finally:
        holder.stdin.close()
        try:
            holder.wait(60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait(30)


def test_what_two_cores_cannot_hold_fails_fast_and_two_replicas_fit(two_cpu_cluster, tiny_model, tmp_path):
    port = free_port()
    flags = [str(tiny_model), "--address", two_cpu_cluster, "--port", str(port), "--device", "cpu",
             "--kv-cache-memory-bytes", "16MiB", "--served-model-name", "tiny2"]
    with ServeProcesses(tmp_path) as start:
        started = time.monotonic()
        three = start(flags + ["--num-replicas", "3"])
        gpus = start(flags + ["--num-gpus-per-worker", "1"])
        for process in (three, gpus):
            code, output = process.finish(90)      # never "waits forever"
            assert code == 2, output[-3000:]
        assert time.monotonic() - started < 90
        assert ("application 'pagoda' cannot be scheduled on this Ray cluster: 3 replicas of model 'tiny2' × "
                "0.5 CPU = 1.5 + 1 replica of the ingress × 1 CPU = 1: 2.5 CPU needed, the cluster has 2 CPU on "
                "1 node") in three.output, three.tail()
        assert "change --num-replicas, --num-cpus-per-worker or --ingress-replicas" in three.output
        assert "--wait-for-nodes" in three.output
        assert ("one replica of model 'tiny2' needs 1 CPU + 1 GPU on a single node, and the cluster has no GPU"
                in gpus.output), gpus.tail()
        assert "change --num-gpus-per-worker (0 runs on CPU)" in gpus.output

        # The default share of a CPU-only worker (half a core): 2 × 0.5 + the ingress's 1 = 2 CPUs.
        two = start(flags + ["--num-replicas", "2"])
        two.wait_serving(f"http://127.0.0.1:{port}", "tiny2", timeout_s=300)
        code, seconds = two.stop(signal.SIGINT)
        assert code == 0 and seconds < 30, (seconds, two.tail())
    # ... and its application went with it (Serve may still be finishing the delete for a moment)
    deadline = time.monotonic() + 60
    while True:
        status = subprocess.run([sys.executable, "-m", "pagoda.engine.entrypoints.cli", "status", "--address",
                                 two_cpu_cluster], check=False, capture_output=True, text=True, timeout=120,
                                env={**os.environ, **ENV})
        if status.returncode == 1 and "no Serve application 'pagoda'" in status.stderr:
            break
        assert time.monotonic() < deadline, status.stdout[-2000:] + status.stderr[-2000:]
        time.sleep(2)
