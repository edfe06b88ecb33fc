"""Cold start: how long a new server (or Ray Serve replica) takes to serve, and where the time goes.

    # one H100, llama3-8b shape with random weights: the standalone server, then a Ray replica
    python -m bench.startup --model llama3-8b-random --dtype bfloat16
    python -m bench.startup --model llama3-8b-random --dtype bfloat16 --ray
    # CPU, the default model (SmolLM2 GGUF)
    python -m bench.startup --model default --device cpu --repeat 3

Standalone: starts `pagoda serve MODEL --standalone` as a subprocess. With --ray: a subprocess
starts a local Ray cluster and Serve (untimed), then deploys the one-replica app of
`bench/cluster_bench.py` (`pagoda.cluster.app:build_app`); the clock starts at the deploy. Either
way it polls `/health` every 0.1 s until 200, then a 1-token completion until 200 (ready = that
answer), stops the server, and prints the phases the server's processes logged (the `start-up:`
lines of `engine/utils/startup_timeline.py`; under Ray, the replica's and its engine core's, which
Ray forwards to the driver's output) in one table, each with its duration, its time since its own
process started, and its time since launch (from the line's log timestamp); a `process started` row
per process (so the engine core's spawn shows against the server's phases); and the client's view:
/health up, first completion. What the table shows as `Serve deploy + health checks` is the time
from the replica's constructor returning to the first completion.

`--model llama3-8b-random` writes the shape's config.json (bench/models.py) and a word-level
tokenizer (`cluster_bench.add_word_tokenizer`) and loads with `--load-format dummy`; `--model
default` is the real SmolLM2 GGUF. --repeat N runs it N times and reports the median total.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional

import httpx

if __package__ in (None, ""):          # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.models import resolve_bench_model, server_engine_args  # noqa: E402

# the packages whose imports are most of a cold start (a host without their bytecode compiles them in
# every new process: imports several times slower than after a pip install, which compiles it)
HEAVY_PACKAGES = ("torch", "transformers", "triton")
SERVED_NAME = "bench"
APP_NAME = "pagoda-startup"
READY_TIMEOUT_S = 1800.0
POLL_INTERVAL_S = 0.1
DEPLOY_MARK = "bench-startup: deploying at"          # the Ray driver's clock start (unix time)

# `INFO 2026-12-07 13:34:15,953 pagoda.startup: start-up: weights 16.01 s (at 23.6 s; pagoda-engine-core pid 2571)`
_LINE = re.compile(r"(?:(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+: )?start-up: (?P<phase>.+?) "
                   r"(?P<duration>\d+(?:\.\d+)?) s \(at (?P<at>\d+(?:\.\d+)?) s; (?P<process>\S+) pid (?P<pid>\d+)\)")
_STAMP_FORMAT = "%Y-%m-%d %H:%M:%S,%f"


@dataclass(frozen=True)
class Phase:
    """One `start-up:` line. wall_time: the log line's timestamp (unix time), None without one."""
    phase: str
    duration_s: float
    at_s: float                    # since its own process started
    process: str                   # the multiprocessing name: MainProcess, pagoda-engine-core, ...
    pid: int
    wall_time: Optional[float] = None


def parse_timeline(lines: Iterable[str]) -> list[Phase]:
    """The `start-up:` phases in `lines` (any prefix before them, e.g. Ray's `(ServeReplica ...)`)."""
    phases = []
    for line in lines:
        match = _LINE.search(line)
        if match is None:
            continue
        stamp = match.group("stamp")
        phases.append(Phase(
            phase=match.group("phase"), duration_s=float(match.group("duration")), at_s=float(match.group("at")),
            process=match.group("process"), pid=int(match.group("pid")),
            wall_time=datetime.strptime(stamp, _STAMP_FORMAT).timestamp() if stamp else None))
    return phases


def process_roles(phases: list[Phase]) -> dict[int, str]:
    """pid -> a name for the table: server, engine core, replica, or the process's own name."""
    roles: dict[int, str] = {}
    for item in phases:
        if item.phase in ("HTTP bind", "ready") and item.process == "MainProcess":
            roles[item.pid] = "server"
        elif item.phase.startswith("replica"):
            roles[item.pid] = "replica"
        elif item.process == "pagoda-engine-core":
            roles[item.pid] = "engine core"
    for item in phases:
        roles.setdefault(item.pid, f"{item.process} ({item.pid})")
    return roles


@dataclass
class StartupRun:
    """One cold start. Times in seconds since launch (standalone) or the deploy (Ray)."""
    mode: str                              # "standalone" or "ray"
    launched_at: float                     # unix time of the clock's start
    health_s: float                        # /health answered 200
    first_completion_s: float              # a 1-token completion answered 200: ready
    phases: list[Phase] = field(default_factory=list)
    untimed_s: float = 0.0                 # before the clock: Ray cluster and Serve start (Ray only)

    def since_launch(self, item: Phase) -> Optional[float]:
        return None if item.wall_time is None else item.wall_time - self.launched_at

    def constructed_s(self) -> Optional[float]:
        """When the replica's constructor returned (Ray), from its log line."""
        for item in self.phases:
            if item.phase == "replica constructed":
                return self.since_launch(item)
        return None


