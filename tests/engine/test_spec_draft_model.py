"""Speculative decoding with a draft model (method "draft_model") on tiny random llamas: outputs are
exactly plain decoding's, and the draft's own KV bookkeeping is right.

Two drafts: (a) the target's own checkpoint, whose greedy drafts the target must accept every time
(any stale or misplaced draft KV entry, a wrong catch-up window or a wrong slot would show as a
rejection), and (b) a smaller model: the target's first layer alone, against a target whose second
layer is damped, so that drafts are accepted often but not always (both paths of the bookkeeping).
Around them: async scheduling on and off, batches mixing speculating and non-speculating requests
(a constrained one, chunked prefills, prompt logprobs), preemption, prefix-cache hits, stops inside
accepted runs, seeded sampling, long catch-ups split into chunks, every bad config value named, the
KV budget counting both models. Every engine ends with its block pool whole.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import TINY_KV_BYTES, assert_pool_whole, greedy, token_prompts
from model_factory import TinyModelSpec, save_tiny_model
from pagoda.engine import LLM, SamplingParams, StructuredOutputsParams
from pagoda.engine.config import EngineArgs, SpeculativeConfig
from pagoda.engine.spec_decode import controller
from test_spec_decode import Verifications, generate, spec_delta, token_ids

K = 3
_ENGINES: dict[tuple, LLM] = {}


@pytest.fixture(scope="session")
def checkpoints(tiny_checkpoint, tmp_path_factory) -> dict[str, str]:
    """"base": the default tiny llama; "target": the same with its second layer's outputs damped
    (x 0.1); "draft": its first layer alone (the same embeddings, norm and LM head)."""
    base = Path(tiny_checkpoint(TinyModelSpec()))
    root = tmp_path_factory.mktemp("draft_pair")
    weights = load_file(base / "model.safetensors")
    config = json.loads((base / "config.json").read_text())
    paths = {"base": str(base)}
    for name in ("target", "draft"):
        directory = root / name
        shutil.copytree(base, directory)
        if name == "target":
            tensors = {key: value * 0.1 if key.startswith("model.layers.1.") and ("o_proj" in key or "down_proj" in key)
                       else value for key, value in weights.items()}
        else:
            tensors = {key: value for key, value in weights.items() if not key.startswith("model.layers.1.")}
            (directory / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        paths[name] = str(directory)
    return paths


def draft_config(path: str, **extra) -> str:
    return json.dumps({"method": "draft_model", "model": path, "num_speculative_tokens": K,
                       "disable_by_batch_size": 0, **extra})


@pytest.fixture
def engine():
    """`engine(model_path, **llm_kwargs)`: cached per arguments; block pool checked after the test."""
    used: list[LLM] = []

    def build(model: str, **kwargs) -> LLM:
        kwargs.setdefault("kv_cache_memory_bytes", TINY_KV_BYTES)
        key = (model, tuple(sorted(kwargs.items())))
        if key not in _ENGINES:
            _ENGINES[key] = LLM(model=model, **kwargs)
        used.append(_ENGINES[key])
        return _ENGINES[key]

    yield build
    for llm in used:
        assert_pool_whole(llm)


def drafter_of(llm: LLM):
    return llm.engine.core.executor.runner.drafter


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_own_checkpoint_as_draft_is_always_accepted(checkpoints, engine, monkeypatch, async_scheduling):
    base = checkpoints["base"]
    plain = engine(base, async_scheduling=async_scheduling)
    spec = engine(base, async_scheduling=async_scheduling, speculative_config=draft_config(base))
    assert spec.engine.core.async_scheduling == async_scheduling
    spy = Verifications(spec, monkeypatch)
    prompts = token_prompts(10, seed=2)
    before = spec.get_metrics()
    got = generate(spec, prompts, greedy(27))
    assert token_ids(got) == token_ids(generate(plain, prompts, greedy(27)))
    drafts, draft_tokens, accepted = spec_delta(before, spec.get_metrics())
    # every draft is the target's own greedy token: all accepted, so every verified step emits 1 + K_i
    assert drafts > 20 and accepted == draft_tokens
    assert all(len(emitted) == 1 + num_spec for _, num_spec, emitted in spy.steps if num_spec)
    assert any(num_spec == K for _, num_spec, _ in spy.steps)
    assert any(0 < num_spec < K for _, num_spec, _ in spy.steps)       # trimmed by max_tokens


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_smaller_draft_in_a_mixed_batch(checkpoints, engine, monkeypatch, async_scheduling):
    """Speculating requests next to a constrained one (never speculates), chunked prefills (24-token
    steps) and prompt logprobs: tokens and logprobs are plain decoding's; some drafts are rejected."""
    target = checkpoints["target"]
    common = dict(async_scheduling=async_scheduling, max_num_batched_tokens=24)
    plain = engine(target, **common)
    spec = engine(target, speculative_config=draft_config(checkpoints["draft"]), **common)
    spy = Verifications(spec, monkeypatch)
    prompts = token_prompts(7, seed=3)
    regex = r"[a-c]{2,6}-[0-9]{1,3}"
    params = [greedy(30), greedy(30, logprobs=2), greedy(30, logprobs=1, prompt_logprobs=1)] * 2 + [
        SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=StructuredOutputsParams(regex=regex))]
    before = spec.get_metrics()
    got = generate(spec, prompts, params)
    want = generate(plain, prompts, params)
    assert token_ids(got) == token_ids(want)
    assert re.fullmatch(regex, got[6].outputs[0].text)
    for x, y in zip(got, want):
        for got_entry, want_entry in zip(x.outputs[0].logprobs or [], y.outputs[0].logprobs or [], strict=True):
            assert got_entry.keys() == want_entry.keys()
            assert all(got_entry[t].logprob == pytest.approx(want_entry[t].logprob, abs=1e-4) for t in want_entry)
        assert (x.prompt_logprobs is None) == (y.prompt_logprobs is None)
    drafts, draft_tokens, accepted = spec_delta(before, spec.get_metrics())
    assert drafts > 10 and 0 < accepted < draft_tokens
    constrained = got[6].request_id
    assert all(num_spec == 0 for rid, num_spec, _ in spy.steps if rid == constrained)


