"""Async scheduling (step N+1 scheduled while step N runs, its sampled tokens fed on the device)
must produce exactly what synchronous scheduling produces. It is on by default on one CUDA
device; here it is forced on, on the CPU, where the same code paths run."""
from __future__ import annotations

import pytest

from conftest import greedy, token_prompts
from model_factory import TinyModelSpec
from pagoda.engine import SamplingParams


def run(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[(c.token_ids, c.finish_reason, c.text) for c in o.outputs] for o in outs]


@pytest.fixture
def pair(make_llm):
    def build(**kwargs):
        sync = make_llm(async_scheduling=False, **kwargs)
        overlapped = make_llm(async_scheduling=True, **kwargs)
        assert overlapped.engine.core.async_scheduling and not sync.engine.core.async_scheduling
        return sync, overlapped
    return build


def test_greedy_batch_and_chunked_prefill(pair):
    sync, overlapped = pair(max_num_batched_tokens=24)
    prompts = token_prompts(10)
    assert run(overlapped, prompts, greedy(20)) == run(sync, prompts, greedy(20))


def test_sampling_seeds_logprobs_penalties_n(pair):
    sync, overlapped = pair()
    prompts = token_prompts(6)
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=14, ignore_eos=True, logprobs=2)
              for i in range(3)] + [
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, frequency_penalty=1.5),
        SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, prompt_logprobs=1, ignore_eos=True)]
    a = overlapped.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    b = sync.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for x, y in zip(a, b):
        assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs]
        for cx, cy in zip(x.outputs, y.outputs):
            if cx.logprobs is not None:
                assert [{t: round(l.logprob, 4) for t, l in e.items()} for e in cx.logprobs] == \
                    [{t: round(l.logprob, 4) for t, l in e.items()} for e in cy.logprobs]
    assert [e and {t: round(l.logprob, 4) for t, l in e.items()} for e in a[5].prompt_logprobs] == \
        [e and {t: round(l.logprob, 4) for t, l in e.items()} for e in b[5].prompt_logprobs]


def test_requests_that_stop_while_a_step_is_in_flight(pair):
    sync, overlapped = pair()
    prompts = token_prompts(8)
    reference = sync.generate([{"prompt_token_ids": p} for p in prompts], greedy(16), use_tqdm=False)
    # stop each request at a token it really produces, at different steps
    params = [SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[o.outputs[0].token_ids[3 + i % 5]])
              for i, o in enumerate(reference)]
    params[0] = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={2: 100.0}, min_tokens=4)   # EOS
    assert run(overlapped, prompts, params) == run(sync, prompts, params)


def test_preemption_and_prefix_caching(pair):
    spec = TinyModelSpec()
    block_bytes = 2 * spec.num_hidden_layers * 16 * spec.num_key_value_heads * spec.head_dim * 4
    sync, overlapped = pair(kv_cache_memory_bytes=12 * block_bytes)
    prompts = token_prompts(10)
    assert run(overlapped, prompts, greedy(24)) == run(sync, prompts, greedy(24))
    assert overlapped.get_metrics().num_preemptions > 0
    shared = list(range(10, 60))
    prompts = [shared + [100 + i] for i in range(5)]
    assert run(overlapped, prompts, greedy(8)) == run(sync, prompts, greedy(8))
    assert overlapped.get_metrics().prefix_cache_hits > 0


def test_abort_while_in_flight(pair):
    _, overlapped = pair()
    engine = overlapped.engine
    engine.add_request("a", {"prompt_token_ids": token_prompts(10)[9]}, greedy(40))
    engine.add_request("b", {"prompt_token_ids": token_prompts(10)[5]}, greedy(5))
    engine.step()
    engine.step()
    engine.abort_request(["a"])
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["b"] and len(finished[0].outputs[0].token_ids) == 5
