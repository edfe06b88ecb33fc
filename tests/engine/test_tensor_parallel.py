"""Tensor parallelism on CPU (gloo) through the multiproc executor.

- TP=2 greedy tokens equal TP=1 (and logprobs, up to float summation order) on a tiny Llama with 2 KV
  heads (the KV cache is sharded by head) and a tiny Qwen2 with 1 KV head (replicated on both ranks;
  q/k/v biases), with chunked prefill and several requests per step.
- TP=3 on the default model (SmolLM2-135M: 9 heads, 3 KV heads) equals TP=1; TP=2 is refused.
- A killed worker, or a stuck one (SIGSTOP: its peer hangs in a collective), ends in ExecutorError
  within a bounded time, not a hang; no worker outlives shutdown or a SIGKILLed engine process.

Each TP>1 engine spawns its workers (a few seconds of imports each), so the tests build few engines.
"""
from __future__ import annotations

import dataclasses

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from model_factory import TinyModelSpec
from pagoda.engine import LLM, EngineArgs, SamplingParams, StructuredOutputsParams
from pagoda.engine.config import ParallelConfig
from pagoda.engine.executor.base import ExecutorError
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.models.llama import check_tensor_parallel

KV_CACHE_BYTES = 1 << 22           # per rank
# 2 query heads each: the KV heads are split over 2 ranks (llama) or replicated on both (qwen2)
LLAMA_KV2 = TinyModelSpec(family="llama", num_attention_heads=2, num_key_value_heads=2)
QWEN2_KV1 = TinyModelSpec(family="qwen2", num_attention_heads=2, num_key_value_heads=1)
PROMPTS = [
    "Once upon a time there was",
    "The quick brown fox jumps over the lazy dog. Paged attention stores keys",
    "Hello world!",
    "0123456789",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=1)


def is_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, e.g. an orphan not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_until_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Waits up to timeout_s for every pid to exit; returns those still running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(is_alive(pid) for pid in pids):
        time.sleep(0.05)
    return [pid for pid in pids if is_alive(pid)]


def assert_same_greedy_outputs(actual, expected, logprob_atol: float) -> None:
    for got, want in zip(actual, expected, strict=True):
        tokens = want.outputs[0].token_ids
        assert got.outputs[0].token_ids == tokens, f"prompt {want.prompt!r}"
        for position, (got_lp, want_lp) in enumerate(zip(got.outputs[0].logprobs, want.outputs[0].logprobs,
                                                         strict=True)):
            token = tokens[position]
            assert got_lp[token].logprob == pytest.approx(want_lp[token].logprob, abs=logprob_atol)
        assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == len(want.prompt_token_ids)
        for token, got_lp, want_lp in zip(want.prompt_token_ids[1:], got.prompt_logprobs[1:],
                                          want.prompt_logprobs[1:]):
            assert got_lp[token].logprob == pytest.approx(want_lp[token].logprob, abs=logprob_atol)


def run_to_completion(engine: LLMEngine, prompts: list[str], params: SamplingParams) -> list:
    for index, prompt in enumerate(prompts):
        engine.add_request(f"request-{index}", prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return [finished[f"request-{index}"] for index in range(len(prompts))]


# -- outputs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("spec", [LLAMA_KV2, QWEN2_KV1], ids=["llama-kv2-sharded", "qwen2-kv1-replicated"])
def test_tp2_greedy_equals_tp1(tiny_checkpoint, spec, async_scheduling):
    """Async: rank 0 replies to step N after launching N+1, whose input ids every rank takes from
    N's samples on the device (rank 0 broadcasts them)."""
    path = str(tiny_checkpoint(spec))
    # 16-token steps: long prompts prefill in chunks, and prefills share steps with decodes
    common = dict(kv_cache_memory_bytes=KV_CACHE_BYTES, max_num_batched_tokens=16)
    tp1 = LLM(model=path, **common)
    expected = tp1.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm = LLM(model=path, tensor_parallel_size=2, async_scheduling=async_scheduling, **common)
    try:
        assert llm.engine.config.parallel.executor_backend == "mp"
        assert llm.engine.core.async_scheduling == async_scheduling
        actual = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        tp1_blocks, tp2_blocks = tp1.engine.config.cache.num_blocks, llm.engine.config.cache.num_blocks
        pids = llm.engine.core.executor.worker_pids
    finally:
        llm.shutdown()
    assert wait_until_gone(pids, timeout_s=1.0) == [], "shutdown left worker processes"
    assert_same_greedy_outputs(actual, expected, logprob_atol=1e-4)
    # Each rank caches only its KV heads: 2 heads over 2 ranks halve a block's bytes, so the same
    # per-rank budget holds twice the blocks; a single replicated KV head holds as many as TP=1.
    assert tp2_blocks == tp1_blocks * (2 if spec.num_key_value_heads == 2 else 1)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_tp2_plain_greedy_equals_tp1(tiny_checkpoint, async_scheduling):
    """Greedy without logprobs takes the sharded argmax (no logits gathered); an odd vocabulary
    (511 rows: rank 1's shard has a padding row) must never yield the padding id."""
    path = str(tiny_checkpoint(dataclasses.replace(LLAMA_KV2, vocab_size=511)))
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    common = dict(kv_cache_memory_bytes=KV_CACHE_BYTES, max_num_batched_tokens=16)
    expected = LLM(model=path, **common).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(model=path, tensor_parallel_size=2, async_scheduling=async_scheduling, **common)
    try:
        actual = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in actual] == [o.outputs[0].token_ids for o in expected]


