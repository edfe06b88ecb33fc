"""Faults inside a server: the engine core process, or a tensor-parallel worker (gloo on CPU), killed.

What a client must see, within seconds and never a hang:
- a stream that was running ends with an error event (`engine_dead`) before `[DONE]`;
- a non-streamed request that was running fails with 500 `engine_dead` (its generation failed
  partway); one that waited in the queue, or arrives later, gets 503 `engine_dead` (nothing was
  generated: retry it elsewhere);
- `/health` answers 503;
- a worker that dies while nothing runs is noticed as well (`IdleWatch`): the next request gets 503,
  not a 500 from a step that found the worker gone;
- stopping the server afterwards leaves no process behind.

Real `pagoda serve` processes, one per case (a dead engine stays dead).
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from pagoda.engine.core.commands import CheckHealth, CommandQueue
from pagoda.engine.core.idle_watch import IdleWatch
from pagoda.engine.executor.base import ExecutorError

from .server_helpers import MODEL_NAME, ServerProcess, child_pids, metric, start_server, wait_for

# server flags, and which process dies: the engine core process, or TP worker rank 0 / rank 1
CASES = {
    "core-process": (("--engine-core-process",), "core"),
    "tp2": (("-tp", "2", "--no-engine-core-process"), 1),
    "tp2-core-process": (("-tp", "2", "--engine-core-process"), 0),
}
NO_HANG_S = 10.0


def spawned_children(pid: int) -> list[int]:
    """Children started by multiprocessing's spawn (the engine core, TP workers), oldest first."""
    spawned = []
    for child in child_pids(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            spawned.append(child)
    return spawned


def descendants(pid: int) -> list[int]:
    found = []
    for child in child_pids(pid):
        found += [child, *descendants(child)]
    return found


def victim_pid(server: ServerProcess, engine_core_process: bool, victim) -> int:
    """The engine core process, or TP worker `victim` (workers start in rank order)."""
    spawned = spawned_children(server.process.pid)
    if victim == "core":
        [core] = spawned
        return core
    workers = spawned_children(spawned[0]) if engine_core_process else spawned
    assert len(workers) == 2, workers
    return workers[victim]


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def body(max_tokens: int, **extra) -> dict:
    return {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}


def stop_and_check_no_orphans(server: ServerProcess, tree: list[int]) -> None:
    server.stop()
    deadline = time.monotonic() + 10
    while any(is_alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in tree if is_alive(pid)], "engine processes outlived the server"


@pytest.mark.parametrize("case", list(CASES))
def test_a_process_killed_under_load_fails_every_request_visibly_and_fast(tiny_model_dir, tmp_path, case):
    flags, victim = CASES[case]
    server = start_server(tiny_model_dir, tmp_path, "--max-num-seqs", "2", *flags)
    tree = descendants(server.process.pid)
    try:
        async def main():
            async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as http:
                async def stream() -> list[str]:
                    async with http.stream("POST", "/v1/completions", json=body(8000, stream=True)) as response:
                        assert response.status_code == 200
                        return [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]

                running = [asyncio.create_task(stream()),
                           asyncio.create_task(http.post("/v1/completions", json=body(8000)))]
                await asyncio.to_thread(
                    wait_for, lambda: metric(server.metrics(), "pagoda:num_requests_running") == 2, 30.0)
                queued = asyncio.create_task(http.post("/v1/completions", json=body(8)))
                await asyncio.to_thread(
                    wait_for, lambda: metric(server.metrics(), "pagoda:num_requests_waiting") == 1, 30.0)
                killed_at = time.monotonic()
                os.kill(victim_pid(server, "--engine-core-process" in flags, victim), signal.SIGKILL)
                events, plain, waiting = await asyncio.wait_for(asyncio.gather(*running, queued), NO_HANG_S)
                ended_in = time.monotonic() - killed_at
                health = await http.get("/health", timeout=NO_HANG_S)
                started = time.monotonic()
                new = await http.post("/v1/completions", json=body(4), timeout=NO_HANG_S)
                return events, plain, waiting, ended_in, health, new, time.monotonic() - started

        events, plain, waiting, ended_in, health, new, new_took = asyncio.run(main())
        assert events[-1] == "[DONE]" and '"engine_dead"' in events[-2], events[-3:]
        assert not any('"finish_reason":"' in event for event in events[:-2]), "a cut stream looked finished"
        assert plain.status_code == 500 and plain.json()["error"]["code"] == "engine_dead"
        assert waiting.status_code == 503 and waiting.json()["error"]["code"] == "engine_dead"
        assert ended_in < NO_HANG_S
        assert health.status_code == 503
        assert new.status_code == 503 and new.json()["error"]["code"] == "engine_dead" and new_took < 2.0
        assert server.process.poll() is None, "the server must stay up and answer"
    finally:
        stop_and_check_no_orphans(server, tree)


@pytest.mark.parametrize("case", ["tp2", "tp2-core-process"])
def test_a_worker_killed_while_idle_is_noticed_before_the_next_request(tiny_model_dir, tmp_path, case):
    flags, victim = CASES[case]
    server = start_server(tiny_model_dir, tmp_path, *flags)
    tree = descendants(server.process.pid)
    try:
        os.kill(victim_pid(server, "--engine-core-process" in flags, victim), signal.SIGKILL)
        # no request and no health probe reaches the engine meanwhile: only the idle loop can notice
        assert wait_for(lambda: "has exited" in server.log(), NO_HANG_S), server.log()
        new = httpx.post(f"{server.url}/v1/completions", json=body(4), headers=server.headers, timeout=NO_HANG_S)
        assert new.status_code == 503 and new.json()["error"]["code"] == "engine_dead"
        assert httpx.get(f"{server.url}/health", timeout=NO_HANG_S).status_code == 503
    finally:
        stop_and_check_no_orphans(server, tree)


# -- IdleWatch on its own ----------------------------------------------------------------------------
def test_idle_watch_checks_health_only_while_idle_and_raises_what_it_raises():
    queue = CommandQueue()
    checks: list[float] = []
    watch = IdleWatch(queue, lambda: checks.append(time.monotonic()), interval_s=0.05)
    assert watch.take(block=False) == [] and checks == []            # busy: never waits, never looks
    queue.put(CheckHealth(1))
    assert watch.take(block=True) == [CheckHealth(1)] and checks == []

    def put_later() -> None:
        time.sleep(0.3)
        queue.put(CheckHealth(2))

    threading.Thread(target=put_later).start()
    assert watch.take(block=True) == [CheckHealth(2)]
    assert len(checks) >= 3                                          # looked every 50 ms meanwhile

    def dead() -> None:
        raise ExecutorError("TP rank 1 worker (pid 1) has exited")

    with pytest.raises(ExecutorError, match="has exited"):
        IdleWatch(queue, dead, interval_s=0.05).take(block=True)
    with pytest.raises(ValueError, match="interval_s"):
        IdleWatch(queue, dead, interval_s=0)
