"""Speculative decoding (n-gram) through the offline API on tiny random llamas: what comes out is
exactly what plain decoding gives, whatever the engine does around it.

Greedy: token for token, on prompts built to repeat (drafts get accepted) and random ones, sync and
async scheduling, under preemption, over prefix-cache hits of blocks written by verified drafts, in
batches mixing a constrained request (which does not speculate), and with stops (stop token ids,
EOS, stop strings, max_tokens) landing inside an accepted run. Sampling: seeded requests give the
same tokens with and without speculation (each draft position is sampled as a plain step would).
Every step checks the KV bookkeeping; every engine ends with its block pool whole.
"""
from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from conftest import TINY_KV_BYTES, assert_pool_whole, greedy, token_prompts
from model_factory import TinyModelSpec
from pagoda.engine import LLM, SamplingParams, StructuredOutputsParams
from pagoda.engine.metrics import EngineMetrics

SPEC_SETTINGS = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
                 "disable_by_batch_size": 0}
SPEC = json.dumps(SPEC_SETTINGS)
_ids = itertools.count()


def repeating_prompts(count: int, seed: int = 1) -> list[list[int]]:
    """A short random pattern said 3-4 times: a copy of it is what the n-gram proposer drafts."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        pattern = [rng.randint(3, 500) for _ in range(rng.randint(3, 12))]
        prompts.append(pattern * rng.randint(3, 4) + pattern[:rng.randint(0, len(pattern) - 1)])
    return prompts


def generate(llm, prompts, params):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert_pool_whole(llm)
    return outputs


def token_ids(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


class Verifications:
    """Spies on the scheduler's updates: each sampling request's tokens per step, with the number of
    drafts it verified (0 = a plain step); checks the KV bookkeeping after every step."""

    def __init__(self, llm, monkeypatch) -> None:
        scheduler = llm.engine.core.scheduler
        original = scheduler.update_from_output
        self.steps: list[tuple[str, int, list[int]]] = []

        def spy(scheduler_output, runner_output):
            for item in scheduler_output.scheduled:
                emitted = runner_output.spec_token_ids.get(item.request_id)
                if emitted is None and item.request_id in runner_output.sampled_token_ids:
                    emitted = [runner_output.sampled_token_ids[item.request_id]]
                if emitted is not None:
                    self.steps.append((item.request_id, item.num_spec_tokens, list(emitted)))
            outputs = original(scheduler_output, runner_output)
            scheduler.kv.check_invariants()
            return outputs

        monkeypatch.setattr(scheduler, "update_from_output", spy)

    def runs(self, request_id: str) -> list[tuple[int, int, list[int]]]:
        """(output position of the first token, drafts verified, tokens the runner emitted) per step."""
        out, position = [], 0
        for rid, num_spec, emitted in self.steps:
            if rid == request_id:
                out.append((position, num_spec, emitted))
                position += len(emitted)
        return out


def spec_delta(before, after) -> tuple[int, int, int]:
    return (after.spec_decode_num_drafts - before.spec_decode_num_drafts,
            after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens,
            after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_greedy_equals_plain_on_repeating_and_random_prompts(make_llm, monkeypatch, async_scheduling):
    plain = make_llm(async_scheduling=async_scheduling)
    spec = make_llm(async_scheduling=async_scheduling, speculative_config=SPEC)
    assert spec.engine.core.async_scheduling == async_scheduling
    spy = Verifications(spec, monkeypatch)
    prompts = repeating_prompts(6) + token_prompts(6)
    before = spec.get_metrics()
    got = generate(spec, prompts, greedy(32))
    assert token_ids(got) == token_ids(generate(plain, prompts, greedy(32)))
    drafts, draft_tokens, accepted = spec_delta(before, spec.get_metrics())
    assert drafts > 10 and 0 < accepted < draft_tokens
    assert any(len(emitted) == 1 + num_spec for _, num_spec, emitted in spy.steps if num_spec)   # all accepted
    # logprobs are the target's, one per emitted token; 24-token steps mix chunked prefills (some
    # with prompt logprobs) into the verifying steps
    params = [greedy(24, logprobs=2), greedy(24, logprobs=2, prompt_logprobs=1)] * 3
    a = generate(make_llm(async_scheduling=async_scheduling, speculative_config=SPEC, max_num_batched_tokens=24),
                 prompts[:6], params)
    b = generate(plain, prompts[:6], params)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert (x.prompt_logprobs is None) == (y.prompt_logprobs is None)
        for got_entry, want_entry in zip(x.prompt_logprobs or [], y.prompt_logprobs or [], strict=True):
            assert (got_entry is None and want_entry is None) or all(
                got_entry[t].logprob == pytest.approx(want_entry[t].logprob, abs=1e-4) for t in want_entry)
        for got_entry, want_entry in zip(x.outputs[0].logprobs, y.outputs[0].logprobs, strict=True):
            assert got_entry.keys() == want_entry.keys()
            for token, logprob in want_entry.items():
                assert got_entry[token].logprob == pytest.approx(logprob.logprob, abs=1e-4)
                assert got_entry[token].rank == logprob.rank


def test_seeded_sampling_gives_the_same_tokens(make_llm):
    """Each draft position is sampled with the plain step's distribution and seed position, so a
    seeded request's tokens do not change; top-k/p, min-p, penalties, logit_bias, min_tokens, n > 1."""
    plain = make_llm()
    spec = make_llm(speculative_config=SPEC)
    prompts = repeating_prompts(7, seed=5)
    common = dict(max_tokens=30, ignore_eos=True)
    params = [
        SamplingParams(temperature=0.8, seed=1, **common),
        SamplingParams(temperature=1.0, top_k=3, seed=2, logprobs=1, **common),
        SamplingParams(temperature=0.7, top_p=0.5, min_p=0.1, seed=3, **common),
        SamplingParams(temperature=0.5, seed=4, frequency_penalty=0.5, presence_penalty=0.3,
                       repetition_penalty=1.2, **common),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, **common),
        SamplingParams(temperature=0.6, seed=6, logit_bias={prompts[5][0]: 5.0, prompts[5][1]: 3.0},
                       min_tokens=12, stop_token_ids=[prompts[5][2]], max_tokens=30),
        SamplingParams(n=2, temperature=0.9, seed=7, **common),
    ]
    before = spec.get_metrics()
    got = generate(spec, prompts, params)
    assert token_ids(got) == token_ids(generate(plain, prompts, params))
    assert spec_delta(before, spec.get_metrics())[2] > 0
    assert got[1].outputs[0].logprobs is not None and len(got[1].outputs[0].logprobs) == 30