def process_starts(run: StartupRun) -> dict[int, float]:
    """pid -> when the process started, in seconds since launch (from its first timestamped line)."""
    starts: dict[int, float] = {}
    for item in run.phases:
        since = run.since_launch(item)
        if since is not None and item.pid not in starts:
            starts[item.pid] = since - item.at_s
    return starts


def format_table(run: StartupRun) -> str:
    """One row per phase in time order, a `process started` row for each process, the client's view."""
    roles = process_roles(run.phases)
    lines = [f"{'process':<22} {'phase':<34} {'duration':>9} {'at (own)':>9} {'since launch':>13}"]
    rows = [(since, f"{roles[pid]:<22} {'process started':<34} {'':>9} {'':>9} {since:>12.1f}s")
            for pid, since in process_starts(run).items()]
    for item in run.phases:
        since = run.since_launch(item)
        shown = f"{since:.1f}s" if since is not None else "-"
        text = f"{roles[item.pid]:<22} {item.phase:<34} {item.duration_s:>8.2f}s {item.at_s:>8.1f}s {shown:>13}"
        rows.append((since if since is not None else item.at_s, text))
    lines += [text for _, text in sorted(rows, key=lambda row: row[0])]
    constructed = run.constructed_s()
    if constructed is not None:
        lines.append(f"{'client':<22} {'Serve deploy + health checks':<34} "
                     f"{run.first_completion_s - constructed:>8.2f}s {'':>9} {run.first_completion_s:>12.1f}s")
    lines.append(f"{'client':<22} {'/health 200':<34} {'':>9} {'':>9} {run.health_s:>12.1f}s")
    lines.append(f"{'client':<22} {'first completion (ready)':<34} {'':>9} {'':>9} {run.first_completion_s:>12.1f}s")
    if run.untimed_s:
        lines.append(f"(before the clock: Ray cluster and Serve started in {run.untimed_s:.1f} s, untimed)")
    return "\n".join(lines)


# -- polling ---------------------------------------------------------------------------------------
def wait_ready(base_url: str, started: float, process: subprocess.Popen, timeout_s: float) -> tuple[float, float]:
    """(seconds to /health 200, seconds to a 1-token completion 200), both since `started`."""
    health_s: Optional[float] = None
    with httpx.Client(timeout=60) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
            try:
                if health_s is None:
                    if client.get(f"{base_url}/health").status_code == 200:
                        health_s = time.time() - started
                        continue
                else:
                    response = client.post(f"{base_url}/v1/completions",
                                           json={"model": SERVED_NAME, "prompt": [1, 2, 3], "max_tokens": 1})
                    if response.status_code == 200:
                        return health_s, time.time() - started
            except httpx.HTTPError:
                pass
            if time.time() - started > timeout_s:
                raise TimeoutError(f"{base_url} not ready after {timeout_s:.0f} s")
            time.sleep(POLL_INTERVAL_S)


def _stop(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_flags(engine_args: dict[str, Any]) -> list[str]:
    """{'engine_core_process': True, 'max_num_seqs': 64} -> ['--engine-core-process', '--max-num-seqs', '64']."""
    flags = []
    for name, value in engine_args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


# -- the two modes ---------------------------------------------------------------------------------
def run_standalone(model: str, engine_args: dict[str, Any], log_path: Path, timeout_s: float) -> StartupRun:
    port = _free_port()
    command = [sys.executable, "-m", "pagoda.engine.entrypoints.cli", "serve", model, "--standalone",
               "--port", str(port), "--served-model-name", SERVED_NAME, "--uvicorn-log-level", "warning",
               *engine_flags(engine_args)]
    with open(log_path, "w") as log:
        started = time.time()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            health_s, ready_s = wait_ready(f"http://127.0.0.1:{port}", started, process, timeout_s)
        finally:
            _stop(process)
    return StartupRun("standalone", started, health_s, ready_s, parse_timeline(log_path.read_text().splitlines()))


def run_ray(model: str, engine_args: dict[str, Any], num_gpus: float, log_path: Path, timeout_s: float,
            address: Optional[str]) -> StartupRun:
    port = _free_port()
    spec = {"model": model, "engine_args": engine_args, "num_gpus": num_gpus, "port": port, "address": address}
    command = [sys.executable, "-m", "bench.startup", "--ray-driver", json.dumps(spec)]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}        # every process's lines, not "[repeated 2x]"
    launched = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=str(Path(__file__).resolve().parent.parent))
        try:
            started = _wait_for_deploy_mark(log_path, process, timeout_s)
            health_s, ready_s = wait_ready(f"http://127.0.0.1:{port}", started, process, timeout_s)
            time.sleep(1.0)        # Ray forwards workers' output to the driver about once a second
        finally:
            _stop(process)
    return StartupRun("ray", started, health_s, ready_s, parse_timeline(log_path.read_text().splitlines()),
                      untimed_s=started - launched)


