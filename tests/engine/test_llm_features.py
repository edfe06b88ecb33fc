"""Engine behaviour on a tiny model: prefix caching, chunked prefill, preemption, sampling, n,
stop conditions, priorities, aborts. Identical greedy outputs are the oracle for the scheduling
features; the block pool must be whole after every test (see conftest)."""
from __future__ import annotations

import pytest
from conftest import greedy, token_prompts
from model_factory import TinyModelSpec

from pagoda.engine import SamplingParams


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def as_inputs(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def test_prefix_caching_on_off_identical_and_hits(make_llm):
    shared = token_prompts(1, seed=5)[0] * 1 + list(range(100, 150))      # 51+ tokens of shared prefix
    prompts = [shared + [200 + i, 201 + i, 7 * i + 3] for i in range(6)]
    on = make_llm(enable_prefix_caching=True)
    off = make_llm(enable_prefix_caching=False)
    before = on.get_metrics().prefix_cache_hits
    first = on.generate(as_inputs(prompts[:1]), greedy(12), use_tqdm=False)
    rest = on.generate(as_inputs(prompts[1:]), greedy(12), use_tqdm=False)
    stats = on.get_metrics()
    assert stats.prefix_cache_hits - before >= 5 * 48      # 3 full blocks of 16 shared, per later prompt
    reference = off.generate(as_inputs(prompts), greedy(12), use_tqdm=False)
    assert token_ids(first + rest) == token_ids(reference)
    assert off.get_metrics().prefix_cache_hits == 0
    assert rest[0].num_cached_tokens >= 48


def test_chunked_prefill_identical(make_llm):
    prompts = token_prompts(10)
    big = make_llm(max_num_batched_tokens=4096)
    small = make_llm(max_num_batched_tokens=7)      # every prompt of > 7 tokens is split into chunks
    assert token_ids(small.generate(as_inputs(prompts), greedy(10), use_tqdm=False)) == \
        token_ids(big.generate(as_inputs(prompts), greedy(10), use_tqdm=False))


def test_preemption_identical_and_counted(make_llm):
    prompts = token_prompts(10)
    ample = make_llm()
    # 12 blocks of 16 tokens (192 tokens) for 10 sequences of up to 70 + 24 tokens: must preempt
    spec = TinyModelSpec()
    block_bytes = 2 * spec.num_hidden_layers * 16 * spec.num_key_value_heads * spec.head_dim * 4
    tight = make_llm(kv_cache_memory_bytes=12 * block_bytes, enable_prefix_caching=False)
    expected = token_ids(ample.generate(as_inputs(prompts), greedy(24), use_tqdm=False))
    got = token_ids(tight.generate(as_inputs(prompts), greedy(24), use_tqdm=False))
    assert tight.get_metrics().num_preemptions > 0
    assert got == expected
    assert all(len(t) == 24 for t in got)      # no token lost


def test_request_larger_than_cache_is_refused_not_hung(make_llm):
    spec = TinyModelSpec()
    block_bytes = 2 * spec.num_hidden_layers * 16 * spec.num_key_value_heads * spec.head_dim * 4
    tight = make_llm(kv_cache_memory_bytes=4 * block_bytes)      # 64 tokens in total
    assert tight.engine.config.model.max_model_len == 64
    with pytest.raises(ValueError, match="max_model_len is 64"):
        tight.generate(as_inputs([list(range(3, 80))]), greedy(4), use_tqdm=False)
    # a prompt that fits with more max_tokens than room is refused; without max_tokens it runs to the
    # cache's length limit and stops with 'length'
    with pytest.raises(ValueError, match=r"maximum context length is 64 tokens.*57 in the messages, 50 in"):
        tight.generate(as_inputs([list(range(3, 60))]), greedy(50), use_tqdm=False)
    out = tight.generate(as_inputs([list(range(3, 60))]), greedy(None), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 7


def test_seeded_sampling_independent_of_batch(make_llm):
    llm = make_llm()
    prompts = token_prompts(6)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(as_inputs(prompts[3:4]), params, use_tqdm=False)
    noise = SamplingParams(temperature=1.3, max_tokens=9, ignore_eos=True)
    mixed = llm.generate(as_inputs(prompts), [noise, noise, noise, params, noise, noise], use_tqdm=False)
    assert mixed[3].outputs[0].token_ids == alone[0].outputs[0].token_ids
    other_seed = llm.generate(as_inputs(prompts[3:4]),
                              SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=16,
                                             ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone[0].outputs[0].token_ids


def test_seeded_sampling_survives_preemption(make_llm):
    spec = TinyModelSpec()
    block_bytes = 2 * spec.num_hidden_layers * 16 * spec.num_key_value_heads * spec.head_dim * 4
    tight = make_llm(kv_cache_memory_bytes=12 * block_bytes, enable_prefix_caching=False)
    ample = make_llm()
    prompts = token_prompts(10)
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=20, ignore_eos=True) for i in range(10)]
    assert token_ids(tight.generate(as_inputs(prompts), params, use_tqdm=False)) == \
        token_ids(ample.generate(as_inputs(prompts), params, use_tqdm=False))


def test_n_completions_share_prompt_blocks(make_llm):
    for caching in (True, False):
        llm = make_llm(enable_prefix_caching=caching)
        prompt = list(range(10, 60))                       # 50 tokens: 3 full blocks
        hits_before = llm.get_metrics().prefix_cache_hits
        out = llm.generate(as_inputs([prompt]), SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8,
                                                               ignore_eos=True), use_tqdm=False)[0]
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(len(c.token_ids) == 8 for c in out.outputs)
        assert len({tuple(c.token_ids) for c in out.outputs}) > 1          # distinct seeds per completion
        # siblings 1 and 2 found sibling 0's full prompt blocks
        assert llm.get_metrics().prefix_cache_hits - hits_before >= 2 * 48