@pytest.mark.parametrize("frequency, presence", [(0.1, 0.0), (0.05, 0.05)])
def test_penalties_count_the_drafts_before_each_position(make_llm, frequency, presence):
    """Light penalties let the model loop (drafts get accepted) while each repeat still shifts the
    logits a little: a draft position must see the drafts before it as output."""
    plain = make_llm()
    spec = make_llm(speculative_config=SPEC)
    prompts = repeating_prompts(8, seed=5) + token_prompts(8)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, frequency_penalty=frequency,
                            presence_penalty=presence)
    before = spec.get_metrics()
    got = generate(spec, prompts, params)
    assert spec_delta(before, spec.get_metrics())[2] > 20
    assert token_ids(got) == token_ids(generate(plain, prompts, params))


def test_preemption_keeps_outputs_and_blocks(make_llm, monkeypatch):
    """A cache of 16 blocks for 8 requests of ~80 tokens: requests are preempted (with their
    drafts' slots) and recomputed; outputs stay those of an engine that never preempts."""
    plain = make_llm()
    spec = make_llm(speculative_config=SPEC, kv_cache_memory_bytes=16 * 16384)
    Verifications(spec, monkeypatch)
    prompts = repeating_prompts(8, seed=3)
    before = spec.get_metrics()
    got = generate(spec, prompts, greedy(48))
    after = spec.get_metrics()
    assert after.num_preemptions > before.num_preemptions
    assert spec_delta(before, after)[2] > 0
    assert token_ids(got) == token_ids(generate(plain, prompts, greedy(48)))


def test_prefix_cache_hits_on_blocks_written_during_speculation(make_llm, monkeypatch):
    """The continuation of an earlier request re-reads its cached blocks, generated tokens included:
    blocks are registered only once verified, so the KV read back is right."""
    plain = make_llm()
    spec = make_llm(speculative_config=SPEC)
    Verifications(spec, monkeypatch)
    prompts = repeating_prompts(4, seed=8)
    first = generate(spec, prompts, greedy(40))
    continued = [p + o.outputs[0].token_ids[:35] for p, o in zip(prompts, first)]
    before = spec.get_metrics()
    got = generate(spec, continued, greedy(24))
    after = spec.get_metrics()
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 16 * 4
    assert spec_delta(before, after)[0] > 0
    assert token_ids(got) == token_ids(generate(plain, continued, greedy(24)))


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_batch_mixing_constrained_and_speculating_requests(make_llm, monkeypatch, async_scheduling):
    plain = make_llm(async_scheduling=async_scheduling)
    spec = make_llm(async_scheduling=async_scheduling, speculative_config=SPEC)
    spy = Verifications(spec, monkeypatch)
    prompts = repeating_prompts(5, seed=9)
    regex = r"[a-c]{2,6}-[0-9]{1,3}"
    params = [greedy(36)] * 4 + [SamplingParams(temperature=0.0, max_tokens=24,
                                                structured_outputs=StructuredOutputsParams(regex=regex))]
    got = generate(spec, prompts, params)
    assert token_ids(got) == token_ids(generate(plain, prompts, params))
    assert re.fullmatch(regex, got[4].outputs[0].text)
    constrained = got[4].request_id
    assert all(num_spec == 0 for rid, num_spec, _ in spy.steps if rid == constrained)
    assert any(num_spec for rid, num_spec, _ in spy.steps if rid != constrained)


