"""Speculative decoding's parts on their own, no model: the config's validation, the n-gram
proposer, the controller's switch-offs, and the scheduler with the real KV cache manager under a
fake runner that records which token's KV every cache slot holds (so a block registered in the
prefix cache with a rejected draft's KV, or a computed position left wrong, is caught at once).
"""
from __future__ import annotations

import argparse
import random
from typing import Optional

import numpy as np
import pytest

from pagoda.engine.config import (DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE, CacheConfig, EngineArgs, SchedulerConfig,
                                  SpeculativeConfig)
from pagoda.engine.core.kv_cache import KVCacheManager
from pagoda.engine.core.request import Request, RequestStatus
from pagoda.engine.core.scheduler import Scheduler
from pagoda.engine.entrypoints import cli_args
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.spec_decode import controller as controller_module
from pagoda.engine.spec_decode.controller import SpecDecodeController
from pagoda.engine.spec_decode.ngram import NgramProposer, propose_from_tokens
from pagoda.engine.spec_decode.step_costs import COST_MARGIN, StepCosts, speculation_pays
from pagoda.engine.step import ModelRunnerOutput, SchedulerOutput


# -- config ------------------------------------------------------------------------------------------
def test_config_defaults_and_forms():
    config = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}')
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max,
            config.disable_by_batch_size) == ("ngram", 3, 2, 4, DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE)
    assert SpeculativeConfig.parse(None) is None
    assert SpeculativeConfig.parse({"model": "[ngram]", "num_speculative_tokens": 1}).method == "ngram"
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2,
                                    "prompt_lookup_max": 1}).prompt_lookup_min == 1
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2,
                                    "prompt_lookup_min": 6}).prompt_lookup_max == 6
    for no_limit in (None, 0):
        assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2,
                                        "disable_by_batch_size": no_limit}).disable_by_batch_size is None
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2,
                                    "disable_by_batch_size": 2}).disable_by_batch_size == 2
    # no limit given: the engine measures the cutoff for n-gram drafts (a draft model's cost is not timed)
    assert config.auto_cutoff and config.measured_cutoff
    for given in (None, 0, 8):
        explicit = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2,
                                            "disable_by_batch_size": given})
        assert not explicit.auto_cutoff and not explicit.measured_cutoff
    draft = SpeculativeConfig.parse({"method": "draft_model", "model": "/d", "num_speculative_tokens": 2})
    assert draft.auto_cutoff and not draft.measured_cutoff
    assert draft.disable_by_batch_size == DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE


@pytest.mark.parametrize("value, named", [
    ("{not json", "speculative_config is not valid JSON"),
    ("[1, 2]", "speculative_config must be a JSON object"),
    ({"method": "ngram", "num_speculative_tokens": 2, "bogus": 1}, "unknown key(s) ['bogus']"),
    ({"num_speculative_tokens": 2}, "speculative_config.method must be one of"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "speculative_config.method must be one of"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model is required"),
    ({"model": "some/draft", "num_speculative_tokens": 2, "prompt_lookup_min": 2},
     "speculative_config.prompt_lookup_min does not apply to method 'draft_model'"),
    ({"method": "ngram"}, "speculative_config.num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens must be"),
    ({"method": "ngram", "num_speculative_tokens": 99}, "speculative_config.num_speculative_tokens must be"),
    ({"method": "ngram", "num_speculative_tokens": True}, "speculative_config.num_speculative_tokens must be"),
    ({"method": "ngram", "num_speculative_tokens": "3"}, "speculative_config.num_speculative_tokens must be"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "speculative_config.prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 1.5}, "speculative_config.prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min must be <= prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 1},
     "speculative_config.disable_by_batch_size must be"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": -4},
     "speculative_config.disable_by_batch_size must be"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": "8"},
     "speculative_config.disable_by_batch_size must be"),
])
def test_every_bad_value_is_named(value, named):
    with pytest.raises(ValueError) as error:
        SpeculativeConfig.parse(value)
    assert named in str(error.value)
    # through EngineArgs too, before the model is even looked up
    with pytest.raises(ValueError, match="speculative_config"):
        EngineArgs(model="/nonexistent/model", speculative_config=value).create_config()


