"""`pagoda serve` as a real subprocess, for the CLI tests: start it, wait until it serves, stop it as a
user does (Ctrl-C or SIGTERM) and time how long it takes to exit. `ServeProcesses` kills whatever is
still running when the test ends, failed or not."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

CLI = [sys.executable, "-m", "pagoda.engine.entrypoints.cli", "serve"]
# NOTE: a cluster that the tests start themselves gets these too (conftest sets them for its own).
ENV = {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}


class ServeProcess:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        env = {key: value for key, value in os.environ.items() if key != "PAGODA_API_KEY"}
        env.update(ENV)
        with open(log, "wb") as out:
            self.process = subprocess.Popen(CLI + argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self) -> str:
        return self.output[-4000:]

    def wait_for_log(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output:
            assert self.process.poll() is None, f"exited ({self.process.returncode}) before {text!r}:\n{self.tail()}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout_s:.0f} s:\n{self.tail()}"
            time.sleep(0.5)

    def wait_serving(self, url: str, model: str, timeout_s: float) -> None:
        """Until a completion of `model` at `url` succeeds and the process says it serves there."""
        deadline = time.monotonic() + timeout_s
        while not completes(url, model):
            assert self.process.poll() is None, f"exited ({self.process.returncode}):\n{self.tail()}"
            assert time.monotonic() < deadline, f"not serving at {url} after {timeout_s:.0f} s:\n{self.tail()}"
            time.sleep(1)
        self.wait_for_log(f"serving on {url} (Ctrl-C to stop)", max(deadline - time.monotonic(), 5))

    def finish(self, timeout_s: float) -> tuple[int, str]:
        """For a process that exits by itself: (exit code, output)."""
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout_s:.0f} s:\n{self.tail()}") from None
        return code, self.output

    def stop(self, signum: int = signal.SIGINT, timeout_s: float = 60) -> tuple[int, float]:
        """Ctrl-C (or `signum`): (exit code, seconds until it exited)."""
        start = time.monotonic()
        self.process.send_signal(signum)
        code, _ = self.finish(timeout_s)
        return code, time.monotonic() - start

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


class ServeProcesses:
    """`with ServeProcesses(tmp_path) as start: start([...flags])` -> ServeProcess; all killed at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[ServeProcess] = []

    def __enter__(self) -> ServeProcesses:
        return self

    def __call__(self, argv: list[str]) -> ServeProcess:
        process = ServeProcess(argv, self.directory / f"serve-{len(self.started)}.log")
        self.started.append(process)
        return process

    def __iter__(self) -> Iterator[ServeProcess]:
        return iter(self.started)

    def __exit__(self, *exc_info: object) -> None:
        for process in self.started:
            process.kill()


def completes(url: str, model: str) -> bool:
    try:
        response = httpx.post(f"{url}/v1/completions", timeout=30,
                              json={"model": model, "prompt": "Once upon a time", "max_tokens": 5})
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5