def _inside_runs(spy: Verifications, outputs, tokenizer=None):
    """(prompt index, position) of accepted drafts with tokens after them in the same step (the
    step emitted more), whose token (or text) does not occur earlier in that output."""
    found = []
    for index, output in enumerate(outputs):
        tokens = output.outputs[0].token_ids
        for start, num_spec, emitted in spy.runs(output.request_id):
            for j in range(len(emitted) - 1):
                p = start + j
                if tokenizer is None:
                    if tokens[p] not in tokens[:p]:
                        found.append((index, p))
                else:
                    piece = tokenizer.decode([tokens[p]])
                    if re.fullmatch(r"[A-Za-z]{2,}", piece.strip()) and piece.strip() not in tokenizer.decode(tokens[:p]):
                        found.append((index, p))
    return found


def test_stops_inside_an_accepted_run(make_llm, monkeypatch):
    """A stop token, EOS or stop string in the middle of a step's accepted drafts ends the output
    there, as in plain decoding: what the step verified after it is dropped. max_tokens trims the
    drafts beforehand, so it lands exactly too."""
    plain = make_llm()
    spec = make_llm(speculative_config=SPEC)
    spy = Verifications(spec, monkeypatch)
    # NOTE: a random model rarely copies its prompt, but it does continue its own greedy text: with
    # 12 tokens of that text in the prompt, drafts copied from them bring tokens new to the output
    base = token_prompts(10, seed=4)
    prompts = [p + o.outputs[0].token_ids[:12] for p, o in zip(base, generate(plain, base, greedy(12)))]
    reference = generate(spec, prompts, greedy(48))
    token_cases = _inside_runs(spy, reference)
    text_cases = _inside_runs(spy, reference, spec.get_tokenizer())
    assert token_cases and text_cases, "the prompts give no accepted run to stop inside"
    index, p = token_cases[0]
    stop_token = reference[index].outputs[0].token_ids[p]

    def both(params, prompt_index=index):
        spy.steps.clear()
        got = generate(spec, [prompts[prompt_index]], params)[0].outputs[0]
        want = generate(plain, [prompts[prompt_index]], params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
            (want.token_ids, want.text, want.finish_reason, want.stop_reason)
        return got

    got = both(SamplingParams(temperature=0.0, max_tokens=48, stop_token_ids=[stop_token]))
    assert len(got.token_ids) == p + 1 and got.stop_reason == stop_token
    assert sum(len(emitted) for _, _, emitted in spy.steps) > p + 1     # verified beyond the stop, dropped

    got = both(SamplingParams(temperature=0.0, max_tokens=p + 1, ignore_eos=True))
    assert len(got.token_ids) == p + 1 and got.finish_reason == "length"

    # EOS: the same token made the request's end-of-sequence id
    spy.steps.clear()
    [eos_output] = generate_with_eos(spec, [prompts[index]], greedy(48), eos=stop_token)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=False)
    [plain_output] = generate_with_eos(plain, [prompts[index]], params, eos=stop_token)
    assert eos_output.outputs[0].token_ids == plain_output.outputs[0].token_ids == \
        reference[index].outputs[0].token_ids[:p + 1]
    assert eos_output.outputs[0].finish_reason == "stop"
    assert sum(len(emitted) for _, _, emitted in spy.steps) > p + 1

    index, p = text_cases[0]
    stop = spec.get_tokenizer().decode([reference[index].outputs[0].token_ids[p]]).strip()
    got = both(SamplingParams(temperature=0.0, max_tokens=48, stop=[stop]), prompt_index=index)
    assert got.finish_reason == "stop" and got.stop_reason == stop and len(got.token_ids) == p + 1
    assert sum(len(emitted) for _, _, emitted in spy.steps) > p + 1