def test_preemption_restarts_the_draft(checkpoints, engine, monkeypatch):
    """A cache of 16 blocks for 8 requests: preempted requests come back with d = 0 and their token
    row rewritten; the own-checkpoint draft is still accepted every time."""
    base = checkpoints["base"]
    plain = engine(base)
    spec = engine(base, speculative_config=draft_config(base), kv_cache_memory_bytes=16 * 2 * 16384)
    assert spec.engine.config.cache.num_blocks == 16        # both models' entries per block
    Verifications(spec, monkeypatch)
    prompts = token_prompts(8, seed=5)[2:] + token_prompts(8, seed=6)[5:7]
    before = spec.get_metrics()
    got = generate(spec, prompts, greedy(40))
    after = spec.get_metrics()
    assert after.num_preemptions > before.num_preemptions
    drafts, draft_tokens, accepted = spec_delta(before, after)
    assert drafts > 0 and accepted == draft_tokens
    assert token_ids(got) == token_ids(generate(plain, prompts, greedy(40)))


def test_prefix_cache_hits(checkpoints, engine):
    """A continuation finds its earlier blocks in the prefix cache: the draft catches up over them
    anyway (its d starts at 0) and rewrites their draft entries with the same values."""
    base = checkpoints["base"]
    plain = engine(base)
    spec = engine(base, speculative_config=draft_config(base))
    prompts = token_prompts(10, seed=7)[5:]
    first = generate(spec, prompts, greedy(40))
    continued = [p + o.outputs[0].token_ids[:35] for p, o in zip(prompts, first)]
    before = spec.get_metrics()
    got = generate(spec, continued, greedy(24))
    after = spec.get_metrics()
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 16 * 5
    drafts, draft_tokens, accepted = spec_delta(before, after)
    assert drafts > 0 and accepted == draft_tokens
    assert token_ids(got) == token_ids(generate(plain, continued, greedy(24)))


def test_long_catch_up_runs_in_chunks(checkpoints, engine):
    """Prompts longer than the step's token budget (16): the first speculating step's catch-up covers
    the whole prompt in several draft forwards; drafts are still all accepted."""
    base = checkpoints["base"]
    plain = engine(base, max_num_batched_tokens=16)
    spec = engine(base, max_num_batched_tokens=16, speculative_config=draft_config(base))
    drafter = drafter_of(spec)
    prompts = token_prompts(10, seed=8)[7:]                     # 48, 64 and 70 tokens
    forwards = drafter.num_catch_up_forwards
    before = spec.get_metrics()
    got = generate(spec, prompts, greedy(12))
    drafts, draft_tokens, accepted = spec_delta(before, spec.get_metrics())
    assert drafter.num_catch_up_forwards - forwards >= drafts + 10     # ~190 prompt tokens in 16-token passes
    assert drafts > 0 and accepted == draft_tokens
    assert token_ids(got) == token_ids(generate(plain, prompts, greedy(12)))