def test_cli_flag_reaches_engine_args():
    parser = argparse.ArgumentParser()
    cli_args.add_engine_flags(parser)
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 5}'])
    args.model = "m"
    engine_args = cli_args.engine_args_from(args)
    assert SpeculativeConfig.parse(engine_args.speculative_config).num_speculative_tokens == 5
    args = parser.parse_args([])
    args.model = "m"
    assert cli_args.engine_args_from(args).speculative_config is None


# -- n-gram proposer ---------------------------------------------------------------------------------
def drafts_for(tokens, min_n=1, max_n=3, k=4):
    return propose_from_tokens(np.asarray(tokens, dtype=np.int64), min_n, max_n, k)


def test_ngram_prefers_the_longest_match():
    #        0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 9, 8, 5, 2, 3, 7, 6, 2, 3]
    assert drafts_for(tokens, max_n=1) == [7, 6, 2, 3]       # "3" twice, both followed by 4+: the latest
    assert drafts_for(tokens, max_n=3, k=6) == [9, 8, 5, 2, 3, 7]    # only the older "2 3" has 6 after it
    tokens = [5, 1, 2, 3, 4, 4, 4, 9, 2, 3, 6, 1, 2, 3]
    assert drafts_for(tokens, max_n=3) == [4, 4, 4, 9]       # "1 2 3" beats the later "2 3"
    assert drafts_for(tokens, max_n=2) == [6, 1, 2, 3]       # only 2-grams: the later "2 3"
    assert drafts_for(tokens, min_n=4, max_n=4) == []        # no 4-gram repeats
    assert drafts_for([1, 2, 3, 4]) == [] and drafts_for([7]) == []


def test_ngram_loops_draft_a_full_continuation():
    assert drafts_for([4, 9, 9, 9, 9, 9, 9], k=3) == [9, 9, 9]
    assert drafts_for([1, 2, 1, 2, 1], k=4) == [2, 1]        # the longest match ("1 2 1") has 2 after it
    assert drafts_for([1, 2, 1, 2, 1, 2, 1, 2, 1], k=2) == [2, 1]


def make_request(request_id: str, prompt: list[int], max_tokens: int = 32, **params) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(prompt),
                   sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params),
                   eos_token_ids=frozenset({2}), max_tokens=max_tokens)


def test_ngram_proposer_follows_appended_tokens():
    config = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                      "prompt_lookup_max": 2})
    proposer = NgramProposer(config)
    request = make_request("a", [10, 11, 12, 13, 10, 11])
    assert proposer.propose([request]) == {"a": [12, 13, 10]}
    request.output_token_ids += [12, 99] + list(range(200, 300))        # the buffer grows past its size
    assert proposer.propose([request]) == {}
    request.output_token_ids.append(250)
    assert proposer.propose([request]) == {"a": [251, 252, 253]}
    other = make_request("b", [5, 5, 5])
    assert proposer.propose([other]) == {"b": [5]} and list(proposer._buffers) == ["b"]


# -- controller --------------------------------------------------------------------------------------
def decoding(request_id: str, num_output: int = 3, max_tokens: int = 64, prompt_len: int = 8) -> Request:
    request = make_request(request_id, [3 + i for i in range(prompt_len)], max_tokens=max_tokens)
    request.output_token_ids = [7] * num_output
    request.num_computed_tokens = request.num_tokens - 1
    request.status = RequestStatus.RUNNING
    return request


class FixedProposer(NgramProposer):
    def __init__(self, config, drafts: dict[str, list[int]]) -> None:
        super().__init__(config)
        self.drafts = drafts

    def propose(self, requests):
        return {r.request_id: self.drafts[r.request_id] for r in requests if r.request_id in self.drafts}


def test_controller_switches_off_by_batch_size_and_for_constrained_or_prefilling_requests():
    config = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 3})
    controller = SpecDecodeController(config, max_model_len=512)
    two, three = [decoding("a"), decoding("b")], [decoding("a"), decoding("b"), decoding("c")]
    assert controller.step_speculates(two) and not controller.step_speculates(three)
    prefilling = decoding("p")
    prefilling.num_computed_tokens = 4
    constrained = decoding("g")
    constrained.grammar = object()          # type: ignore[assignment]
    nearly_done = decoding("d", num_output=63)
    assert not controller.step_speculates([prefilling, constrained, nearly_done])
    in_flight = decoding("f")
    in_flight.num_computed_tokens += 1
    in_flight.num_pending_tokens = 1
    assert controller.step_speculates([in_flight])          # its token will be known once drained
    assert controller.propose([in_flight]) == {}            # ... but not before


