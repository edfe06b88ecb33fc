"""EngineCore.run_loop, the one step loop both transports run, driven directly: a scripted inbox in,
the events it emits out, and an executor that samples a fixed token (no model compute).

The transports themselves (a thread, a process) are covered end to end in
tests/entrypoints/test_async_engine.py and test_core_process.py.
"""
from __future__ import annotations

import pytest

from pagoda.engine import EngineArgs, SamplingParams
from pagoda.engine.core.commands import (AbortRequests, AddRejected, AddRequests, CheckHealth, CommandQueue,
                                         HealthAnswer, Shutdown, StepDone)
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.core.request import Request
from pagoda.engine.executor.base import Executor, ExecutorError
from pagoda.engine.step import ModelRunnerOutput

TOKEN = 7


class FixedTokenExecutor(Executor):
    """Samples TOKEN for every request that reaches the end of its sequence."""

    healthy = True

    def determine_num_blocks(self) -> int:
        return 64

    def initialize_cache(self, num_blocks: int) -> None:
        pass

    def execute_model(self, scheduler_output):
        return ModelRunnerOutput(sampled_token_ids={item.request_id: TOKEN for item in scheduler_output.scheduled
                                                    if item.sample})

    def check_health(self) -> None:
        if not type(self).healthy:
            raise ExecutorError("rank 1 worker has exited (simulated)")


class ScriptedInbox:
    """Hands out one scripted batch per call and records whether the loop asked to block."""

    def __init__(self, *batches: list) -> None:
        self.batches = list(batches)
        self.blocked: list[bool] = []

    def take(self, block: bool) -> list:
        self.blocked.append(block)
        return self.batches.pop(0) if self.batches else []


@pytest.fixture
def core(tiny_checkpoint):
    config = EngineArgs(model=str(tiny_checkpoint()), kv_cache_memory_bytes=1 << 20, async_scheduling=False,
                        skip_tokenizer_init=True).create_config()
    FixedTokenExecutor.healthy = True
    core = EngineCore(config, FixedTokenExecutor)
    yield core
    core.shutdown()


def request(request_id: str, max_tokens: int = 3) -> Request:
    return Request(request_id, [1, 2, 3, 4], SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   eos_token_ids=frozenset(), max_tokens=max_tokens)


def run(core: EngineCore, inbox: ScriptedInbox) -> list:
    events: list = []
    core.run_loop(inbox, events.append)
    return events


def test_commands_apply_in_order_and_every_turn_ends_with_step_done(core):
    inbox = ScriptedInbox([AddRequests("a", [request("a")]), AddRequests("b", [request("b")]),
                           AbortRequests(["b"])], [], [], [Shutdown()])
    events = run(core, inbox)
    steps = [e for e in events if isinstance(e, StepDone)]
    assert len(steps) == 3 and all(isinstance(e, StepDone) for e in events)
    assert steps[0].num_added == 2 and steps[1].num_added == 0
    # b was aborted before the first step ran: only a produced tokens, one per step, to max_tokens
    produced = [(o.request_id, o.new_token_ids, o.finish_reason) for step in steps for o in step.outputs]
    assert produced == [("a", [TOKEN], None), ("a", [TOKEN], None), ("a", [TOKEN], "length")]
    assert steps[-1].stats.num_running == 0 and steps[-1].stats.num_waiting == 0


def test_idle_blocks_busy_only_takes_what_is_there(core):
    inbox = ScriptedInbox([], [AddRequests("a", [request("a", max_tokens=2)])], [], [], [Shutdown()])
    run(core, inbox)
    # idle: block; with a request in flight: poll; once it finished: block again
    assert inbox.blocked == [True, True, False, True, True]


def test_shutdown_leaves_after_the_commands_before_it_even_with_work_left(core):
    inbox = ScriptedInbox([AddRequests("a", [request("a", max_tokens=100)]), Shutdown(),
                           AddRequests("never", [request("never")])])
    events = run(core, inbox)
    assert events == [] and list(core.scheduler.requests) == ["a"]    # added, never stepped
    assert core.num_steps == 0


def test_a_duplicate_id_is_rejected_all_or_none(core):
    inbox = ScriptedInbox([AddRequests("a", [request("a", max_tokens=50)])],
                          [AddRequests("x", [request("x-0"), request("a")])], [Shutdown()])
    events = run(core, inbox)
    [rejected] = [e for e in events if isinstance(e, AddRejected)]
    assert rejected.request_id == "x" and "'a'" in rejected.message
    assert "x-0" not in core.scheduler.requests           # its sibling was taken back


def test_health_is_answered_and_a_failed_check_kills_the_loop(core):
    inbox = ScriptedInbox([CheckHealth(1)], [Shutdown()])
    assert [e for e in run(core, inbox) if isinstance(e, HealthAnswer)] == [HealthAnswer(1, None)]

    FixedTokenExecutor.healthy = False
    events: list = []
    with pytest.raises(ExecutorError, match="simulated"):
        core.run_loop(ScriptedInbox([CheckHealth(2)], [Shutdown()]), events.append)
    assert events == [HealthAnswer(2, "ExecutorError: rank 1 worker has exited (simulated)")]


def test_the_prefix_summary_rides_only_when_it_changed(core):
    inbox = ScriptedInbox([AddRequests("a", [request("a", max_tokens=2)])], [], [Shutdown()])
    steps = [e for e in run(core, inbox) if isinstance(e, StepDone)]
    assert steps[0].prefix_summary_changed
    # refreshed at most once a second: the next turns repeat it, so they leave it out
    assert not steps[1].prefix_summary_changed and steps[1].stats.cached_prefix_hashes == []


def test_a_command_queue_hands_over_everything_in_order():
    queue = CommandQueue()
    assert queue.take(block=False) == []
    queue.put(CheckHealth(1))
    queue.put(Shutdown())
    assert queue.take(block=True) == [CheckHealth(1), Shutdown()]
    assert queue.take(block=False) == []


def test_an_unknown_command_is_a_type_error(core):
    with pytest.raises(TypeError, match="not an engine core command"):
        core.run_loop(ScriptedInbox(["add"]), lambda event: None)


def test_measured_step_costs_reach_the_speculation_controller(tiny_checkpoint, caplog):
    """What the executor measured at start-up decides speculation when the user set no limit."""
    from pagoda.engine.spec_decode.step_costs import StepCosts

    measured = StepCosts((1, 8, 32), (0.01, 0.01, 0.01), (0.0102, 0.012, 0.02), 1024)

    class MeasuringExecutor(FixedTokenExecutor):
        def initialize_cache(self, num_blocks: int) -> StepCosts:
            return measured

    for spec, expected in (({"method": "ngram", "num_speculative_tokens": 2}, measured),
                           ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 4}, None)):
        config = EngineArgs(model=str(tiny_checkpoint()), kv_cache_memory_bytes=1 << 20, async_scheduling=False,
                            skip_tokenizer_init=True, speculative_config=spec).create_config()
        with caplog.at_level("INFO", logger="pagoda.engine.core.engine_core"):
            core = EngineCore(config, MeasuringExecutor)
        try:
            assert core.spec.step_costs is expected
            logged = "measured verify / decode step time at 1024 tokens of context: batch 1 1.02x"
            assert (logged in caplog.text) == (expected is not None)
        finally:
            core.shutdown()
            caplog.clear()