def test_stops_inside_an_accepted_run(checkpoints, engine, monkeypatch):
    """A stop token or max_tokens inside a step's accepted drafts ends the output there, as in plain
    decoding (the own-checkpoint draft makes every run fully accepted)."""
    base = checkpoints["base"]
    plain = engine(base)
    spec = engine(base, speculative_config=draft_config(base))
    spy = Verifications(spec, monkeypatch)
    prompt = token_prompts(10, seed=9)[4]
    reference = generate(spec, [prompt], greedy(30))[0].outputs[0].token_ids
    runs = spy.runs(generate(spec, [prompt], greedy(30))[0].request_id)
    # a position inside an accepted run whose token is new to the output
    inside = [start + j for start, num_spec, emitted in runs if num_spec for j in range(len(emitted) - 1)
              if reference[start + j] not in reference[:start + j]]
    assert inside
    p = inside[0]
    for params in (SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[reference[p]]),
                   SamplingParams(temperature=0.0, max_tokens=p + 1, ignore_eos=True)):
        got = generate(spec, [prompt], params)[0].outputs[0]
        want = generate(plain, [prompt], params)[0].outputs[0]
        assert (got.token_ids, got.finish_reason, got.stop_reason) == (want.token_ids, want.finish_reason,
                                                                       want.stop_reason)
        assert got.token_ids == reference[:p + 1]


@pytest.mark.parametrize("draft", ["base", "draft"])
def test_seeded_sampling_gives_the_same_tokens(checkpoints, engine, draft):
    """Each position is sampled as a plain step would (its seed position, penalties counting the
    drafts before it): the greedy proposal does not change a seeded request's tokens."""
    model = checkpoints["base"] if draft == "base" else checkpoints["target"]
    plain = engine(model)
    spec = engine(model, speculative_config=draft_config(checkpoints[draft]))
    prompts = token_prompts(10, seed=10)[3:]
    common = dict(max_tokens=24, ignore_eos=True)
    params = [
        SamplingParams(temperature=0.3, seed=1, **common),
        SamplingParams(temperature=1.0, top_k=3, seed=2, logprobs=1, **common),
        SamplingParams(temperature=0.5, top_p=0.5, min_p=0.1, seed=3, **common),
        SamplingParams(temperature=0.2, seed=4, frequency_penalty=0.1, presence_penalty=0.1,
                       repetition_penalty=1.05, **common),
        SamplingParams(temperature=0.0, repetition_penalty=1.1, **common),
        SamplingParams(temperature=0.4, seed=6, logit_bias={prompts[5][0]: 1.0}, min_tokens=10,
                       stop_token_ids=[prompts[5][1]], max_tokens=24),
        SamplingParams(n=2, temperature=0.3, seed=7, **common),
    ]
    before = spec.get_metrics()
    got = generate(spec, prompts, params)
    assert token_ids(got) == token_ids(generate(plain, prompts, params))
    assert spec_delta(before, spec.get_metrics())[2] > 0


# -- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize("value, named", [
    ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model is required"),
    ({"method": "draft_model", "model": "", "num_speculative_tokens": 2}, "speculative_config.model is required"),
    ({"method": "draft_model", "model": "/d", "num_speculative_tokens": 0},
     "speculative_config.num_speculative_tokens must be"),
    ({"method": "draft_model", "model": "/d", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
     "speculative_config.prompt_lookup_max does not apply to method 'draft_model'"),
    ({"method": "draft_model", "model": "/d", "num_speculative_tokens": 2, "prompt_lookup_min": 1},
     "speculative_config.prompt_lookup_min does not apply to method 'draft_model'"),
    ({"method": "ngram", "model": "/d", "num_speculative_tokens": 2},
     "speculative_config.model does not apply to method 'ngram'"),
])
def test_every_bad_value_is_named(value, named):
    with pytest.raises(ValueError) as error:
        SpeculativeConfig.parse(value)
    assert named in str(error.value)