def test_controller_pauses_a_request_whose_drafts_fail_then_retries():
    config = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2})
    good, bad = decoding("good"), decoding("bad")
    controller = SpecDecodeController(config, max_model_len=512,
                                      proposer=FixedProposer(config, {"good": [1, 2], "bad": [1, 2]}))
    requests = {"good": good, "bad": bad}
    paused_at = []
    for step in range(60):
        assert controller.step_speculates([good, bad])
        drafts = controller.propose([good, bad])
        if "bad" not in drafts:
            paused_at.append(controller.step)
        scheduled = [item(r, len(d)) for r, d in drafts.items()]
        output = SchedulerOutput(scheduled=scheduled, num_spec_tokens=sum(i.num_spec_tokens for i in scheduled))
        output_tokens = {"good": [1, 2, 3], "bad": [5]}          # all accepted / none accepted
        controller.observe(output, ModelRunnerOutput(spec_token_ids={r: output_tokens[r] for r in drafts}), requests)
    assert good.speculation.paused_until == 0
    # the bad one pauses after each warm-up: for FIRST_PAUSE_STEPS, then twice, four times as long
    first, warmup = controller_module.FIRST_PAUSE_STEPS, controller_module.WARMUP_OBSERVATIONS
    second_start = warmup + first + warmup + 1
    third_start = second_start + 2 * first + warmup
    assert paused_at == (list(range(warmup + 1, warmup + first + 1)) + list(range(second_start, second_start + 2 * first))
                         + list(range(third_start, 61)))
    assert controller.num_drafts == 60 + (60 - len(paused_at))
    assert controller.num_accepted_tokens_per_pos == [60, 60]


# -- the measured cutoff (step_costs.py) ---------------------------------------------------------------
def costs(ratios: dict[int, float]) -> StepCosts:
    """Step costs whose verify / decode ratio per bucket is `ratios` (decode steps of 10 ms)."""
    buckets = tuple(sorted(ratios))
    return StepCosts(buckets, tuple(0.01 for _ in buckets), tuple(0.01 * ratios[b] for b in buckets), 1024)


def test_step_costs_ratio_and_rule():
    table = costs({1: 1.05, 8: 1.3, 32: 2.4, 64: 4.0})
    assert table.ratio(1) == pytest.approx(1.05) and table.ratio(5) == pytest.approx(1.3)
    assert table.ratio(64) == pytest.approx(4.0) and table.ratio(65) is None and table.max_batch == 64
    assert "batch 1 1.05x, 8 1.30x, 32 2.40x, 64 4.00x" in table.describe()
    margin = 1 + COST_MARGIN
    # 1 + (s / B) * a >= (1 + margin) * ratio
    assert speculation_pays(table, 1, 1, 0.2)                           # 1.2 >= 1.155
    assert not speculation_pays(table, 1, 1, 0.1)                       # 1.1 < 1.155
    assert speculation_pays(table, 32, 32, 2.4 * margin - 1 + 1e-9)
    assert not speculation_pays(table, 32, 16, 2.4 * margin - 1)         # half of them: half the gain
    assert not speculation_pays(table, 65, 65, 4.0)                     # above the graphs: eager, never
    assert not speculation_pays(table, 4, 0, 4.0)
    for bad, message in (((), "one decode and one verify time per bucket"), ((2, 1), "ascending"),
                         ((0,), "ascending batch sizes >= 1")):
        with pytest.raises(ValueError, match=message):
            StepCosts(bad, (0.01,) * len(bad), (0.01,) * len(bad), 1)
    with pytest.raises(ValueError, match="must be > 0 s"):
        StepCosts((1,), (0.0,), (0.01,), 1)


