"""Helpers of the server tests: real `pagoda serve` subprocesses on free ports, metrics reads, waits.

(A uniquely named module rather than conftest.py, so `from .server_helpers import ...` never picks up
another folder's conftest.)
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx

API_KEY = "test-key"
MODEL_NAME = "tiny"
# The tiny model with a long context, so tests can run requests that outlast a shutdown timeout.
MAX_POSITION_EMBEDDINGS = 8192
STARTUP_TIMEOUT_S = 180.0
# NOTE: one torch thread per process. The test machines are shared and oversubscribed; OpenMP's
# spinning worker threads then make a tiny model's step ~10x slower than with one thread.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, **SUBPROCESS_ENV)
    env.pop("PAGODA_API_KEY", None)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    grpc_port: Optional[int]
    log_path: Path
    api_key: Optional[str] = API_KEY
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        return read_metrics(self.url)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(model_dir: Path, log_dir: Path, *flags: str, api_key: Optional[str] = API_KEY,
                 grpc: bool = False) -> ServerProcess:
    port = free_port()
    grpc_port = free_port() if grpc else None
    command = [sys.executable, "-m", "pagoda.engine.entrypoints.cli", "serve", str(model_dir), "--standalone",
               "--port", str(port), "--served-model-name", MODEL_NAME, "--kv-cache-memory-bytes", "16MiB",
               "--uvicorn-log-level", "warning", *flags]
    if grpc_port is not None:
        command += ["--grpc-port", str(grpc_port)]
    if api_key:
        command += ["--api-key", api_key]
    return spawn_server(command, port, log_dir / f"server-{port}.log", api_key, grpc_port)


def spawn_server(command: list[str], port: int, log_path: Path, api_key: Optional[str],
                 grpc_port: Optional[int] = None) -> ServerProcess:
    """Runs a `pagoda serve` `command` (listening on `port`, logging to `log_path`) and returns it
    once /health answers; raises with the log when it exits or stays unhealthy."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
    server = ServerProcess(process, port, grpc_port, log_path, api_key)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} during startup:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log()}")
        time.sleep(0.2)


def read_metrics(url: str) -> dict[str, float]:
    """`/metrics` as {'name{label="v",...}': value} with labels sorted (model_name included)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    labels = {"model_name": MODEL_NAME, **labels}
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return values.get(key, 0.0)


def wait_for(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


async def streams_cut_by(engine, prompts: list, params, kill) -> list:
    """Streams `prompts` on `engine` until each has output, checks the engine is healthy, calls
    `kill()` and returns the errors the streams ended with (within 10 s: no hang)."""
    import asyncio

    from pagoda.engine.errors import EngineDeadError

    started = asyncio.Event()
    errors: list[EngineDeadError] = []

    async def run(prompt) -> None:
        try:
            async for _ in engine.generate(prompt, params):
                started.set()
        except EngineDeadError as error:
            errors.append(error)

    tasks = [asyncio.create_task(run(prompt)) for prompt in prompts]
    await asyncio.wait_for(started.wait(), 30)
    assert await engine.is_healthy()
    kill()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    return errors


def child_pids(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (from /proc), sorted."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)
