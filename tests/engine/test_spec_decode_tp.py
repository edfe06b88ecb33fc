"""Speculative decoding under tensor parallelism (TP=2 over gloo, multiproc workers), with async
scheduling: a speculating step drains the step in flight through an empty step (rank 0 holds a
step's reply until the next step arrives) and runs to completion; only rank 0 verifies, while every
rank computes the same 1 + K rows. Greedy tokens equal plain TP=1, through both the sharded argmax
(plain greedy) and the gathered logits (logprobs asked)."""
from __future__ import annotations

import json

import pytest

from conftest import assert_pool_whole, greedy
from model_factory import TinyModelSpec
from pagoda.engine import LLM

from test_spec_decode import repeating_prompts

LLAMA_KV2 = TinyModelSpec(family="llama", num_attention_heads=2, num_key_value_heads=2)
SPEC = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
                   "disable_by_batch_size": 0})


def test_tp2_speculative_greedy_equals_tp1(tiny_checkpoint):
    path = str(tiny_checkpoint(LLAMA_KV2))
    common = dict(kv_cache_memory_bytes=1 << 22, max_num_batched_tokens=32)
    prompts = [{"prompt_token_ids": p} for p in repeating_prompts(5, seed=21)]
    plain = LLM(model=path, **common)
    want_plain = plain.generate(prompts, greedy(28), use_tqdm=False)
    want_logprobs = plain.generate(prompts, greedy(20, logprobs=1), use_tqdm=False)
    llm = LLM(model=path, tensor_parallel_size=2, async_scheduling=True, speculative_config=SPEC, **common)
    try:
        assert llm.engine.core.async_scheduling
        got_plain = llm.generate(prompts, greedy(28), use_tqdm=False)
        got_logprobs = llm.generate(prompts, greedy(20, logprobs=1), use_tqdm=False)
        stats = llm.get_metrics()
        assert_pool_whole(llm)
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in got_plain] == [o.outputs[0].token_ids for o in want_plain]
    for got, want in zip(got_logprobs, want_logprobs, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for token, got_entry, want_entry in zip(want.outputs[0].token_ids, got.outputs[0].logprobs,
                                                want.outputs[0].logprobs, strict=True):
            assert got_entry[token].logprob == pytest.approx(want_entry[token].logprob, abs=1e-4)
    assert stats.spec_decode_num_accepted_tokens > 0