def test_parsed_forms():
    config = SpeculativeConfig.parse('{"model": "/some/draft", "num_speculative_tokens": 4}')
    assert (config.method, config.model, config.num_speculative_tokens) == ("draft_model", "/some/draft", 4)
    assert config.draft is None                       # resolved against the target by create_config


def test_draft_checked_against_the_target(checkpoints, tiny_checkpoint, caplog):
    target = checkpoints["target"]

    def create(draft: str, **kwargs):
        return EngineArgs(model=target, speculative_config={"method": "draft_model", "model": draft,
                                                            "num_speculative_tokens": 2}, **kwargs).create_config()

    config = create(checkpoints["draft"])
    draft = config.speculative.draft
    assert draft.hf_config.num_hidden_layers == 1 and draft.dtype == config.model.dtype
    with pytest.raises(ValueError, match=r"speculative_config.model='/nonexistent/draft' cannot be loaded"):
        create("/nonexistent/draft")
    other_vocab = str(tiny_checkpoint(TinyModelSpec(vocab_size=640)))
    with pytest.raises(ValueError, match=r"speculative_config.model=.* has a vocabulary of 640 tokens, the "
                                         r"target's has 512"):
        create(other_vocab)
    # 3 heads do not split over 2 ranks (the target's 2 heads do)
    three_heads = str(tiny_checkpoint(TinyModelSpec(hidden_size=192, num_attention_heads=3, num_key_value_heads=1)))
    with pytest.raises(ValueError, match=r"speculative_config.model=.* cannot serve as a draft model here: the "
                                         r"model has 3 attention heads"):
        create(three_heads, tensor_parallel_size=2, distributed_executor_backend="mp")
    larger = str(tiny_checkpoint(TinyModelSpec(num_hidden_layers=4)))
    with caplog.at_level(logging.WARNING, logger="pagoda.engine.config"):
        create(larger)
    assert "is larger than the target" in caplog.text


def test_kv_budget_counts_both_models(checkpoints, engine):
    base = checkpoints["base"]
    plain = engine(base)
    spec = engine(base, speculative_config=draft_config(base))
    runner, plain_runner = spec.engine.core.executor.runner, plain.engine.core.executor.runner
    assert runner.kv_bytes_per_block() == 2 * plain_runner.kv_bytes_per_block()
    assert spec.engine.config.cache.num_blocks == plain.engine.config.cache.num_blocks // 2
    drafter = drafter_of(spec)
    assert drafter.kv_cache.shape[2] == spec.engine.config.cache.num_blocks


@pytest.mark.parametrize("pauses", [False, True], ids=["always", "paused"])
def test_drafts_are_the_draft_models_own_greedy_continuation(checkpoints, engine, monkeypatch, pauses):
    """The oracle of the draft's KV bookkeeping when drafts are rejected: at every verification the
    drafts equal what the draft model, run plainly on the request's tokens, would generate next.
    With `pauses`, requests whose acceptance dips stop speculating for a few steps (the draft's
    entries of rejected drafts must not count when it resumes)."""
    if pauses:
        monkeypatch.setattr(controller, "MIN_ACCEPTANCE", 0.9)
        monkeypatch.setattr(controller, "WARMUP_OBSERVATIONS", 2)
        monkeypatch.setattr(controller, "FIRST_PAUSE_STEPS", 2)
    spec = engine(checkpoints["target"], speculative_config=draft_config(checkpoints["draft"]))
    spy_steps = Verifications(spec, monkeypatch)
    runner = spec.engine.core.executor.runner
    original = runner.drafter.drafts_of
    seen: list[tuple[list[int], list[int]]] = []

    def spy(scheduler_output):
        drafts = original(scheduler_output)
        for request_id in drafts:
            state = runner.requests[request_id]
            seen.append((state.data.prompt_token_ids + state.output_token_ids, list(drafts[request_id])))
        return drafts

    monkeypatch.setattr(runner.drafter, "drafts_of", spy)
    before = spec.get_metrics()
    generate(spec, token_prompts(10, seed=11)[3:8], greedy(30))
    drafts, draft_tokens, accepted = spec_delta(before, spec.get_metrics())
    assert 0 < accepted < draft_tokens and len(seen) == drafts
    oracle = engine(checkpoints["draft"])
    want = generate(oracle, [context for context, _ in seen], [greedy(len(d)) for _, d in seen])
    assert [d for _, d in seen] == [o.outputs[0].token_ids for o in want]
    if pauses:         # some request speculated, then decoded plainly, then speculated again
        flags = {}
        for rid, num_spec, _ in spy_steps.steps:
            flags.setdefault(rid, "")
            flags[rid] += "s" if num_spec else "p"
        assert any(re.search("sp+s", f) for f in flags.values())


