"""Engine test helpers: cached tiny-model engines and the "block pool is whole again" check.

Every LLM built through `make_llm` is checked after each test: no request left in the scheduler
and every KV block back in the free queue (cached prefix blocks count as free: they are evictable).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import model_factory
from pagoda.engine import SamplingParams
from pagoda.engine.llm import LLM

TINY_KV_BYTES = 16 << 20

_ENGINES: dict[tuple, LLM] = {}


def assert_pool_whole(llm: LLM) -> None:
    scheduler = llm.engine.core.scheduler
    assert not scheduler.waiting and not scheduler.running, "requests left in the scheduler"
    kv = scheduler.kv
    assert kv.num_free_blocks == kv.pool.num_blocks, (
        f"leaked KV blocks: {kv.pool.num_blocks - kv.num_free_blocks} of {kv.pool.num_blocks} still referenced")
    assert not kv.req_blocks, f"block tables left for {sorted(kv.req_blocks)}"
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


@pytest.fixture
def make_llm(tiny_checkpoint) -> Iterator[Callable[..., LLM]]:
    """`make_llm(spec=TinyModelSpec(), **llm_kwargs)`: an engine on a tiny checkpoint, cached per
    (spec, kwargs) for the session and checked for leaks after the test."""
    used: list[LLM] = []

    def build(spec: model_factory.TinyModelSpec = model_factory.TinyModelSpec(), **kwargs: Any) -> LLM:
        kwargs.setdefault("kv_cache_memory_bytes", TINY_KV_BYTES)
        key = (spec, tuple(sorted(kwargs.items())))
        if key not in _ENGINES:
            _ENGINES[key] = LLM(model=str(tiny_checkpoint(spec)), **kwargs)
        used.append(_ENGINES[key])
        return _ENGINES[key]

    yield build
    for llm in used:
        assert_pool_whole(llm)


def greedy(max_tokens: int = 16, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def token_prompts(count: int = 10, vocab: int = 400, seed: int = 0) -> list[list[int]]:
    """Prompts of different lengths (1 .. ~70 tokens) from a fixed RNG, over real-token ids."""
    import random

    rng = random.Random(seed)
    lengths = [1, 3, 7, 16, 17, 31, 33, 48, 64, 70][:count] + [rng.randint(2, 60) for _ in range(max(0, count - 10))]
    return [[rng.randint(3, vocab - 1) for _ in range(n)] for n in lengths]


def assert_outputs_match_transformers(outputs: list, model: Any, prompts: list[list[int]], max_new_tokens: int,
                                      atol: float, top_prompt: int = -1) -> None:
    """The engine's greedy `outputs` (generated with logprobs >= 2, EOS ignored) against transformers'
    `model`: the same tokens with the same log-probabilities for every prompt, and, along the
    continuation of prompts[top_prompt], the same top-2 alternatives at every position."""
    import pytest
    import torch

    for prompt, output in zip(prompts, outputs, strict=True):
        tokens, logprobs = hf_greedy_generate(model, prompt, max_new_tokens)
        completion = output.outputs[0]
        assert completion.token_ids == tokens, f"prompt of {len(prompt)} tokens"
        ours = [entry[t].logprob for entry, t in zip(completion.logprobs, tokens)]
        assert ours == pytest.approx(logprobs, abs=atol), f"prompt of {len(prompt)} tokens"
    prompt, completion = prompts[top_prompt], outputs[top_prompt].outputs[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion.token_ids])).logits[0, len(prompt) - 1:-1]
    top = torch.log_softmax(logits.float(), -1).topk(2)
    for entry, values, ids in zip(completion.logprobs, top.values, top.indices):
        for value, token in zip(values.tolist(), ids.tolist()):
            assert entry[token].logprob == pytest.approx(value, abs=atol)


def assert_same_outputs(actual: list, expected: list, atol: float) -> None:
    """Two runs' greedy outputs (e.g. tensor-parallel vs one rank): the same tokens, log-probabilities
    within `atol`."""
    import pytest

    for got, want in zip(actual, expected, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for got_lp, want_lp, token in zip(got.outputs[0].logprobs, want.outputs[0].logprobs,
                                          want.outputs[0].token_ids):
            assert got_lp[token].logprob == pytest.approx(want_lp[token].logprob, abs=atol)


def hf_greedy_generate(model: Any, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation of `prompt` (EOS ignored) and the log-probability of each
    token it generated (its cached decode), the reference the engine's outputs are checked against."""
    import torch

    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
