"""The scheduler on its own: hand-built requests, a fake KV cache with a block budget, no model.

Each test drives `Scheduler.schedule()` and feeds `update_from_output` a `ModelRunnerOutput` as the
executor would (every request that samples gets token 7 unless a test says otherwise). One test at
the end runs both scheduling policies through `LLM` on a tiny checkpoint. The liveness of the whole
under KV pressure (many long requests, both policies, async, prefix caching) is in test_kv_pressure.py.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Optional

import pytest

from conftest import greedy, token_prompts
from pagoda.engine.config import CacheConfig, EngineArgs, SchedulerConfig
from pagoda.engine.core.request import Request, RequestStatus
from pagoda.engine.core.scheduler import MAX_PREEMPTIONS_PER_REQUEST, Scheduler
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.step import ModelRunnerOutput, SchedulerOutput

BLOCK_SIZE = 4
SAMPLED = 7


class FakeKVCache:
    """The calls the scheduler makes on its KV cache manager, over a plain pool of block ids.

    No prefix caching: `get_computed_blocks` never hits. `allocate_slots` gives a request blocks
    for its computed tokens plus `num_new_tokens`, or returns False and changes nothing.
    """

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self.free_block_ids = list(range(num_blocks))
        self.req_blocks: dict[str, list[int]] = {}

    def get_computed_blocks(self, request: Request) -> tuple[list, int]:
        return [], 0

    def allocate_slots(self, request: Request, num_new_tokens: int, new_computed_blocks: Optional[list] = None,
                       ) -> bool:
        assert not new_computed_blocks
        blocks = self.req_blocks.get(request.request_id, [])
        num_tokens = request.num_computed_tokens + num_new_tokens
        num_needed = -(-num_tokens // self.block_size) - len(blocks)
        if num_needed > len(self.free_block_ids):
            return False
        taken, self.free_block_ids = self.free_block_ids[:max(num_needed, 0)], self.free_block_ids[max(num_needed, 0):]
        self.req_blocks[request.request_id] = blocks + taken
        return True

    def cache_known_blocks(self, request: Request) -> None:
        pass

    def free(self, request: Request) -> None:
        self.free_block_ids += self.req_blocks.pop(request.request_id, [])

    def block_ids(self, request_id: str) -> list[int]:
        return list(self.req_blocks.get(request_id, []))


class Harness:
    """A scheduler over a FakeKVCache, plus request building and a step without a model."""

    def __init__(self, policy: str = "fcfs", num_blocks: int = 64, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 64, max_model_len: int = 256) -> None:
        self.kv = FakeKVCache(num_blocks)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            max_model_len=max_model_len, policy=policy),  # type: ignore[arg-type]
            CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks),
            kv_cache_manager=self.kv)
        self._arrivals = itertools.count()

    def add(self, request_id: str, num_prompt_tokens: int, max_tokens: int = 8, priority: int = 0,
            ignore_eos: bool = True) -> Request:
        request = Request(
            request_id=request_id,
            prompt_token_ids=[100 + i for i in range(num_prompt_tokens)],
            sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos),
            eos_token_ids=frozenset({2}),
            max_tokens=max_tokens,
            priority=priority,
            arrival_seq=next(self._arrivals))
        self.scheduler.add_request(request)
        return request

    def step(self) -> SchedulerOutput:
        """One synchronous step: schedule, then every request that samples gets SAMPLED."""
        out = self.scheduler.schedule()
        self.scheduler.update_from_output(out, ModelRunnerOutput(
            sampled_token_ids={item.request_id: SAMPLED for item in out.scheduled if item.sample}))
        return out

    def step_until(self, condition: Callable[[], bool], max_steps: int = 100) -> SchedulerOutput:
        """Steps until `condition()` holds after a step; returns that step's output."""
        for _ in range(max_steps):
            out = self.step()
            if condition():
                return out
        raise AssertionError(f"not reached in {max_steps} steps")

    @property
    def running_ids(self) -> list[str]:
        return [request.request_id for request in self.scheduler.running]

    @property
    def waiting_ids(self) -> list[str]:
        return [request.request_id for request in self.scheduler.waiting]


def scheduled_ids(out: SchedulerOutput) -> list[str]:
    return [item.request_id for item in out.scheduled]