def test_tp2_draft_model_greedy_equals_tp1(tiny_checkpoint):
    """TP=2 over gloo, async scheduling: every rank runs the draft (its layers sharded as the
    target's) and takes the same greedy drafts through the sharded argmax; only rank 0 verifies."""
    path = str(tiny_checkpoint(TinyModelSpec(num_attention_heads=2, num_key_value_heads=2)))
    common = dict(kv_cache_memory_bytes=1 << 22, max_num_batched_tokens=32)
    prompts = [{"prompt_token_ids": p} for p in token_prompts(10, seed=12)[2:7]]
    params = [greedy(20), greedy(20, logprobs=1)]
    want = [LLM(model=path, **common).generate(prompts, p, use_tqdm=False) for p in params]
    llm = LLM(model=path, tensor_parallel_size=2, async_scheduling=True, speculative_config=draft_config(path),
              **common)
    try:
        got = [llm.generate(prompts, p, use_tqdm=False) for p in params]
        stats = llm.get_metrics()
        assert_pool_whole(llm)
    finally:
        llm.shutdown()
    for g, w in zip(got, want):
        assert token_ids(g) == token_ids(w)
    assert stats.spec_decode_num_drafts > 0
    assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens


def test_graph_replays_of_the_draft_give_the_same_drafts(checkpoints, engine, monkeypatch):
    """The CUDA path on the CPU: the draft's decode graphs and q = 2 catch-up graphs, their static
    buffers packed as on the GPU and each 'replay' running the model eagerly on them. Drafts stay
    the target's own greedy tokens (all accepted), and both kinds of replay are used."""
    from pagoda.engine.spec_decode import draft_model
    from pagoda.engine.worker.cuda_graphs import DecodeGraphs
    from pagoda.engine.worker.verify_graphs import VerifyGraphs
    from pagoda.kernels.metadata import AttentionMetadata

    base = checkpoints["base"]
    plain = engine(base)
    spec = engine(base, speculative_config=draft_config(base), max_num_seqs=8)
    drafter = drafter_of(spec)
    model, device, length = drafter.model, drafter.device, drafter.max_model_len
    common = dict(max_blocks_per_seq=-(-length // drafter.block_size), max_model_len=length,
                  hidden_size=model.config.hidden_size, dtype=drafter.dtype, device=device)
    replays = {"decode": 0, "catch_up": 0}

    class Replay:
        def __init__(self, kind, forward):
            self.kind, self.forward = kind, forward

        def replay(self):
            replays[self.kind] += 1
            self.forward()

    decode = DecodeGraphs(model, max_batch=8, **common)
    for batch in decode.buckets:
        def forward(b=batch):
            metadata = AttentionMetadata(slot_mapping=decode.slot_mapping[:b],
                                         query_start_loc=decode.query_start_loc[:b + 1], seq_lens=decode.seq_lens[:b],
                                         block_tables=decode.block_tables[:b], max_query_len=1, max_seq_len=length)
            decode.output[:b] = model(decode.input_ids[:b], decode.positions[:b], metadata)
        decode.graphs[batch] = Replay("decode", forward)
    catch_up = VerifyGraphs(model, q=draft_model.CATCH_UP_Q, max_batch=8, **common)
    for batch in catch_up.buckets:
        catch_up.graphs[batch] = Replay("catch_up", lambda b=batch: catch_up._forward(b))
    monkeypatch.setattr(drafter, "decode_graphs", decode)
    monkeypatch.setattr(drafter, "catch_up_graphs", catch_up)
    prompts = token_prompts(10, seed=13)[2:8]
    before = spec.get_metrics()
    got = generate(spec, prompts, greedy(27))
    drafts, draft_tokens, accepted = spec_delta(before, spec.get_metrics())
    assert drafts > 10 and accepted == draft_tokens
    assert replays["decode"] > 0 and replays["catch_up"] > 0
    assert token_ids(got) == token_ids(generate(plain, prompts, greedy(27)))
