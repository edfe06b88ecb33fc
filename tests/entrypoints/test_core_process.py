"""AsyncEngine with its EngineCore in a process of its own (engine_core_process, the default on CUDA):
same greedy outputs as the in-thread core, stats and health through the pipe, stop strings and
cancellation abort in the core, a killed core turns the engine dead without a hang, start-up errors
surface in the constructor, and shutdown leaves no process behind."""
from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagoda.engine import EngineArgs, SamplingParams, StructuredOutputsParams
from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.core.core_process import CoreProcessError
from pagoda.engine.errors import EngineDeadError
from pagoda.engine.executor.uniproc import UniprocExecutor

from .server_helpers import streams_cut_by

PROMPTS = [f"Once upon a time {i}" for i in range(6)]


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def make_engine(model_dir, core_process: bool, **kwargs) -> AsyncEngine:
    config = EngineArgs(model=str(model_dir), kv_cache_memory_bytes=kwargs.pop("kv_cache_memory_bytes", 16 << 20),
                        engine_core_process=core_process, **kwargs).create_config()
    return AsyncEngine(config)


async def collect(engine: AsyncEngine, prompt, params, request_id=None):
    return [output async for output in engine.generate(prompt, params, request_id)]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir, core_process=True)
    assert engine.core_client.pid is not None and engine.core_client.pid != os.getpid()
    yield engine
    pid = engine.core_client.pid
    engine.shutdown()
    assert not engine.core_client.is_alive()
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid), "the core process outlived shutdown"


def test_same_greedy_outputs_as_the_in_thread_core(engine, tiny_model_dir):
    async def run(target):
        return await asyncio.gather(*(collect(target, prompt, greedy(12, logprobs=2)) for prompt in PROMPTS))

    remote = asyncio.run(run(engine))
    local_engine = make_engine(tiny_model_dir, core_process=False)
    try:
        local = asyncio.run(run(local_engine))
    finally:
        local_engine.shutdown()
    for got, want in zip(remote, local):
        assert got[-1].finished and got[-1].outputs[0].token_ids == want[-1].outputs[0].token_ids
        assert got[-1].outputs[0].text == want[-1].outputs[0].text
        assert [t for o in got for t in o.outputs[0].delta_token_ids] == got[-1].outputs[0].token_ids
        got_lp, want_lp = got[-1].outputs[0].logprobs, want[-1].outputs[0].logprobs
        assert [list(entry) for entry in got_lp] == [list(entry) for entry in want_lp]
        assert [lp.logprob for e in got_lp for lp in e.values()] == \
            pytest.approx([lp.logprob for e in want_lp for lp in e.values()], abs=1e-5)


