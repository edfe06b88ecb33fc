"""Speculative sampling keeps the target distribution: chi-square tests with fixed seeds.

- `rejection_sample` (the general rule, for drafts drawn from a distribution q) and its point-mass
  case emit tokens distributed as p; a sampler that resamples from p itself after a rejection (a
  plausible bug) is caught by the same test.
- Through the engine at temperature 1.0: the joint distribution of the first 3 tokens with and
  without speculation agrees (unseeded requests, so the two runs draw different noise), on a prompt
  whose n-gram drafts are accepted about half the time.

Every test is deterministic given its seeds; the significance level (1e-4) is only how far from the
target a seeded run may land before the test calls the sampler wrong. Each test also checks its own
power: a wrong distribution of the same size fails the bound.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import assert_pool_whole
from pagoda.engine import SamplingParams
from pagoda.engine.spec_decode.rejection import accepted_prefix, rejection_sample
from pagoda.engine.worker.sampler import Sampler, SamplingRow

ALPHA = 1e-4


def chi_square_p_value(observed: np.ndarray, expected: np.ndarray, dof: int) -> float:
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def goodness_of_fit(samples: np.ndarray, probs: np.ndarray) -> float:
    """p-value of `samples` (token ids) against `probs`; cells expecting < 5 are pooled."""
    counts = np.bincount(samples, minlength=probs.size).astype(np.float64)
    expected = probs * samples.size
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    return chi_square_p_value(observed[keep], expected[keep], int(keep.sum()) - 1)


def two_sample(a: Counter, b: Counter) -> float:
    """p-value of 'a and b come from one distribution' (a 2 x cells contingency table; cells with
    fewer than 10 samples over both are pooled)."""
    cells = sorted(set(a) | set(b))
    table = np.array([[a[c] for c in cells], [b[c] for c in cells]], dtype=np.float64)
    small = table.sum(axis=0) < 10
    table = np.concatenate([table[:, ~small], table[:, small].sum(axis=1, keepdims=True)], axis=1)
    table = table[:, table.sum(axis=0) > 0]
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    return chi_square_p_value(table, expected, table.shape[1] - 1)


# -- the rule itself ---------------------------------------------------------------------------------
def emitted_first_tokens(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, seed: int,
                         buggy: bool = False) -> np.ndarray:
    """The token each row emits at the draft's position: the draft if accepted, else the recovery."""
    rows, vocab = drafts.numel(), p.numel()
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(rows, generator=generator, dtype=torch.float64)
    noise = torch.empty(rows, vocab, dtype=torch.float64).exponential_(generator=generator)
    target = p.expand(rows, vocab)
    accepted, recovered = rejection_sample(target, drafts, None if q is None else q.expand(rows, vocab), uniform, noise)
    if buggy:
        recovered = (target / noise).argmax(dim=-1)      # resample from p, the draft not taken out
    return torch.where(accepted, drafts, recovered).numpy()


def test_rejection_sampling_emits_the_target_distribution():
    p = torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1, 0.0], dtype=torch.float64)
    q = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.2, 0.1], dtype=torch.float64)
    n = 20000
    drafts = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(1))
    assert goodness_of_fit(emitted_first_tokens(p, q, drafts, seed=2), p.numpy()) > ALPHA
    # point mass: the draft is always token 1 (an n-gram draft); accepted with p(1) = 0.4
    point = torch.ones(n, dtype=torch.int64)
    samples = emitted_first_tokens(p, None, point, seed=3)
    assert goodness_of_fit(samples, p.numpy()) > ALPHA
    assert abs((samples == 1).mean() - 0.4) < 0.02
    # ... and the point mass as an explicit one-hot q decides the same way
    one_hot = torch.nn.functional.one_hot(torch.tensor(1), 6).to(torch.float64)
    assert (emitted_first_tokens(p, one_hot, point, seed=3) == samples).all()
    # power: resampling from p after a rejection over-weights the draft
    assert goodness_of_fit(emitted_first_tokens(p, None, point, seed=3, buggy=True), p.numpy()) < 1e-6


def test_accepted_prefix():
    assert accepted_prefix([5, 6, 7], [5, 6, 7, 8]) == 3
    assert accepted_prefix([5, 6, 7], [5, 9, 7, 8]) == 1
    assert accepted_prefix([5], [4, 5]) == 0


def test_target_probs_are_what_the_sampler_draws_from():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(4))
    row = SamplingRow(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05, seed=None, num_output_tokens=0,
                      logit_bias={3: 1.5}, banned_token_ids=[int(logits.argmax())])
    probs = sampler.target_probs(logits, [row])[0]
    assert probs.sum().item() == pytest.approx(1.0) and (probs > 0).sum() <= 6
    assert probs[int(logits.argmax())] == 0
    n = 6000
    samples = np.array(sampler.sample(logits.expand(n, 12).contiguous(), [row] * n)[0].tolist())
    assert goodness_of_fit(samples, probs.numpy()) > ALPHA
    greedy = SamplingRow(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, num_output_tokens=0)
    assert sampler.target_probs(logits, [greedy])[0].tolist() == \
        torch.nn.functional.one_hot(logits.argmax(), 12).float().tolist()


# -- through the engine ------------------------------------------------------------------------------
A, B, C = 61, 62, 63
PROMPT = [A, B, C] * 5 + [A, B]
SPEC = json.dumps({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
                   "disable_by_batch_size": 0})


def first_three(llm, count: int, bias: dict[int, float]) -> Counter:
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, logit_bias=bias)
    outputs = llm.generate([{"prompt_token_ids": PROMPT}] * count, params, use_tqdm=False)
    assert_pool_whole(llm)
    return Counter(tuple(o.outputs[0].token_ids) for o in outputs)


def test_engine_sampling_with_and_without_speculation_agree(make_llm):
    """logit_bias confines each position to {A, B, C} (27 joint outcomes of the first 3 tokens, with
    the model's own, context-dependent odds); the drafts copy the prompt's A B C cycle."""
    count, bias = 600, {A: 100.0, B: 100.0, C: 100.0}
    plain = make_llm(max_num_seqs=300)
    spec = make_llm(max_num_seqs=300, speculative_config=SPEC)
    before = spec.get_metrics()
    with_spec = first_three(spec, count, bias)
    after = spec.get_metrics()
    without = first_three(plain, count, bias)
    drafts = after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens
    accepted = after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
    assert drafts >= count // 2 and 0.2 < accepted / drafts < 0.8, (accepted, drafts)
    assert set(with_spec) | set(without) <= {(x, y, z) for x in (A, B, C) for y in (A, B, C) for z in (A, B, C)}
    assert len(without) > 10
    assert two_sample(with_spec, without) > ALPHA
    # power: other odds at the same sample size (B favoured by e at every position) fail the test
    shifted = first_three(plain, count, {A: 99.0, B: 100.0, C: 99.0})
    assert two_sample(shifted, without) < ALPHA