def test_a_step_never_exceeds_the_token_budget():
    harness = Harness(max_num_batched_tokens=16)
    for i, length in enumerate([9, 13, 2, 30, 5]):
        harness.add(f"r{i}", length, max_tokens=3)
    steps = []
    while harness.scheduler.has_unfinished_requests():
        out = harness.step()
        assert out.num_scheduled_tokens == sum(len(item.token_ids) for item in out.scheduled)
        steps.append(out.num_scheduled_tokens)
    assert max(steps) == 16 and all(n <= 16 for n in steps)
    # every prompt token and every decode input went through exactly once
    assert sum(steps) == (9 + 13 + 2 + 30 + 5) + 5 * 2
    assert not harness.kv.req_blocks and len(harness.kv.free_block_ids) == 64


def test_chunked_prefill_spreads_a_long_prompt_over_steps():
    harness = Harness(max_num_batched_tokens=4)
    request = harness.add("long", 10, max_tokens=2)
    prompt = request.prompt_token_ids
    chunks = []
    while harness.scheduler.has_unfinished_requests():
        out = harness.step()
        [item] = out.scheduled
        chunks.append((item.num_computed_tokens, item.token_ids, item.sample, len(item.new_block_ids),
                       [new.request_id for new in out.new_requests]))
    assert chunks == [
        (0, prompt[0:4], False, 1, ["long"]),      # the workers learn of the request once
        (4, prompt[4:8], False, 1, []),
        (8, prompt[8:10], True, 1, []),            # the last chunk samples the first output token
        (10, [SAMPLED], True, 0, []),              # a decode: 11 tokens still fit in 3 blocks
    ]
    assert request.output_token_ids == [SAMPLED, SAMPLED] and request.status == RequestStatus.FINISHED_LENGTH


def test_running_requests_are_served_before_waiting_ones_are_admitted():
    harness = Harness(max_num_batched_tokens=6)
    harness.add("a", 3)
    harness.add("b", 2)
    assert scheduled_ids(harness.step()) == ["a", "b"]
    harness.add("c", 20)
    out = harness.step()
    # the two decodes first, then the newcomer gets what is left of the budget
    assert [(item.request_id, len(item.token_ids)) for item in out.scheduled] == [("a", 1), ("b", 1), ("c", 4)]
    harness.add("d", 1)
    out = harness.step()
    assert [(item.request_id, len(item.token_ids)) for item in out.scheduled] == [("a", 1), ("b", 1), ("c", 4)]
    assert harness.waiting_ids == ["d"]


def test_max_num_seqs_caps_the_running_requests():
    harness = Harness(max_num_seqs=2)
    for i in range(5):
        harness.add(f"r{i}", 3, max_tokens=2 + i)
    admitted = []
    while harness.scheduler.has_unfinished_requests():
        out = harness.step()
        admitted += [new.request_id for new in out.new_requests]
        assert len(out.scheduled) <= 2 and len(harness.scheduler.running) <= 2
    assert admitted == ["r0", "r1", "r2", "r3", "r4"]


@pytest.mark.parametrize("policy, running, scheduled, preempted, waiting", [
    # fcfs: arrival order, priorities ignored; the last admitted goes first, then the request itself
    ("fcfs", ["a", "b", "c"], ["a"], ["c", "b"], ["b", "c", "d"]),
    # priority: (priority, arrival) order; the lowest priority goes first, then the next lowest
    ("priority", ["c", "a", "b"], ["c"], ["b", "a"], ["d", "a", "b"]),
])
def test_preemption_order(policy, running, scheduled, preempted, waiting):
    # three one-block prompts fill the cache; each decode then needs a second block
    harness = Harness(policy, num_blocks=3)
    harness.add("a", 4, priority=0)
    harness.add("b", 4, priority=1)
    harness.add("c", 4, priority=-1)
    harness.step()
    assert harness.running_ids == running
    harness.add("d", 1, priority=-5)    # fits once blocks are freed, but waits: the step preempted
    out = harness.step()
    assert scheduled_ids(out) == scheduled and out.new_requests == []
    assert out.finished_request_ids == preempted        # the workers drop the victims' state
    assert harness.running_ids == scheduled
    assert harness.waiting_ids == waiting
    assert harness.scheduler.num_preemptions == 2
    assert all(harness.scheduler.requests[r].num_computed_tokens == 0 for r in preempted)