def _wait_for_deploy_mark(log_path: Path, process: subprocess.Popen, timeout_s: float) -> float:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for line in log_path.read_text().splitlines():
            if line.startswith(DEPLOY_MARK):
                return float(line[len(DEPLOY_MARK):])
        if process.poll() is not None:
            raise RuntimeError(f"the Ray driver exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
        time.sleep(POLL_INTERVAL_S)
    raise TimeoutError(f"Ray and Serve did not start within {timeout_s:.0f} s")


def ray_driver(spec_json: str) -> int:
    """The --ray subprocess: starts Ray and Serve, deploys the app (printing DEPLOY_MARK first) and
    serves until SIGINT/SIGTERM."""
    import ray
    from ray import serve

    from bench.cluster_bench import app_args
    from pagoda.cluster.app import build_app

    spec = json.loads(spec_json)
    ray.init(address=spec["address"], logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": spec["port"]})
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    print(f"{DEPLOY_MARK} {time.time():.3f}", flush=True)
    try:
        serve.run(build_app(app_args(spec["model"], spec["engine_args"], 1, 1, spec["num_gpus"], 256)),
                  name=APP_NAME, route_prefix="/", blocking=False)
        while not stop:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        if spec["address"] is None:
            serve.shutdown()
        ray.shutdown()
    return 0


# -- main ------------------------------------------------------------------------------------------
def missing_bytecode(packages: Iterable[str] = HEAVY_PACKAGES) -> list[str]:
    """The installed packages among `packages` whose `__init__` has no cached bytecode where this
    interpreter looks for it (`__pycache__`, or PYTHONPYCACHEPREFIX when set); absent packages are skipped."""
    import importlib.util

    missing = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        if not os.path.exists(importlib.util.cache_from_source(spec.origin)):
            missing.append(name)
    return missing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b-random", help="'default', a bench model name or a path")
    parser.add_argument("--ray", action="store_true", help="a one-replica Ray Serve app instead of --standalone")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", help="on CUDA (CPU runs float32)")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="extra engine option (JSON value), e.g. engine_core_process=true")
    parser.add_argument("--repeat", type=int, default=1, help="cold starts to run; the median total is reported")
    parser.add_argument("--address", default=None, help="--ray: join this Ray cluster instead of starting one")
    parser.add_argument("--timeout", type=float, default=READY_TIMEOUT_S)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep each run's server log here")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--ray-driver", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ray_driver is not None:
        return ray_driver(args.ray_driver)
    if args.repeat < 1:
        raise SystemExit(f"--repeat must be >= 1, got {args.repeat}")
    bench_model = resolve_bench_model(args.model, args.dtype)
    if bench_model.is_random:
        from bench.cluster_bench import add_word_tokenizer

        config = json.loads((Path(bench_model.model) / "config.json").read_text())
        add_word_tokenizer(Path(bench_model.model), int(config["vocab_size"]))
    engine_args = server_engine_args(bench_model, args.device, args.dtype, args.engine_arg)
    uncompiled = missing_bytecode()
    if uncompiled:
        print(f"NOTE: no cached bytecode for {', '.join(uncompiled)}: every process of the first run compiles "
              "their modules (set PYTHONPYCACHEPREFIX to a writable folder if their folders are read-only); "
              "later runs read it back. Compare the later runs.", flush=True)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pagoda-startup-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for i in range(args.repeat):
        log_path = log_dir / f"{'ray' if args.ray else 'standalone'}-{i}.log"
        if args.ray:
            run = run_ray(bench_model.model, engine_args, 0.0 if args.device == "cpu" else 1.0, log_path,
                          args.timeout, args.address)
        else:
            run = run_standalone(bench_model.model, engine_args, log_path, args.timeout)
        print(f"\n[{run.mode} {args.model}, run {i + 1}/{args.repeat}] ready after {run.first_completion_s:.1f} s "
              f"(log: {log_path})\n{format_table(run)}", flush=True)
        runs.append(run)
    totals = [run.first_completion_s for run in runs]
    print(f"\ntotal to first completion: median {statistics.median(totals):.1f} s over {len(totals)} run(s): "
          + ", ".join(f"{t:.1f}" for t in totals))
    if args.json is not None:
        args.json.write_text(json.dumps({"model": args.model, "engine_args": engine_args, "no_bytecode": uncompiled,
                                         "runs": [asdict(run) for run in runs]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