def generate_with_eos(llm, prompts, params, eos: int):
    """As LLM.generate, with `eos` as every request's end-of-sequence token (ignore_eos is honoured)."""
    params = SamplingParams(**{**params.__dict__, "ignore_eos": False})
    ids = []
    for prompt in prompts:
        processed = llm.engine.input_processor.process(f"eos-{next(_ids)}", {"prompt_token_ids": prompt}, params, 0)
        for request in processed.core_requests:
            request.eos_token_ids = frozenset({eos})
        llm.engine.add_processed(processed)
        ids.append(processed.request_id)
    outputs = llm._run(ids, use_tqdm=False)
    assert_pool_whole(llm)
    return outputs


def test_metrics_count_drafts_and_acceptance(make_llm, monkeypatch):
    spec = make_llm(speculative_config=SPEC)
    spy = Verifications(spec, monkeypatch)
    before = spec.get_metrics()
    generate(spec, repeating_prompts(6, seed=12), greedy(32))
    after = spec.get_metrics()
    verified = [(num_spec, len(emitted) - 1) for _, num_spec, emitted in spy.steps if num_spec]
    assert spec_delta(before, after) == (len(verified), sum(n for n, _ in verified), sum(a for _, a in verified))
    per_pos = [a - b for a, b in zip(after.spec_decode_num_accepted_tokens_per_pos,
                                     before.spec_decode_num_accepted_tokens_per_pos)]
    assert len(per_pos) == SPEC_SETTINGS["num_speculative_tokens"]
    assert per_pos == [sum(1 for _, a in verified if a > j) for j in range(len(per_pos))]
    assert per_pos[0] > 0
    metrics = EngineMetrics()
    metrics.record_stats("tiny", after)
    text = metrics.render().decode()
    assert f'pagoda:spec_decode_num_drafts_total{{model_name="tiny"}} {float(after.spec_decode_num_drafts)}' in text
    assert (f'pagoda:spec_decode_num_accepted_tokens_total{{model_name="tiny"}} '
            f'{float(after.spec_decode_num_accepted_tokens)}') in text
    assert "pagoda:spec_decode_num_draft_tokens_total" in text
    assert (f'pagoda:spec_decode_num_accepted_tokens_per_pos_total{{model_name="tiny",position="0"}} '
            f'{float(after.spec_decode_num_accepted_tokens_per_pos[0])}') in text
    plain = EngineMetrics()
    plain.record_stats("tiny", make_llm().get_metrics())
    assert "spec_decode_num_drafts_total{" not in plain.render().decode()


def test_disable_by_batch_size_switches_speculation_off(tiny_checkpoint):
    # (a dict, as LLM(speculative_config={...}) takes it in vLLM)
    spec = LLM(model=str(tiny_checkpoint(TinyModelSpec())), kv_cache_memory_bytes=TINY_KV_BYTES,
               speculative_config={**SPEC_SETTINGS, "disable_by_batch_size": 3})
    assert spec.engine.config.speculative.disable_by_batch_size == 3
    prompts = repeating_prompts(4, seed=13)
    before = spec.get_metrics()
    generate(spec, prompts, greedy(24))             # 4 requests finish together: always >= 3 running
    middle = spec.get_metrics()
    assert spec_delta(before, middle) == (0, 0, 0)
    generate(spec, prompts[:2], greedy(24))         # 2 < 3
    assert spec_delta(middle, spec.get_metrics())[0] > 0
    spec.shutdown()


@pytest.mark.slow
def test_default_model_greedy_equal_with_accepted_drafts():
    """SmolLM2-135M: asked to repeat a list, it copies, and the n-gram drafts are accepted."""
    common = dict(max_model_len=512, kv_cache_memory_bytes=64 << 20)
    plain = LLM(model="default", **common)
    spec = LLM(model="default", speculative_config=SPEC, **common)
    tokenizer = plain.get_tokenizer()
    text = ("Repeat the list exactly.\nList: apple, banana, cherry, dates, elderberry, fig, grape, honeydew.\n"
            "Repeated list: apple, banana, cherry,")
    prompts = [tokenizer.encode(text)]
    want = generate(plain, prompts, greedy(20))
    got = generate(spec, prompts, greedy(20))
    assert token_ids(got) == token_ids(want)
    stats = spec.get_metrics()
    assert stats.spec_decode_num_accepted_tokens > 0
    print(f"acceptance {stats.spec_decode_num_accepted_tokens / stats.spec_decode_num_draft_tokens:.2f} "
          f"({stats.spec_decode_num_accepted_tokens} of {stats.spec_decode_num_draft_tokens} drafts)")