def test_a_preempted_request_resumes_from_its_prompt_and_outputs():
    harness = Harness(num_blocks=3)
    a = harness.add("a", 4, max_tokens=4)
    b = harness.add("b", 4, max_tokens=4)
    harness.step()
    harness.step()              # a takes the third block; b needs a second one and has to go
    assert harness.running_ids == ["a"] and b.num_preemptions == 1 and b.num_computed_tokens == 0
    while a.status == RequestStatus.RUNNING:
        harness.step()
    out = harness.step()
    [new] = out.new_requests
    assert (new.request_id, new.output_token_ids) == ("b", [SAMPLED])
    [item] = out.scheduled      # the whole sequence again, prompt and output, and one more token
    assert item.num_computed_tokens == 0 and item.token_ids == b.prompt_token_ids + [SAMPLED] and item.sample


def test_a_victim_before_the_cursor_leaves_no_request_unscheduled():
    # "low" (ends with its in-flight token: nothing to schedule) sits first in `running` and is
    # the priority victim when "a" needs a block; "b", behind "a", must still get its step.
    harness = Harness("priority", num_blocks=4)
    low = harness.add("low", 8, max_tokens=1, priority=9)
    scheduler = harness.scheduler
    first = scheduler.schedule()                # in flight: its token is not known yet
    harness.add("a", 4)
    harness.add("b", 4)
    assert scheduled_ids(scheduler.schedule()) == ["a", "b"]    # two steps in flight now
    assert harness.running_ids == ["low", "a", "b"] and not harness.kv.free_block_ids
    third = scheduler.schedule()
    assert scheduled_ids(third) == ["a", "b"] and third.finished_request_ids == ["low"]
    # the first step's token arrives for the preempted request: it finishes from the queue
    [done] = scheduler.update_from_output(first, ModelRunnerOutput(sampled_token_ids={"low": SAMPLED}))
    assert done.finish_reason == "length" and low.status == RequestStatus.FINISHED_LENGTH
    assert harness.waiting_ids == []


def test_a_request_preempted_once_comes_back_reserved_and_is_not_preempted_again():
    # 6 blocks of 4 tokens. a, b, c grow together until c (the last admitted) has to go; back once
    # a finishes, c holds a reservation, so when b then needs a block b goes, not c: plain fcfs
    # would have preempted c, the most recently admitted, a second time.
    assert MAX_PREEMPTIONS_PER_REQUEST == 1
    harness = Harness(num_blocks=6)
    a = harness.add("a", 4, max_tokens=8)
    b = harness.add("b", 4, max_tokens=12)
    c = harness.add("c", 4, max_tokens=8)
    out = harness.step_until(lambda: c.num_preemptions == 1)
    assert out.finished_request_ids == ["c"] and harness.running_ids == ["a", "b"]
    harness.step_until(lambda: harness.running_ids == ["b", "c"])
    assert a.status == RequestStatus.FINISHED_LENGTH
    out = harness.step()            # b needs a block and none is free
    assert out.finished_request_ids == ["b"] and scheduled_ids(out) == ["c"] and harness.running_ids == ["c"]
    while harness.scheduler.has_unfinished_requests():
        harness.step()
    assert [r.num_output_tokens for r in (a, b, c)] == [8, 12, 8]
    assert [r.num_preemptions for r in (a, b, c)] == [0, 1, 1]


