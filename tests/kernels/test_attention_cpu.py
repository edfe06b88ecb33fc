"""The grouped CPU attention path vs the padded torch reference (`paged_attention_ref`, fp32).

Same batches as the Triton tests (`make_batch`): shuffled blocks and spare table columns. Padded
groups do read slots past a shorter sequence's context (masked out), so the unowned slots hold large
finite garbage here instead of NaN (the engine's cache starts zeroed and only ever holds finite
K/V): an unmasked read changes the output far beyond the tolerance. The CPU path reorders
work (decode groups by length, one SDPA per prefill), never the arithmetic of one row, so fp32
agrees to 1e-5.
"""
from __future__ import annotations

import random

import pytest
import torch
from test_attention import DECODE, MIXED, PREFILL, PREFIX_HIT, TOLERANCES, make_batch, reference, to_fp8

from pagoda.kernels.attention import paged_attention
from pagoda.kernels.attention_cpu import GROUP_CALL_COST_CELLS, _cut_points, paged_attention_cpu, plan_for
from pagoda.kernels.backend import use_backend

CPU = torch.device("cpu")


def garbage(poisoned: torch.Tensor) -> torch.Tensor:
    """NaN slots -> large finite values of both signs."""
    noise = torch.randn(poisoned.shape).to(poisoned.dtype) * 50
    return torch.where(poisoned.isnan(), noise, poisoned)


def run_cpu(batch):
    return paged_attention_cpu(batch.query, garbage(batch.poisoned_key_cache), garbage(batch.poisoned_value_cache),
                               batch.metadata, batch.scale)


def fp8_batch(seqs, num_heads, num_kv_heads, dtype, k_scale, v_scale):
    """An FP8 batch whose unowned slots hold saturated garbage (the CPU path may read them, masked)."""
    batch = make_batch(seqs, num_heads, num_kv_heads, 64, 16, dtype, CPU)
    batch.poisoned_key_cache = garbage(batch.poisoned_key_cache)
    batch.poisoned_value_cache = garbage(batch.poisoned_value_cache)
    return to_fp8(batch, k_scale, v_scale)


def run_cpu_fp8(batch, key=None, value=None):
    return paged_attention_cpu(batch.query, batch.poisoned_key_cache, batch.poisoned_value_cache,
                               batch.metadata, batch.scale, key, value, batch.k_scale, batch.v_scale)


def check(batch) -> None:
    out = run_cpu(batch)
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    tol = 1e-5 if batch.query.dtype == torch.float32 else TOLERANCES[batch.query.dtype]
    torch.testing.assert_close(out.float(), reference(batch), atol=tol, rtol=tol)


