"""Liveness under KV-cache pressure: a cache that holds only a few long requests, and 16 or more
concurrent requests near max_model_len. Every request must finish with its exact token count, none
may be preempted more than MAX_PREEMPTIONS_PER_REQUEST times, and the steps stay bounded (the
argument is in engine/core/scheduler.py's docstring).

First the scheduler over the real KVCacheManager, stepped as EngineCore steps it (synchronously,
or with one step in flight as under async scheduling) across both policies, chunked prefill,
prefix caching and n > 1 siblings, and in random mixes with arrivals, aborts and EOS stops; then
the offline LLM on a tiny checkpoint, whose tokens must also match those of an engine with room to
spare.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import pytest

from conftest import greedy
from model_factory import TinyModelSpec
from pagoda.engine import SamplingParams
from pagoda.engine.config import CacheConfig, SchedulerConfig
from pagoda.engine.core.request import Request, RequestStatus
from pagoda.engine.core.scheduler import MAX_PREEMPTIONS_PER_REQUEST, Scheduler
from pagoda.engine.step import ModelRunnerOutput, SchedulerOutput

BLOCK_SIZE = 4
MAX_MODEL_LEN = 64                      # 16 blocks
NUM_BLOCKS = 40                         # two and a half requests of max_model_len
NUM_PROMPTS = 16
SAMPLED = 7


@dataclass
class Run:
    steps: int
    num_scheduled_tokens: int


def make_requests(num_prompts: int, n: int, priorities: bool, seed: int = 0) -> list[Request]:
    """Prompts of 4 to 48 tokens, each with max_tokens that takes it to max_model_len (or 1-2
    short of it); n > 1 makes siblings that share a prompt and a cache salt, as the engine does."""
    rng = random.Random(seed)
    requests = []
    for i in range(num_prompts):
        prompt = [rng.randint(3, 500) for _ in range(rng.randint(4, 48))]
        max_tokens = MAX_MODEL_LEN - len(prompt) - i % 3
        for sibling in range(n):
            requests.append(Request(
                request_id=f"r{i}-{sibling}", prompt_token_ids=prompt,
                sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                eos_token_ids=frozenset({2}), max_tokens=max_tokens,
                priority=rng.randint(0, 3) if priorities else 0, arrival_seq=i,
                cache_salt=f"prompt-{i}" if n > 1 else None))
    return requests


def drive(scheduler: Scheduler, async_scheduling: bool, before_step: Callable[[int], None] = lambda step: None,
          sample: Callable[[], int] = lambda: SAMPLED, max_steps: int = 100_000) -> Run:
    """Steps until every request has finished, as EngineCore.step does: with async scheduling step
    N+1 is scheduled before step N's tokens arrive. `before_step(step)` may add or abort requests;
    `sample()` is each sampled token."""
    steps = num_tokens = 0
    in_flight: Optional[tuple[SchedulerOutput, ModelRunnerOutput]] = None
    while scheduler.has_unfinished_requests() or in_flight is not None:
        assert steps < max_steps, "no end in sight: the scheduler is stuck"
        before_step(steps)
        steps += 1
        out = scheduler.schedule()
        num_tokens += out.num_scheduled_tokens
        result = ModelRunnerOutput(sampled_token_ids={item.request_id: sample() for item in out.scheduled
                                                      if item.sample})
        if not async_scheduling:
            scheduler.update_from_output(out, result)
            continue
        if in_flight is not None:
            scheduler.update_from_output(*in_flight)
        in_flight = None if out.is_empty else (out, result)
        if out.is_empty:
            scheduler.update_from_output(out, result)
    return Run(steps, num_tokens)


def steps_alone(request: Request, budget: int) -> int:
    """Steps to run `request` alone: its prompt in chunks of `budget`, then one per later token."""
    return -(-request.num_prompt_tokens // budget) + request.max_tokens - 1


def check_liveness(requests: list[Request], run: Run, budget: int, num_preemptions: int) -> None:
    for request in requests:
        assert request.status == RequestStatus.FINISHED_LENGTH, (request.request_id, request.status, request.error)
        assert request.num_output_tokens == request.max_tokens, request.request_id
    assert max(request.num_preemptions for request in requests) <= MAX_PREEMPTIONS_PER_REQUEST
    assert num_preemptions > 0, "the cache was meant to be too small for all of them at once"
    # each request is run at most (cap + 1) times from its start, as if alone; a step that
    # schedules nothing follows a preemption
    cap = MAX_PREEMPTIONS_PER_REQUEST
    assert run.steps <= (cap + 1) * sum(steps_alone(r, budget) for r in requests) + 2 * num_preemptions + 2
    assert run.num_scheduled_tokens <= (cap + 1) * sum(r.num_prompt_tokens + r.max_tokens - 1 for r in requests)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix", "no-prefix"])
@pytest.mark.parametrize("budget", [4096, 16], ids=["whole", "chunked"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_every_request_finishes_under_kv_pressure(policy, async_scheduling, budget, prefix_caching, n):
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=NUM_PROMPTS * n, max_num_batched_tokens=budget,
                        max_model_len=MAX_MODEL_LEN, policy=policy),
        CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, enable_prefix_caching=prefix_caching))
    requests = make_requests(NUM_PROMPTS, n, priorities=policy == "priority")
    for request in requests:
        scheduler.add_request(request)
    run = drive(scheduler, async_scheduling)
    check_liveness(requests, run, budget, scheduler.num_preemptions)
    kv = scheduler.kv
    assert kv.num_free_blocks == NUM_BLOCKS and not kv.req_blocks


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_without_pressure_nothing_is_preempted_or_held_back(async_scheduling):
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=NUM_PROMPTS, max_num_batched_tokens=4096, max_model_len=MAX_MODEL_LEN),
        CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_PROMPTS * MAX_MODEL_LEN // BLOCK_SIZE))
    requests = make_requests(NUM_PROMPTS, 1, priorities=False)
    for request in requests:
        scheduler.add_request(request)
    run = drive(scheduler, async_scheduling)
    assert scheduler.num_preemptions == 0
    # all prompts in the first step, then one decode step per token of the longest output
    assert run.steps == max(r.max_tokens for r in requests) + async_scheduling


@pytest.mark.parametrize("seed", range(100))
def test_random_mixes_with_arrivals_aborts_and_stops_all_end(seed):
    """Random cache sizes, budgets and policies, and requests that arrive while others run, get
    aborted or stop at EOS: every request ends (none errs), none is preempted more than the cap,
    and the cache is whole at the end."""
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 16])
    max_model_len = rng.randint(2, 12) * block_size
    num_blocks = max_model_len // block_size * rng.randint(1, 3) + rng.randint(0, 3)     # >= one whole request
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=rng.choice([1, 4, 64]), max_num_batched_tokens=rng.choice([1, 5, 64, 4096]),
                        max_model_len=max_model_len, policy=rng.choice(["fcfs", "priority"])),
        CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=rng.random() < 0.5))
    requests: list[Request] = []

    def arrive() -> None:
        i = len(requests)
        prompt = [rng.randint(3, 40) for _ in range(rng.randint(1, max_model_len - 1))]
        max_tokens = rng.randint(1, max_model_len - len(prompt))
        n = rng.choice([1, 1, 2])
        for sibling in range(n):
            request = Request(f"r{i}-{sibling}", prompt, SamplingParams(max_tokens=max_tokens), frozenset({2}),
                              max_tokens=max_tokens, priority=rng.randint(0, 3), arrival_seq=i,
                              cache_salt=f"prompt-{i}" if n > 1 else None)
            scheduler.add_request(request)
            requests.append(request)

    def before_step(step: int) -> None:
        if step < 200 and rng.random() < 0.05:
            arrive()
        if scheduler.requests and rng.random() < 0.02:
            scheduler.abort_requests([rng.choice(sorted(scheduler.requests))])

    for _ in range(rng.randint(1, 20)):
        arrive()
    # token 2 is EOS: about one sampled token in 50 stops its request
    drive(scheduler, rng.random() < 0.5, before_step, sample=lambda: 2 if rng.random() < 0.02 else SAMPLED)
    for request in requests:
        assert request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                                  RequestStatus.FINISHED_ABORTED), (request.request_id, request.status, request.error)
        assert request.num_preemptions <= MAX_PREEMPTIONS_PER_REQUEST, request.request_id
        if request.status == RequestStatus.FINISHED_LENGTH:
            assert request.num_output_tokens == request.max_tokens, request.request_id
    assert scheduler.kv.num_free_blocks == num_blocks and not scheduler.kv.req_blocks


# -- the offline engine on a tiny checkpoint ----------------------------------------------------------
LLM_MAX_MODEL_LEN = 64
LLM_BLOCK_BYTES = (2 * TinyModelSpec().num_hidden_layers * 16 * TinyModelSpec().num_key_value_heads
                   * TinyModelSpec().head_dim * 4)          # K and V, 16 tokens a block, float32
_rng = random.Random(1)
LLM_PROMPTS = [[_rng.randint(3, 400) for _ in range(_rng.randint(8, 48))] for _ in range(NUM_PROMPTS)]
LLM_PRIORITIES = [_rng.randint(0, 3) for _ in LLM_PROMPTS]
_ROOMY_TOKENS: dict[int, list[list[list[int]]]] = {}       # n -> each prompt's completions, roomy engine


def llm_params(n: int) -> list[SamplingParams]:
    """Greedy, each prompt to max_model_len or 1-2 tokens short of it."""
    return [greedy(LLM_MAX_MODEL_LEN - len(p) - i % 3, n=n) for i, p in enumerate(LLM_PROMPTS)]


def roomy_tokens(make_llm, n: int) -> list[list[list[int]]]:
    if n not in _ROOMY_TOKENS:
        roomy = make_llm(max_model_len=LLM_MAX_MODEL_LEN)
        outputs = roomy.generate([{"prompt_token_ids": p} for p in LLM_PROMPTS], llm_params(n), use_tqdm=False)
        assert roomy.get_metrics().num_preemptions == 0
        _ROOMY_TOKENS[n] = [[c.token_ids for c in o.outputs] for o in outputs]
    return _ROOMY_TOKENS[n]


@pytest.mark.parametrize("engine_kwargs, n", [
    ({"scheduling_policy": "fcfs"}, 1),
    ({"scheduling_policy": "priority"}, 1),
    ({"scheduling_policy": "fcfs", "async_scheduling": True}, 1),
    ({"scheduling_policy": "priority", "async_scheduling": True, "max_num_batched_tokens": 16}, 1),
    ({"scheduling_policy": "fcfs", "enable_prefix_caching": False, "max_num_batched_tokens": 16}, 1),
    ({"scheduling_policy": "fcfs", "async_scheduling": True}, 2),
], ids=["fcfs", "priority", "fcfs-async", "priority-async-chunked", "fcfs-chunked-no-prefix", "fcfs-async-n2"])
def test_llm_finishes_every_request_under_kv_pressure(make_llm, monkeypatch, engine_kwargs, n):
    # 8 blocks of 16 tokens: two sequences of max_model_len at a time, for 16 of them
    tight = make_llm(max_model_len=LLM_MAX_MODEL_LEN, kv_cache_memory_bytes=8 * LLM_BLOCK_BYTES, **engine_kwargs)
    scheduler = tight.engine.core.scheduler
    assert scheduler.num_blocks == 8
    added: list[Request] = []          # the core requests, to read their num_preemptions afterwards
    add_request = scheduler.add_request

    def add_and_keep(request: Request) -> None:
        added.append(request)
        add_request(request)

    monkeypatch.setattr(scheduler, "add_request", add_and_keep)
    params = llm_params(n)
    before = tight.get_metrics()
    outputs = tight.generate([{"prompt_token_ids": p} for p in LLM_PROMPTS], params, use_tqdm=False,
                             priority=LLM_PRIORITIES)
    after = tight.get_metrics()

    # recompute after preemption changes no token; every completion runs to its max_tokens
    assert [[c.token_ids for c in o.outputs] for o in outputs] == roomy_tokens(make_llm, n)
    for output, param in zip(outputs, params):
        assert [(len(c.token_ids), c.finish_reason) for c in output.outputs] == [(param.max_tokens, "length")] * n
    assert len(added) == NUM_PROMPTS * n
    assert max(request.num_preemptions for request in added) <= MAX_PREEMPTIONS_PER_REQUEST
    num_preemptions = after.num_preemptions - before.num_preemptions
    assert num_preemptions > 0
    budget = scheduler.config.max_num_batched_tokens
    steps = after.num_steps - before.num_steps
    assert steps <= (MAX_PREEMPTIONS_PER_REQUEST + 1) * sum(steps_alone(r, budget) for r in added) + 2 * num_preemptions + 2
