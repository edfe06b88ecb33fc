"""bench/startup.py: parsing the `start-up:` lines (as the server, its engine core and Ray print
them) into one table, and a cold start of the standalone server on CPU with the tiny model, its
engine core in a process of its own, read back from the server's log."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repo root, for `import bench`

from bench.startup import (Phase, StartupRun, engine_flags, format_table, missing_bytecode, parse_timeline,  # noqa: E402
                           process_roles)
from pagoda.engine.utils import startup_timeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

SERVER_LOG = """\
INFO 2026-12-07 13:34:15,953 pagoda.startup: start-up: imports 2.97 s (at 3.0 s; MainProcess pid 100)
INFO 2026-12-07 13:34:19,360 pagoda.startup: start-up: config 3.41 s (at 6.4 s; MainProcess pid 100)
INFO 2026-12-07 13:34:20,100 pagoda.startup: start-up: tokenizer 0.74 s (at 7.1 s; MainProcess pid 100)
INFO 2026-12-07 13:34:23,500 pagoda.startup: start-up: imports 4.10 s (at 4.1 s; pagoda-engine-core pid 101)
INFO 2026-12-07 13:34:30,000 pagoda.startup: start-up: CUDA-graph capture 6.50 s (at 10.6 s; pagoda-engine-core pid 101)
INFO 2026-12-07 13:34:30,010 pagoda.startup: start-up: ready 10.61 s (at 10.6 s; pagoda-engine-core pid 101)
INFO 2026-12-07 13:34:30,020 pagoda.engine.core.engine_core: KV cache: 1456 blocks of 16 tokens; max_model_len 8192
INFO 2026-12-07 13:34:30,030 pagoda.startup: start-up: engine core 10.67 s (at 17.1 s; MainProcess pid 100)
INFO 2026-12-07 13:34:30,080 pagoda.startup: start-up: HTTP bind 0.05 s (at 17.1 s; MainProcess pid 100)
INFO 2026-12-07 13:34:30,080 pagoda.startup: start-up: ready 17.13 s (at 17.1 s; MainProcess pid 100)
INFO:     127.0.0.1:59520 - "GET /health HTTP/1.1" 200 OK
"""

RAY_LOG = """\
bench-startup: deploying at 1796000000.000
(ServeReplica:pagoda-startup:LLMReplica pid=7) INFO 2026-12-07 13:40:02,500 pagoda.startup: start-up: \
replica process to constructor 2.50 s (at 9.0 s; MainProcess pid 7)
(ServeReplica:pagoda-startup:LLMReplica pid=7) INFO 2026-12-07 13:40:10,000 pagoda.startup: start-up: \
replica constructed 16.50 s (at 16.5 s; MainProcess pid 7)
"""


def stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_parses_each_phase_of_each_process():
    phases = parse_timeline(SERVER_LOG.splitlines())
    assert [(p.phase, p.process, p.pid) for p in phases] == [
        ("imports", "MainProcess", 100), ("config", "MainProcess", 100), ("tokenizer", "MainProcess", 100),
        ("imports", "pagoda-engine-core", 101), ("CUDA-graph capture", "pagoda-engine-core", 101),
        ("ready", "pagoda-engine-core", 101), ("engine core", "MainProcess", 100),
        ("HTTP bind", "MainProcess", 100), ("ready", "MainProcess", 100)]
    capture = phases[4]
    assert (capture.duration_s, capture.at_s) == (6.5, 10.6)
    assert capture.wall_time == pytest.approx(stamp("2026-12-07 13:34:30,000"))
    assert process_roles(phases) == {100: "server", 101: "engine core"}


def test_parses_ray_forwarded_lines_and_lines_without_a_timestamp():
    phases = parse_timeline(RAY_LOG.splitlines() + ["start-up: weights 1.25 s (at 3.0 s; Worker-1 pid 9)"])
    assert [(p.phase, p.duration_s, p.pid) for p in phases] == [
        ("replica process to constructor", 2.5, 7), ("replica constructed", 16.5, 7), ("weights", 1.25, 9)]
    assert phases[-1].wall_time is None
    assert process_roles(phases) == {7: "replica", 9: "Worker-1 (9)"}


def test_table_orders_by_time_and_measures_from_the_launch():
    launched = stamp("2026-12-07 13:40:00,000")
    run = StartupRun("ray", launched, health_s=11.0, first_completion_s=12.0,
                     phases=parse_timeline(RAY_LOG.splitlines()), untimed_s=8.0)
    assert run.constructed_s() == pytest.approx(10.0)
    table = format_table(run)
    lines = table.splitlines()
    # a Ray worker may start before the deploy: its first line is 2.5 s in and 9.0 s into the process
    assert "process started" in lines[1] and lines[1].rstrip().endswith("-6.5s")
    assert "replica process to constructor" in lines[2] and lines[2].rstrip().endswith("2.5s")
    assert "replica constructed" in lines[3] and lines[3].rstrip().endswith("10.0s")
    deploy = next(line for line in lines if "Serve deploy + health checks" in line)
    assert "2.00s" in deploy                   # first completion 12.0 s - constructed 10.0 s
    assert "first completion (ready)" in lines[-2] and "untimed" in lines[-1]


def test_parses_what_the_timeline_logs(monkeypatch, caplog):
    # the line format is the contract between engine/utils/startup_timeline.py and this parser
    monkeypatch.setattr(startup_timeline, "_closed", False)
    monkeypatch.setattr(startup_timeline, "_thread_state", threading.local())
    caplog.set_level(logging.INFO, logger="pagoda.startup")
    caplog.handler.setFormatter(logging.Formatter(startup_timeline.LOG_FORMAT))
    startup_timeline.begin()
    startup_timeline.mark("KV-cache profiling")
    startup_timeline.ready()
    phases = parse_timeline(caplog.text.splitlines())
    assert [p.phase for p in phases] == ["KV-cache profiling", "ready"]
    assert all(p.pid == os.getpid() and p.process == "MainProcess" for p in phases)
    assert abs(phases[1].wall_time - time.time()) < 60
    assert phases[1].duration_s == pytest.approx(phases[1].at_s, abs=0.06)


def test_finds_packages_without_cached_bytecode(tmp_path, monkeypatch):
    package = tmp_path / "uncompiled_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert missing_bytecode(["uncompiled_pkg", "no_such_package_here"]) == ["uncompiled_pkg"]
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"})
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    monkeypatch.setattr(sys, "pycache_prefix", None)
    assert missing_bytecode(["uncompiled_pkg"]) == []


def test_engine_flags_spell_booleans_as_the_cli_does():
    assert engine_flags({"engine_core_process": True, "enable_prefix_caching": False, "max_num_seqs": 8}) == [
        "--engine-core-process", "--no-enable-prefix-caching", "--max-num-seqs", "8"]


def phase(phases: list[dict], name: str, process: str) -> Phase:
    [found] = [Phase(**p) for p in phases if p["phase"] == name and p["process"] == process]
    return found


@pytest.mark.timeout(300)
def test_cold_start_of_the_standalone_server_with_its_core_in_a_process(tmp_path):
    out = tmp_path / "startup.json"
    command = [sys.executable, "-m", "bench.startup", "--model", "tiny-random", "--device", "cpu",
               "--engine-arg", "kv_cache_memory_bytes=16777216", "--engine-arg", "engine_core_process=true",
               "--log-dir", str(tmp_path / "logs"), "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [run] = json.loads(out.read_text())["runs"]
    phases = run["phases"]
    server = [p["phase"] for p in phases if p["process"] == "MainProcess"]
    core = [p["phase"] for p in phases if p["process"] == "pagoda-engine-core"]
    # every phase once, in each process; CPU: no KV profiling, no CUDA graphs
    assert sorted(server) == sorted(["imports", "config", "tokenizer", "HTTP imports", "engine core", "HTTP app",
                                     "HTTP bind", "ready"])
    # the core is spawned first, imports while the server imports, and builds its own config from
    # the arguments the server sent (it never waits for the server's config)
    assert core == ["imports", "waiting for the arguments", "config", "device init", "weights", "KV allocation",
                    "scheduler, GC freeze", "ready"]
    ready = phase(phases, "ready", "MainProcess")
    assert ready.duration_s == pytest.approx(ready.at_s, abs=0.06)      # (at is rounded to 0.1 s)
    assert run["health_s"] <= run["first_completion_s"]
    assert run["health_s"] >= ready.wall_time - run["launched_at"] - 0.05      # /health answers once ready
    # the core's phases add up to its start-up: nothing logged twice, nothing left out
    core_ready = phase(phases, "ready", "pagoda-engine-core")
    assert sum(p["duration_s"] for p in phases if p["process"] == "pagoda-engine-core"
               and p["phase"] != "ready") == pytest.approx(core_ready.duration_s, abs=0.1)
    # the tokenizer loads while the core process starts, not before it is spawned
    core_imports = phase(phases, "imports", "pagoda-engine-core")
    core_started = core_imports.wall_time - core_imports.at_s
    assert phase(phases, "tokenizer", "MainProcess").wall_time > core_started
    assert core_started < phase(phases, "imports", "MainProcess").wall_time - 0.5      # spawned before torch
    assert "first completion (ready)" in result.stdout and "engine core" in result.stdout