@pytest.mark.parametrize("seqs", [MIXED, PREFILL, PREFIX_HIT, DECODE], ids=["mixed", "prefill", "prefix_hit", "decode"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (9, 3), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(seqs, num_heads, num_kv_heads, dtype):
    check(make_batch(seqs, num_heads, num_kv_heads, 64, 16, dtype, CPU))


@pytest.mark.parametrize("seed", range(4))
def test_many_decodes_of_spread_lengths(seed):
    """Enough decodes of different lengths that the planner cuts several groups (checked)."""
    rng = random.Random(seed)
    seqs = [(1, rng.randint(1, 900)) for _ in range(48)] + [(rng.randint(2, 40), rng.randint(40, 120))]
    seqs = [(min(q, s), s) for q, s in seqs]
    batch = make_batch(seqs, 8, 2, 32, 16, torch.float32, CPU)
    check(batch)
    plan = batch.metadata.host_plan
    assert len(plan.decode) > 1
    assert sorted(int(r) for g in plan.decode for r in g.rows) == list(range(48))
    assert len(plan.prefill) == 1


def test_sequence_without_new_tokens():
    check(make_batch([(2, 10), (0, 7), (1, 3), (3, 3)], 4, 2, 64, 16, torch.float32, CPU))


def test_plan_is_built_once_per_step():
    batch = make_batch(MIXED, 8, 2, 64, 16, torch.float32, CPU)
    first = plan_for(batch.metadata, 16)
    run_cpu(batch)
    assert batch.metadata.host_plan is first


def test_cut_points_cover_and_trade_padding_for_calls():
    lengths = sorted([10] * 8 + [2000] * 8)
    spans = _cut_points(lengths)
    assert spans == [(0, 8), (8, 16)]            # 8 x 1990 cells of padding saved >> one call
    close = sorted([100, 101, 102, 103])
    assert _cut_points(close) == [(0, 4)]        # a few cells of padding < GROUP_CALL_COST_CELLS
    assert GROUP_CALL_COST_CELLS > 3 * 3
    assert _cut_points([]) == []


def test_dispatch_uses_cpu_path_on_cpu(monkeypatch):
    batch = make_batch(MIXED, 8, 2, 64, 16, torch.float32, CPU)
    with use_backend("auto"):
        out = paged_attention(batch.query, garbage(batch.poisoned_key_cache), garbage(batch.poisoned_value_cache),
                              batch.metadata, batch.scale)
    assert batch.metadata.host_plan is not None
    torch.testing.assert_close(out, reference(batch), atol=1e-5, rtol=1e-5)


def new_kv(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's new K/V (T, Hkv, D) read back from the clean cache: what the layer just wrote."""
    md, bs = batch.metadata, batch.key_cache.shape[1]
    rows = []
    for i, (start, end) in enumerate(zip(md.query_start_loc.tolist(), md.query_start_loc.tolist()[1:])):
        seq_len = int(md.seq_lens[i])
        for pos in range(seq_len - (end - start), seq_len):
            rows.append(int(md.block_tables[i, pos // bs]) * bs + pos % bs)
    flat = lambda cache: cache.view(-1, *cache.shape[2:])[torch.tensor(rows, dtype=torch.int64)]  # noqa: E731
    return flat(batch.key_cache), flat(batch.value_cache)


@pytest.mark.parametrize("seqs", [MIXED, PREFILL, PREFIX_HIT], ids=["mixed", "prefill", "prefix_hit"])
def test_fresh_prompts_read_the_new_kv(seqs):
    """Given the step's new K/V, a fresh prompt attends over them: same output; and they are really
    what it reads (a cache with garbage in the fresh prompts' slots changes nothing)."""
    batch = make_batch(seqs, 8, 2, 64, 16, torch.float32, CPU)
    key, value = new_kv(batch)
    key_cache, value_cache = garbage(batch.poisoned_key_cache), garbage(batch.poisoned_value_cache)
    fresh = [i for i, (q, s) in enumerate(seqs) if q == s]
    for i in fresh:                                  # scribble over what the fresh prompts own
        blocks = batch.metadata.block_tables[i, : -(-seqs[i][1] // 16)].long()
        key_cache[blocks] = 77.0
        value_cache[blocks] = -77.0
    out = paged_attention_cpu(batch.query, key_cache, value_cache, batch.metadata, batch.scale, key, value)
    expected = reference(batch)
    starts = batch.metadata.query_start_loc.tolist()
    for i in fresh:
        rows = slice(starts[i], starts[i + 1])
        torch.testing.assert_close(out[rows], expected[rows], atol=1e-5, rtol=1e-5)
    if not fresh:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.05, 0.3), (4.0, 0.5)])
@pytest.mark.parametrize("seqs", [MIXED, PREFILL, PREFIX_HIT, DECODE], ids=["mixed", "prefill", "prefix_hit", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_matches_reference(dtype, seqs, k_scale, v_scale):
    batch = fp8_batch(seqs, 8, 2, dtype, k_scale, v_scale)
    out = run_cpu_fp8(batch)
    tol = 1e-5 if dtype == torch.float32 else TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), reference(batch), atol=tol, rtol=tol)


def test_fp8_fresh_prompts_read_the_cache():
    """With an FP8 cache the step's new K/V are not what later steps see (the cache rounded them):
    a fresh prompt reads the cache too, so it attends to the same values as after a prefix hit."""
    batch = fp8_batch(PREFILL, 8, 2, torch.float32, 0.5, 0.25)
    key, value = new_kv(make_batch(PREFILL, 8, 2, 64, 16, torch.float32, CPU))   # unrounded, other values
    out = run_cpu_fp8(batch, key, value)
    torch.testing.assert_close(out, reference(batch), atol=1e-5, rtol=1e-5)


def test_fp8_scales_are_read():
    batch = fp8_batch(MIXED, 4, 2, torch.float32, 1.0, 1.0)
    first = run_cpu_fp8(batch)
    batch.k_scale, batch.v_scale = batch.k_scale * 2, batch.v_scale * 0.5
    second = run_cpu_fp8(batch)
    torch.testing.assert_close(second, reference(batch), atol=1e-5, rtol=1e-5)
    assert (second - first).abs().max() > 0.1
    with pytest.raises(ValueError, match="k_scale"):
        paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale)