@pytest.fixture(scope="module")
def default_tp3_config():
    return EngineArgs(model="default", tensor_parallel_size=3, kv_cache_memory_bytes=1 << 24,
                      max_model_len=256).create_config()


@pytest.mark.slow
def test_tp3_on_the_default_model_equals_tp1(default_tp3_config):
    # NOTE: one parsed config for both engines (reading the GGUF's config takes seconds); TP=1 gets
    # a deep copy with the single-process executor.
    tp1_config = copy.deepcopy(default_tp3_config)
    tp1_config.parallel = ParallelConfig()
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    expected = run_to_completion(LLMEngine(tp1_config), prompts, params)
    engine = LLMEngine(default_tp3_config)
    try:
        actual = run_to_completion(engine, prompts, params)
    finally:
        engine.shutdown()
    # The checkpoint is Q4_1, dequantized to fp32 on both sides: only summation order differs.
    for got, want in zip(actual, expected, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids, f"prompt {want.prompt!r}"
        for token, got_lp, want_lp in zip(want.outputs[0].token_ids, got.outputs[0].logprobs,
                                          want.outputs[0].logprobs):
            assert got_lp[token].logprob == pytest.approx(want_lp[token].logprob, abs=1e-3)


@pytest.mark.slow
def test_tp2_on_the_default_model_is_refused(default_tp3_config, monkeypatch):
    # NOTE: the Hugging Face config comes from the fixture rather than a second read of the GGUF
    # (seconds); from there on this is the user's path, refused before any worker starts.
    monkeypatch.setattr("pagoda.engine.config.load_hf_config",
                        lambda source: copy.deepcopy(default_tp3_config.model.hf_config))
    with pytest.raises(ValueError, match=r"9 attention heads, which tensor_parallel_size=2 does not divide"):
        LLM(model="default", tensor_parallel_size=2)


@pytest.mark.parametrize("num_heads, num_kv_heads, tp_size, message", [
    (9, 3, 2, r"9 attention heads, which tensor_parallel_size=2 does not divide"),
    (6, 2, 3, r"2 KV heads; tensor_parallel_size=3 must divide it or be a multiple of it"),
    (8, 8, 3, r"8 attention heads"),
])
def test_head_counts_that_do_not_split_are_refused(num_heads, num_kv_heads, tp_size, message):
    config = SimpleNamespace(num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                             intermediate_size=1536)
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(config, tp_size)


# -- failures --------------------------------------------------------------------------------------
def start_generation(tiny_checkpoint, async_scheduling: bool = False) -> tuple[LLM, list[int]]:
    """A TP=2 engine with one long request part-way through its decode."""
    llm = LLM(model=str(tiny_checkpoint(LLAMA_KV2)), tensor_parallel_size=2, kv_cache_memory_bytes=KV_CACHE_BYTES,
              async_scheduling=async_scheduling)
    llm.engine.add_request("long", "Once upon a time", SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    for _ in range(3):                       # prefill and two decodes: generation is under way
        llm.engine.step()
    return llm, llm.engine.core.executor.worker_pids


def assert_engine_is_dead(llm: LLM) -> None:
    with pytest.raises(ExecutorError):
        llm.engine.core.check_health()
    started = time.monotonic()
    with pytest.raises(ExecutorError):      # a new request fails at once
        llm.generate("Hello world!", SamplingParams(max_tokens=2), use_tqdm=False)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("victim", [0, 1])
def test_killed_worker_ends_in_errors_not_a_hang(tiny_checkpoint, victim, async_scheduling):
    llm, pids = start_generation(tiny_checkpoint, async_scheduling)
    try:
        os.kill(pids[victim], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(ExecutorError, match=r"TP rank \d"):
            while llm.engine.has_unfinished_requests():
                llm.engine.step()
        assert time.monotonic() - started < 10.0
        assert_engine_is_dead(llm)
    finally:
        llm.shutdown()
    assert wait_until_gone(pids, timeout_s=1.0) == []


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_stuck_collective_times_out(tiny_checkpoint, async_scheduling):
    llm, pids = start_generation(tiny_checkpoint, async_scheduling)
    try:
        llm.engine.config.parallel.step_timeout_s = 2.0
        # A stopped rank 1 never joins the next all-reduce, so rank 0 blocks inside it.
        os.kill(pids[1], signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(ExecutorError, match=r"did not finish within 2 s"):
            llm.engine.step()
        assert time.monotonic() - started < 10.0
        assert_engine_is_dead(llm)
    finally:
        llm.shutdown()
    assert wait_until_gone(pids, timeout_s=1.0) == [], "a stopped worker survived shutdown"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_no_orphans_when_the_engine_process_is_killed(tiny_checkpoint):
    helper = Path(__file__).with_name("tp_orphan_parent.py")
    parent = subprocess.Popen([sys.executable, str(helper), str(tiny_checkpoint(LLAMA_KV2))],
                              stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        line = parent.stdout.readline()
        assert line.startswith("PIDS "), f"helper failed to start (exit code {parent.poll()})"
        pids = [int(pid) for pid in line.split()[1:]]
        # Stop rank 1 mid-generation: rank 0 is then blocked in a collective, where only its
        # parent-watch thread can notice the engine's death (the collective timeout is minutes).
        os.kill(pids[1], signal.SIGSTOP)
        time.sleep(0.5)
        parent.kill()
        parent.wait()
        assert wait_until_gone(pids[:1], timeout_s=5.0) == [], "rank 0 outlived its engine process"
        os.kill(pids[1], signal.SIGCONT)
        assert wait_until_gone(pids[1:], timeout_s=5.0) == [], "rank 1 outlived its engine process"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in pids:                     # only after a failure: don't leak into other tests
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_tp2_async_sampling_equals_sync(tiny_checkpoint):
    """Seeded sampling, penalties (which make rank 0 wait for the previous step on the host), n > 1,
    logprobs, stop tokens and grammars (rank 0 alone gets the bitmask, after the forward pass): the
    async TP engine gives exactly what the synchronous one gives, and the constrained outputs match."""
    path = str(tiny_checkpoint(LLAMA_KV2))
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=12, ignore_eos=True, logprobs=2) for i in range(3)]
    params += [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, frequency_penalty=1.5),
               SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=9, ignore_eos=True),
               SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[5, 6, 7]),
               SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=40,
                              structured_outputs=StructuredOutputsParams(regex=r"[a-e]{2,5}=[0-9]{1,2}")),
               SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=StructuredOutputsParams(
                   json={"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"]}))]
    prompts = (PROMPTS * 2)[:len(params)]
    results = []
    for async_scheduling in (False, True):
        llm = LLM(model=path, tensor_parallel_size=2, kv_cache_memory_bytes=KV_CACHE_BYTES,
                  async_scheduling=async_scheduling)
        try:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            llm.shutdown()
        results.append([[(c.token_ids, c.finish_reason,
                          c.logprobs and [{t: round(l.logprob, 4) for t, l in e.items()} for e in c.logprobs])
                         for c in o.outputs] for o in outputs])
    assert results[1] == results[0]
    assert all(re.fullmatch(r"[a-e]{2,5}=[0-9]{1,2}", c.text) for c in outputs[-2].outputs)
    assert json.loads(outputs[-1].outputs[0].text)["k"] in ("x", "y")