def test_structured_output_in_the_core_process(engine):
    """The core process compiles the grammar (its own tokenizer, loaded on first use) and masks
    every step; an invalid one is refused before it crosses the pipe."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=4, n=2,
                            structured_outputs=StructuredOutputsParams(json=schema))
    final = asyncio.run(collect(engine, PROMPTS[1], params))[-1]
    for completion in final.outputs:
        assert completion.finish_reason == "stop"
        assert 0 <= json.loads(completion.text)["n"] <= 9
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError, match="structured_outputs.regex is not valid"):
        asyncio.run(collect(engine, PROMPTS[1], bad))


def test_stats_and_health_come_through_the_pipe(engine):
    async def main():
        before = await engine.get_stats()
        await collect(engine, PROMPTS[0], greedy(5))
        await engine.check_health()
        return before, await engine.get_stats()

    before, after = asyncio.run(main())
    assert after.generation_tokens >= before.generation_tokens + 5 and after.num_steps > before.num_steps
    assert after.num_running == 0 and after.num_free_blocks == after.num_blocks


def test_cancel_and_stop_strings_abort_in_the_core(engine):
    async def main():
        idle = await engine.get_stats()
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(PROMPTS[1], greedy(4000), "to-cancel"):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 30)
        assert (await engine.get_stats()).num_running == 1
        task.cancel()
        deadline = time.monotonic() + 5
        while (stats := await engine.get_stats()).num_free_blocks != idle.num_free_blocks or stats.num_running:
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.02)
        base = (await collect(engine, PROMPTS[2], greedy(16)))[-1].outputs[0].text
        visible = [i for i in range(1, len(base)) if base[i].strip()]
        if not visible:
            pytest.skip(f"no stop string candidate in {base!r}")
        stopped = (await collect(engine, PROMPTS[2], greedy(16, stop=[base[visible[0]]])))[-1].outputs[0]
        await asyncio.sleep(0.2)
        return base, visible[0], stopped, await engine.get_stats()

    base, cut, stopped, stats = asyncio.run(main())
    assert stopped.finish_reason == "stop" and stopped.text == base[:base.index(base[cut])]
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_a_killed_core_kills_the_engine_without_a_hang(tiny_model_dir):
    engine = make_engine(tiny_model_dir, core_process=True)
    try:
        async def main():
            errors = await streams_cut_by(engine, PROMPTS[:3], greedy(4000),
                                          lambda: os.kill(engine.core_client.pid, signal.SIGKILL))
            assert len(errors) == 3 and all(e.during_request for e in errors)
            with pytest.raises(EngineDeadError):
                await collect(engine, PROMPTS[0], greedy(2))
            assert not await engine.is_healthy()

        asyncio.run(main())
    finally:
        started = time.monotonic()
        engine.shutdown()
        assert not engine.core_client.is_alive() and time.monotonic() - started < 10


def test_a_start_up_error_in_the_core_is_raised_by_the_constructor(tiny_model_dir):
    # a KV budget below one block fails while the core sizes its cache, in the core process
    with pytest.raises(CoreProcessError, match="no room for a single block"):
        make_engine(tiny_model_dir, core_process=True, kv_cache_memory_bytes=1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the core watches its parent pid")
def test_no_orphan_when_the_serving_process_is_killed(tiny_model_dir):
    helper = Path(__file__).with_name("core_orphan_parent.py")
    parent = subprocess.Popen([sys.executable, str(helper), str(tiny_model_dir)], stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        line = parent.stdout.readline()
        assert line.startswith("PID "), f"helper failed to start (exit code {parent.poll()})"
        pid = int(line.split()[1])
        time.sleep(1.0)                          # mid-generation
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(pid), "the core process outlived its serving process"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


class _DiskFullExecutor(UniprocExecutor):
    """Raises OSError in a step once the file named by PAGODA_TEST_FAIL_FILE exists (the core is
    another process: a file is what both can see)."""

    def execute_model(self, scheduler_output):
        if os.path.exists(os.environ["PAGODA_TEST_FAIL_FILE"]):
            raise OSError(28, "No space left on device (simulated)")
        return super().execute_model(scheduler_output)


def test_an_os_error_in_a_step_is_a_failed_step_with_its_traceback(tiny_model_dir, tmp_path, monkeypatch, caplog):
    flag = tmp_path / "fail-now"
    monkeypatch.setenv("PAGODA_TEST_FAIL_FILE", str(flag))
    config = EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20,
                        engine_core_process=True).create_config()
    engine = AsyncEngine(config, executor_class=_DiskFullExecutor)
    try:
        async def main():
            outputs = []
            with pytest.raises(EngineDeadError):
                async for output in engine.generate(PROMPTS[0], greedy(4000)):
                    outputs.append(output)
                    if len(outputs) == 2:
                        flag.touch()
            assert engine.errored and not await engine.is_healthy()

        asyncio.run(asyncio.wait_for(main(), 30))
        assert "No space left on device (simulated)" in caplog.text     # the core's traceback, not "exited"
    finally:
        engine.shutdown()


def test_a_prestarted_core_takes_its_config_later(tiny_model_dir):
    """`pagoda serve` spawns the core before it imports torch; the engine hands it the config."""
    from pagoda.engine.core.core_prestart import PrestartedCore

    prestarted = PrestartedCore()
    config = EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20,
                        engine_core_process=True).create_config()
    engine = AsyncEngine(config, prestarted_core=prestarted)
    process = prestarted.process
    try:
        assert engine.core_client.pid == process.pid
        prestarted.close()                    # after the engine took it: nothing to do
        del prestarted                        # nor when the handle is collected (a replica drops it)
        gc.collect()
        final = asyncio.run(collect(engine, PROMPTS[0], greedy(6)))[-1]
        assert final.finished and len(final.outputs[0].token_ids) == 6
    finally:
        engine.shutdown()
    assert not process.is_alive()


def test_a_prestarted_core_builds_its_config_from_the_arguments(tiny_model_dir):
    """Given the arguments early, the core builds its own config (it does not wait for the serving
    process's): the KV cache it sizes is the arguments' (16 MiB), not that of the config the engine
    holds (built here from other arguments, 8 MiB), whose capacity follows the core's."""
    from pagoda.engine.core.core_prestart import PrestartedCore

    args = EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20, engine_core_process=True)
    prestarted = PrestartedCore()
    prestarted.send_args(args)
    config = EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=8 << 20,
                        engine_core_process=True).create_config()
    engine = AsyncEngine(config, prestarted_core=prestarted)
    try:
        assert engine.core_client.pid == prestarted.process.pid
        own = EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20, engine_core_process=False)
        with_16_mib = AsyncEngine(own.create_config())
        try:
            assert config.cache.num_blocks == with_16_mib.config.cache.num_blocks
        finally:
            with_16_mib.shutdown()
        final = asyncio.run(collect(engine, PROMPTS[0], greedy(6)))[-1]
        assert final.finished and len(final.outputs[0].token_ids) == 6
    finally:
        engine.shutdown()