def test_controller_decides_by_measured_costs_and_observed_acceptance():
    config = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 4})
    controller = SpecDecodeController(config, max_model_len=512)
    batch = [decoding(f"r{i}") for i in range(24)]
    # nothing measured (CPU, eager): the default limit
    assert not controller.step_speculates(batch)
    assert controller.step_speculates(batch[:DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE - 1])
    controller.use_step_costs(costs({1: 1.02, 8: 1.2, 32: 2.0}))
    assert controller.step_costs is not None
    assert controller.step_speculates(batch)                            # 24 < 32: 1 + 4 >= 2.2 (optimistic start)
    assert not controller.step_speculates(batch + [decoding(f"x{i}") for i in range(9)])   # 33: no graph
    # verifications that accept one draft in four: a -> 1, which no longer pays at 24 (2 < 2.2) but at 8
    for _ in range(60):
        scheduled = [item(r.request_id, 4) for r in batch]
        controller.observe(SchedulerOutput(scheduled=scheduled, num_spec_tokens=4 * len(batch)),
                           ModelRunnerOutput(spec_token_ids={r.request_id: [1, 2] for r in batch}),
                           {r.request_id: r for r in batch})
    assert controller.accepted_per_verification == pytest.approx(1.0, abs=0.01)
    assert not controller.step_speculates(batch)
    assert controller.step_speculates(batch[:8])                        # 1 + 1 >= 1.32
    # a user's limit is kept as given: no measured decision
    fixed = SpecDecodeController(SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 4,
                                                          "disable_by_batch_size": 64}), max_model_len=512)
    fixed.use_step_costs(costs({1: 1.02, 8: 1.2, 32: 2.0}))
    assert fixed.step_costs is None and fixed.step_speculates(batch + batch)


def item(request_id: str, num_spec: int):
    from pagoda.engine.step import ScheduledRequest

    return ScheduledRequest(request_id, [0] * (1 + num_spec), 0, [], True, num_spec_tokens=num_spec)


# -- the scheduler with drafts, over the real KV cache manager ---------------------------------------
BLOCK_SIZE = 4


def true_token(request_id: str, position: int) -> int:
    """The fake model's greedy choice at `position` (a function of the request and position only)."""
    return 10 + ((sum(map(ord, request_id)) * 31 + position * 7) % 5 if position % 3 else position % 7)


class FakeRunner:
    """Writes each scheduled token's 'KV' (the token id) into its slot and verifies drafts against
    `true_token`, as the model runner would; checks that every computed position and every cached
    block holds the right token's KV."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.kv = scheduler.kv
        self.slots: dict[int, list[Optional[int]]] = {}

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        result = ModelRunnerOutput()
        for item in out.scheduled:
            blocks = self.kv.block_ids(item.request_id)
            for i, token in enumerate(item.token_ids):
                position = item.num_computed_tokens + i
                self.slots.setdefault(blocks[position // BLOCK_SIZE], [None] * BLOCK_SIZE)[position % BLOCK_SIZE] = token
            if not item.sample:
                continue
            next_position = item.num_computed_tokens + len(item.token_ids) - item.num_spec_tokens
            if not item.num_spec_tokens:
                result.sampled_token_ids[item.request_id] = true_token(item.request_id, next_position)
                continue
            targets = [true_token(item.request_id, next_position + j) for j in range(1 + item.num_spec_tokens)]
            drafts = item.token_ids[-item.num_spec_tokens:]
            accepted = next((j for j, (d, t) in enumerate(zip(drafts, targets)) if d != t), len(drafts))
            result.spec_token_ids[item.request_id] = targets[:accepted + 1]
        return result

    def check(self) -> None:
        self.kv.check_invariants()
        for request in self.scheduler.running:
            blocks = self.kv.block_ids(request.request_id)
            tokens = request.prompt_token_ids + request.output_token_ids
            for position in range(request.num_computed_tokens):
                assert self.slots[blocks[position // BLOCK_SIZE]][position % BLOCK_SIZE] == tokens[position], (
                    f"{request.request_id}: position {position} holds another token's KV")
        for block_hash, block in self.kv.pool.hash_to_block.items():
            owners = [r for r in self.scheduler.running if block.block_id in self.kv.block_ids(r.request_id)]
            for request in owners:
                index = self.kv.block_ids(request.request_id).index(block.block_id)
                if index < len(request.block_hashes) and request.block_hashes[index] == block_hash:
                    tokens = request.prompt_token_ids + request.output_token_ids
                    assert self.slots[block.block_id] == tokens[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE], (
                        f"cached block {block.block_id} holds unverified KV")


def draft_guess(request: Request, rng: random.Random, k: int) -> list[int]:
    """Drafts that are right for a while, then wrong (as a proposer's are)."""
    position = request.num_tokens
    right = rng.randint(0, k)
    return [true_token(request.request_id, position + j) if j < right else 99 for j in range(rng.randint(1, k))]


@pytest.mark.parametrize("num_blocks, prefix_caching", [(64, True), (14, True), (14, False)],
                         ids=["roomy", "preempting", "no-prefix-cache"])
def test_scheduler_verification_keeps_kv_and_blocks_right(num_blocks, prefix_caching):
    rng = random.Random(num_blocks)
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, prefix_caching)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=20, max_model_len=48),
                          CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks), kv_cache_manager=kv)
    runner = FakeRunner(scheduler)
    shared = [20 + i for i in range(9)]
    for i in range(7):
        scheduler.add_request(make_request(f"r{i}", shared + [30 + i] * (i % 3), max_tokens=18 + i))
    finished: dict[str, list[int]] = {}
    verified = accepted = 0
    for _ in range(400):
        drafts = {r.request_id: draft_guess(r, rng, 4) for r in scheduler.running}
        out = scheduler.schedule(drafts)
        assert out.num_scheduled_tokens <= 20
        for entry in out.scheduled:
            verified += entry.num_spec_tokens
        result = runner.execute(out)
        accepted += sum(len(t) - 1 for t in result.spec_token_ids.values())
        for output in scheduler.update_from_output(out, result):
            finished.setdefault(output.request_id, []).extend(output.new_token_ids)
        runner.check()
        if not scheduler.has_unfinished_requests():
            break
    assert not scheduler.has_unfinished_requests()
    for i in range(7):
        prompt_len = len(shared) + i % 3
        assert finished[f"r{i}"] == [true_token(f"r{i}", prompt_len + j) for j in range(18 + i)]
    assert verified > 40 and 0 < accepted < verified
    if num_blocks == 14:
        assert scheduler.num_preemptions > 0
    kv.check_invariants()
    assert kv.num_free_blocks == num_blocks and not kv.req_blocks