def test_sampling_knobs(make_llm):
    llm = make_llm()
    prompt = as_inputs(token_prompts(3)[2:3])
    base = dict(max_tokens=12, ignore_eos=True, seed=3)
    # top_k=1 and a tiny top_p are greedy
    g = token_ids(llm.generate(prompt, greedy(12), use_tqdm=False))
    assert token_ids(llm.generate(prompt, SamplingParams(temperature=1.0, top_k=1, **base), use_tqdm=False)) == g
    assert token_ids(llm.generate(prompt, SamplingParams(temperature=1.0, top_p=1e-6, **base), use_tqdm=False)) == g
    assert token_ids(llm.generate(prompt, SamplingParams(temperature=1.0, min_p=1.0, **base), use_tqdm=False)) == g
    # logit_bias forces a token
    forced = llm.generate(prompt, greedy(5, logit_bias={77: 100.0}), use_tqdm=False)[0].outputs[0].token_ids
    assert forced == [77] * 5
    # penalties change a repetitive greedy output and never repeat under a huge presence penalty
    rep = llm.generate(prompt, greedy(12, presence_penalty=2.0, logit_bias=None, repetition_penalty=5.0),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(rep)) >= len(set(g[0]))
    freq = llm.generate(prompt, greedy(12, frequency_penalty=2.0), use_tqdm=False)[0].outputs[0].token_ids
    assert freq != g[0] or len(set(g[0])) == 12


def test_stop_tokens_min_tokens_max_tokens_and_eos(make_llm):
    llm = make_llm()
    prompt = as_inputs(token_prompts(3)[1:2])
    ref = llm.generate(prompt, greedy(12), use_tqdm=False)[0].outputs[0].token_ids
    stop_at = ref[4]
    first = ref.index(stop_at)
    out = llm.generate(prompt, greedy(12, stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    # min_tokens holds the stop token back
    out = llm.generate(prompt, greedy(12, stop_token_ids=[stop_at], min_tokens=first + 2), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 2 and stop_at not in out.token_ids[: first + 2]
    # EOS ends a request unless ignore_eos; logit_bias makes EOS certain
    eos = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={2: 100.0})
    out = llm.generate(prompt, eos, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [2] and out.finish_reason == "stop"
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, min_tokens=3, logit_bias={2: 100.0}),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == 2 and 2 not in out.token_ids[:3]
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={2: 100.0}),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [2] * 6 and out.finish_reason == "length"


def test_stop_strings_cut_text(make_llm):
    llm = make_llm()
    tokenizer = llm.get_tokenizer()
    out = llm.generate(["Once upon a time"], greedy(20), use_tqdm=False)[0].outputs[0]
    text = out.text
    assert text, "the tiny model should produce some text"
    stop = text[3:6] if len(text) > 6 else text[-2:]
    cut = llm.generate(["Once upon a time"], greedy(20, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]
    kept = llm.generate(["Once upon a time"], greedy(20, stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    assert tokenizer is not None


def test_detokenization_never_breaks_multibyte(make_llm):
    llm = make_llm()
    tokenizer = llm.get_tokenizer()
    # byte-level BPE: a 4-byte emoji and CJK characters become several byte tokens
    text = "héllo 😀 世界 ✓"
    ids = tokenizer.encode(text)
    from pagoda.engine.processing.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(tokenizer, [], [], False, True, 0)
    pieces = []
    for token in ids:
        before = detok.text
        detok.add_tokens([token])
        piece = detok.text[len(before):]
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_priority_runs_first(make_llm):
    llm = make_llm(max_num_seqs=1, scheduling_policy="priority")
    prompts = token_prompts(3)
    engine = llm.engine
    engine.add_request("low", {"prompt_token_ids": prompts[0]}, greedy(3), priority=5)
    engine.add_request("high", {"prompt_token_ids": prompts[1]}, greedy(3), priority=-1)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["high", "low"]


def test_abort_frees_blocks_at_once(make_llm):
    llm = make_llm()
    engine = llm.engine
    engine.add_request("a", {"prompt_token_ids": token_prompts(10)[9]}, greedy(50))
    engine.step()
    kv = engine.core.scheduler.kv
    assert kv.num_free_blocks < kv.pool.num_blocks
    outputs = engine.abort_request(["a"])
    assert outputs[0].outputs[0].finish_reason == "abort"
    assert kv.num_free_blocks == kv.pool.num_blocks and not engine.has_unfinished_requests()


def test_outputs_in_input_order_and_metrics(make_llm):
    llm = make_llm()
    prompts = token_prompts(10)
    outs = llm.generate(as_inputs(prompts), [greedy(2 + i) for i in range(10)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2 + i for i in range(10)]
    assert [o.prompt_token_ids for o in outs] == prompts
    stats = llm.get_metrics()
    assert stats.generation_tokens >= sum(2 + i for i in range(10)) and stats.kv_cache_usage == 0.0