def test_a_prestarted_core_reports_arguments_it_cannot_build(tiny_model_dir, tmp_path):
    from pagoda.engine.core.core_prestart import PrestartedCore

    prestarted = PrestartedCore()
    prestarted.send_args(EngineArgs(model=str(tmp_path / "no-such-model"), engine_core_process=True))
    config = EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20,
                        engine_core_process=True).create_config()
    with pytest.raises(CoreProcessError, match="no-such-model"):
        AsyncEngine(config, prestarted_core=prestarted)
    prestarted.process.join(10)
    assert not prestarted.process.is_alive()


def test_a_core_given_arguments_picks_its_own_executor():
    from pagoda.engine.core.core_prestart import PrestartedCore

    prestarted = PrestartedCore()
    try:
        prestarted.send_args(EngineArgs(model="default"))
        with pytest.raises(ValueError, match="executor_class=.*UniprocExecutor"):
            prestarted.take(None, UniprocExecutor)
    finally:
        prestarted.close()
    prestarted.process.join(10)
    assert not prestarted.process.is_alive()


def test_a_prestarted_core_not_needed_is_stopped(tiny_model_dir):
    from pagoda.engine.core.core_prestart import PrestartedCore

    prestarted = PrestartedCore()
    config = EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20,
                        engine_core_process=False).create_config()
    engine = AsyncEngine(config, prestarted_core=prestarted)
    try:
        prestarted.process.join(10)
        assert not prestarted.process.is_alive(), "the unused core process outlived the engine's start"
        assert engine.core_client.pid is None or engine.core_client.pid == os.getpid()
    finally:
        engine.shutdown()


PARENT_MAIN_SCRIPT = '''
import multiprocessing, os, sys
if __name__ == "__mp_main__":                 # a spawned child re-running this script
    open(os.path.join(os.environ["MARKER_DIR"], "reran-" + str(os.getpid())), "w").close()
if __name__ == "__main__":
    from pagoda.engine import EngineArgs
    from pagoda.engine.core.core_prestart import PrestartedCore
    if sys.argv[1] == "prestarted":
        prestarted = PrestartedCore()
        prestarted.send_args(EngineArgs(model=sys.argv[2], engine_core_process=True))
        prestarted.process.join(120)          # it cannot build that config: it reports and leaves
        print("exitcode", prestarted.process.exitcode)
    else:                                      # control: a plain spawned child does re-run it
        child = multiprocessing.get_context("spawn").Process(target=os.getpid)
        child.start(); child.join(60)
        print("exitcode", child.exitcode)
'''


@pytest.mark.parametrize("mode,reruns", [("prestarted", 0), ("plain", 1)])
def test_a_prestarted_core_does_not_rerun_the_parents_main_script(tmp_path, mode, reruns):
    """A spawned child imports its parent's main script unless told otherwise; a Ray replica's main
    is Ray's worker bootstrap (it imports Ray: seconds of a cold start). The prestarted core skips it."""
    script = tmp_path / "parent_main.py"
    script.write_text(PARENT_MAIN_SCRIPT)
    env = {**os.environ, "MARKER_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, str(script), mode, str(tmp_path / "no-such-model")],
                            capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    assert "exitcode" in result.stdout and "exitcode None" not in result.stdout, result.stdout
    assert len(list(tmp_path.glob("reran-*"))) == reruns, result.stderr[-2000:]