def test_drafts_give_way_to_other_requests_and_limits():
    kv = KVCacheManager(64, BLOCK_SIZE, True)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8, max_model_len=24),
                          CacheConfig(block_size=BLOCK_SIZE, num_blocks=64), kv_cache_manager=kv)
    requests = [make_request(f"r{i}", [5 + i] * 2, max_tokens=10) for i in range(4)]
    for request in requests:
        scheduler.add_request(request)
    runner = FakeRunner(scheduler)
    out = scheduler.schedule()                          # the prefills: 4 x 2 tokens
    scheduler.update_from_output(out, runner.execute(out))
    assert all(r.num_output_tokens == 1 for r in requests)
    out = scheduler.schedule({r.request_id: [1, 2, 3, 4, 5, 6] for r in requests})
    # 8 tokens: the first request takes 1 + 4 drafts, leaving one token for each of the other three
    assert [len(item.token_ids) for item in out.scheduled] == [5, 1, 1, 1]
    assert [item.num_spec_tokens for item in out.scheduled] == [4, 0, 0, 0]
    result = runner.execute(out)
    scheduler.abort_requests([r.request_id for r in requests[1:]])      # aborted with the step in flight
    scheduler.update_from_output(out, result)
    # max_tokens: 10 outputs at most, so a request with 8 gets 1 draft; max_model_len likewise
    request = requests[0]
    request.output_token_ids += [7] * (8 - request.num_output_tokens)
    request.num_computed_tokens = request.num_tokens - 1
    out = scheduler.schedule({request.request_id: [1, 2, 3]})
    assert out.scheduled[0].num_spec_tokens == 1
    scheduler.update_from_output(out, runner.execute(out))
    scheduler.abort_requests([request.request_id])
    kv.check_invariants()
    assert kv.num_free_blocks == 64


def test_drafts_are_dropped_rather_than_preempting():
    kv = KVCacheManager(3, BLOCK_SIZE, False)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=12),
                          CacheConfig(block_size=BLOCK_SIZE, num_blocks=3), kv_cache_manager=kv)
    a, b = make_request("a", [5, 6, 7], max_tokens=8), make_request("b", [8, 9, 4], max_tokens=8)
    scheduler.add_request(a)
    scheduler.add_request(b)
    runner = FakeRunner(scheduler)
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner.execute(out))
    # a and b hold a block each (3 tokens + the next), one is free: a's 6 drafts would need 2 more
    out = scheduler.schedule({"a": [1, 2, 3, 4, 5, 6], "b": [1]})
    assert [(item.request_id, item.num_spec_tokens) for item in out.scheduled] == [("a", 0), ("b", 1)]
    assert scheduler.num_preemptions == 0
    scheduler.update_from_output(out, runner.execute(out))
    scheduler.abort_requests(["a", "b"])
    kv.check_invariants()
    assert kv.num_free_blocks == 3