def test_reserved_requests_are_admitted_only_while_they_fit_together():
    # 7 blocks. b and c are preempted once each; each needs 4 blocks to finish (4 + 12 - 1 tokens),
    # so they run one after the other even where c's recompute alone would fit beside b.
    harness = Harness(num_blocks=7)
    requests = [harness.add(name, 4, max_tokens=12) for name in "abc"]
    b, c = requests[1:]
    harness.step_until(lambda: harness.running_ids == ["b"])
    assert harness.waiting_ids == ["c"] and c.num_preemptions == 1
    assert len(harness.kv.free_block_ids) >= -(-c.num_tokens // BLOCK_SIZE)     # c's blocks are free...
    out = harness.step()
    assert scheduled_ids(out) == ["b"] and harness.waiting_ids == ["c"]           # ...but 4 + 4 > 7
    harness.step_until(lambda: harness.running_ids == ["c"])
    assert b.status == RequestStatus.FINISHED_LENGTH
    while harness.scheduler.has_unfinished_requests():
        harness.step()
    assert [r.num_output_tokens for r in requests] == [12, 12, 12]
    assert [r.num_preemptions for r in requests] == [0, 1, 1]


def test_an_aborted_reserved_request_gives_its_reservation_back():
    harness = Harness(num_blocks=7)
    requests = [harness.add(name, 4, max_tokens=12) for name in "abc"]
    harness.step_until(lambda: harness.running_ids == ["b"])
    assert harness.scheduler.abort_requests(["b"]) == [requests[1]]
    out = harness.step()
    assert [new.request_id for new in out.new_requests] == ["c"] and harness.running_ids == ["c"]


def test_a_request_that_cannot_get_a_reservation_fails_instead_of_waiting_forever():
    # A cache smaller than max_model_len (the engine never builds one: finalize_capacity): a, once
    # preempted, needs 4 blocks to finish in a cache of 3.
    harness = Harness(num_blocks=3)
    b = harness.add("b", 4, max_tokens=4)
    a = harness.add("a", 4, max_tokens=12)
    harness.step_until(lambda: a.status.is_finished)
    assert a.status == RequestStatus.FINISHED_ERROR and a.error == (
        "request needs 4 KV blocks to finish but the cache has 3")
    while harness.scheduler.has_unfinished_requests():
        harness.step()
    assert b.num_output_tokens == 4 and len(harness.kv.free_block_ids) == 3


@pytest.mark.parametrize("policy, first", [("fcfs", "low"), ("priority", "high")])
def test_admission_order_follows_the_policy(policy, first):
    harness = Harness(policy, max_num_seqs=1)
    harness.add("low", 3, max_tokens=1, priority=5)
    harness.add("high", 3, max_tokens=1, priority=-1)
    order = [new.request_id for _ in range(2) for new in harness.step().new_requests]
    assert order == [first, *({"low", "high"} - {first})]


def test_update_from_output_appends_tokens_and_finishes():
    harness = Harness(max_num_batched_tokens=4)
    request = harness.add("r", 6, max_tokens=2)
    scheduler = harness.scheduler
    chunk = scheduler.schedule()
    assert scheduler.update_from_output(chunk, ModelRunnerOutput()) == []     # a chunk that samples nothing
    out = scheduler.schedule()
    assert request.num_pending_tokens == 1
    [output] = scheduler.update_from_output(out, ModelRunnerOutput(
        sampled_token_ids={"r": 42}, logprobs={"r": {42: -0.5}}))
    assert (output.request_id, output.new_token_ids, output.new_logprobs, output.finish_reason) == (
        "r", [42], [{42: -0.5}], None)
    assert output.first_scheduled_time == request.first_scheduled_time is not None
    assert request.output_token_ids == [42] and request.num_pending_tokens == 0
    assert scheduler.num_generation_tokens == 1 and scheduler.num_prompt_tokens == 6
    out = scheduler.schedule()
    [output] = scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"r": 43}))
    assert output.finish_reason == "length" and request.status == RequestStatus.FINISHED_LENGTH
    assert not scheduler.has_unfinished_requests() and "r" not in scheduler.requests
    assert not harness.kv.req_blocks
    assert scheduler.schedule().finished_request_ids == ["r"]      # the workers drop it next step


def test_eos_stops_a_request():
    harness = Harness()
    request = harness.add("r", 3, max_tokens=8, ignore_eos=False)
    out = harness.scheduler.schedule()
    [output] = harness.scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"r": 2}))
    assert output.finish_reason == "stop" and request.status == RequestStatus.FINISHED_STOPPED


def test_a_bad_policy_name_is_refused():
    with pytest.raises(ValueError, match="'lifo'"):
        Harness("lifo")
    with pytest.raises(ValueError, match="scheduling_policy must be 'fcfs' or 'priority', got 'lifo'"):
        EngineArgs(scheduling_policy="lifo").create_config()


@pytest.mark.parametrize("policy, first", [("fcfs", 0), ("priority", 1)])
def test_llm_generate_orders_by_priority_only_under_the_priority_policy(make_llm, policy, first):
    llm = make_llm(max_num_seqs=1, scheduling_policy=policy)
    prompts = [{"prompt_token_ids": p} for p in token_prompts(3)[1:]]
    outputs = llm.generate(prompts, greedy(4), use_tqdm=False, priority=[5, -1])
    second = 1 - first
    assert outputs[first].metrics.first_scheduled_time < outputs[second].metrics.first_scheduled_time
    # one sequence at a time: the second starts once the first has finished
    assert outputs[first].metrics.finished_time <= outputs[second].metrics.first_scheduled_time
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 4]
