"""Sliding window, logit soft-capping and attention sinks in every attention path, against a naive oracle.

The oracle (`naive`) knows nothing of tiles, splits or plans: per sequence it reads the context slot
by slot through the block table, computes every score densely in float64, masks by positions
(`visible`, which `test_window_is_transformers_convention` pins to transformers' sliding-window
causal mask), caps, appends the sink logit to the softmax and drops it. The reference, the grouped
CPU path and the Triton kernels (interpreter, small sizes) are all checked against it, for prefill,
chunked prefill after a cached prefix, decode with several splits, mixed batches, GQA and FP8
caches; windows smaller than, equal to and larger than the contexts.

Blocks before the window are never read: the Triton kernels get NaN in every position that no query
of the sequence can see (a read would poison the output), the CPU path NaN in every block wholly
before the window (within a partly visible block it reads and masks, so that block holds garbage).
"""
from __future__ import annotations

import random
from typing import Optional

import pytest
import torch
from test_attention import (DECODE, MIXED, PREFILL, PREFIX_HIT, TOLERANCES, PagedBatch, make_batch,
                            to_fp8)

from pagoda.kernels import attention_ref, attention_triton
from pagoda.kernels.attention import paged_attention
from pagoda.kernels.attention_cpu import paged_attention_cpu
from pagoda.kernels.attention_ref import paged_attention_ref
from pagoda.kernels.backend import use_backend
from pagoda.kernels.kv_quant import dequantize

CPU = torch.device("cpu")
SEQS = {"mixed": MIXED, "prefill": PREFILL, "prefix_hit": PREFIX_HIT, "decode": DECODE}
# feature sets; "sinks": True means one random logit per query head (`sinks_for`)
FEATURES = {
    "window": dict(sliding_window=8),
    "softcap": dict(logit_softcap=2.0),
    "sinks": dict(sinks=True),
    "all": dict(sliding_window=5, logit_softcap=1.5, sinks=True),
}


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: Optional[int]) -> torch.Tensor:
    """Causal, and within the window: i - sliding_window < j <= i."""
    mask = k_pos <= q_pos
    return mask if sliding_window is None else mask & (k_pos > q_pos - sliding_window)


def real_caches(batch: PagedBatch, poisoned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    key_cache = batch.poisoned_key_cache if poisoned else batch.key_cache
    value_cache = batch.poisoned_value_cache if poisoned else batch.value_cache
    if batch.k_scale is not None:
        return (dequantize(key_cache, batch.k_scale, torch.float64),
                dequantize(value_cache, batch.v_scale, torch.float64))
    return key_cache.double(), value_cache.double()


def naive(batch: PagedBatch, sliding_window: Optional[int] = None, logit_softcap: Optional[float] = None,
          sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(T, H, D) float64, one sequence at a time, every score computed and masked by positions."""
    key_cache, value_cache = real_caches(batch)
    md = batch.metadata
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    num_heads = batch.query.shape[1]
    group = num_heads // num_kv_heads
    out = torch.zeros(batch.query.shape, dtype=torch.float64)
    starts = md.query_start_loc.tolist()
    for i, seq_len in enumerate(md.seq_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue
        pos = torch.arange(seq_len)
        slots = md.block_tables[i].cpu().long()[pos // block_size] * block_size + pos % block_size
        k = key_cache.cpu().reshape(-1, num_kv_heads, head_dim)[slots].repeat_interleave(group, dim=1)   # (S, H, D)
        v = value_cache.cpu().reshape(-1, num_kv_heads, head_dim)[slots].repeat_interleave(group, dim=1)
        q = batch.query[start:end].cpu().double()                                          # (q, H, D)
        scores = torch.einsum("qhd,shd->hqs", q, k) * batch.scale
        if logit_softcap is not None:
            scores = logit_softcap * torch.tanh(scores / logit_softcap)
        q_pos = torch.arange(seq_len - (end - start), seq_len)[:, None]
        scores = scores.masked_fill(~visible(q_pos, pos[None, :], sliding_window), float("-inf"))
        if sinks is not None:
            sink = sinks.cpu().double()[:, None, None].expand(num_heads, end - start, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqs,shd->qhd", probs, v)
    return out


def sinks_for(num_heads: int, device: torch.device) -> torch.Tensor:
    # around the scores' own scale (N(0, 1)): some heads' sinks dominate, others hardly count
    return (torch.randn(num_heads) * 2 + 1).to(device)


def features_of(name: str, num_heads: int, device: torch.device, **override) -> dict:
    features = dict(FEATURES[name], **override)
    if features.get("sinks") is True:
        features["sinks"] = sinks_for(num_heads, device)
    return features


def assert_close_to_naive(out: torch.Tensor, batch: PagedBatch, features: dict, tol: Optional[float] = None) -> None:
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    assert bool(torch.isfinite(out).all())
    tol = tol if tol is not None else TOLERANCES[batch.query.dtype]
    torch.testing.assert_close(out.cpu().double(), naive(batch, **features), atol=tol, rtol=tol)


def run_triton(batch: PagedBatch, **features) -> torch.Tensor:
    return attention_triton.paged_attention(batch.query, batch.poisoned_key_cache, batch.poisoned_value_cache,
                                            batch.metadata, batch.scale, batch.k_scale, batch.v_scale, **features)


def garbage(poisoned: torch.Tensor) -> torch.Tensor:
    """NaN slots -> large finite values (the CPU path reads some masked slots of partly used blocks)."""
    noise = (torch.randn(poisoned.shape) * 50).to(poisoned.dtype)
    return torch.where(poisoned.isnan(), noise, poisoned)


def cpu_batch(seqs, num_heads=8, num_kv_heads=2, head_dim=32, dtype=torch.float32) -> PagedBatch:
    """A batch whose unowned slots hold garbage instead of NaN: the CPU path reads (and masks) some."""
    batch = make_batch(seqs, num_heads, num_kv_heads, head_dim, 16, dtype, CPU)
    batch.poisoned_key_cache = garbage(batch.poisoned_key_cache)
    batch.poisoned_value_cache = garbage(batch.poisoned_value_cache)
    return batch


def run_cpu(batch: PagedBatch, key=None, value=None, **features) -> torch.Tensor:
    return paged_attention_cpu(batch.query, batch.poisoned_key_cache, batch.poisoned_value_cache, batch.metadata,
                               batch.scale, key, value, batch.k_scale, batch.v_scale, **features)


def first_needed(batch: PagedBatch, i: int, sliding_window: int) -> int:
    """The earliest position any query of sequence i sees."""
    qsl = batch.metadata.query_start_loc.tolist()
    seq_len = int(batch.metadata.seq_lens[i])
    return max(0, seq_len - (qsl[i + 1] - qsl[i]) - sliding_window + 1)


def poison_before_window(batch: PagedBatch, sliding_window: int, whole_blocks: bool) -> PagedBatch:
    """NaN in the read caches at the positions (or the whole blocks) before every query's window."""
    block_size = batch.key_cache.shape[1]
    for i in range(batch.metadata.num_seqs):
        first = first_needed(batch, i, sliding_window)
        if whole_blocks:
            first = first // block_size * block_size
        for pos in range(first):
            block = int(batch.metadata.block_tables[i, pos // block_size])
            for cache in (batch.poisoned_key_cache, batch.poisoned_value_cache):
                cache[block, pos % block_size] = float("nan")
    return batch


def fp32_batch(seqs, num_heads=8, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32, device=CPU):
    return make_batch(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, device)


# ---- the oracle and the reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("window", [1, 2, 5, 64])
def test_window_is_transformers_convention(window):
    from transformers.masking_utils import sliding_window_causal_mask_function

    q_idx, kv_idx = torch.arange(40)[:, None], torch.arange(40)[None, :]
    expected = sliding_window_causal_mask_function(window)(0, 0, q_idx, kv_idx)
    assert torch.equal(visible(q_idx, kv_idx, window), expected)
    assert int(visible(q_idx, kv_idx, window)[-1].sum()) == min(window, 40)   # itself and window - 1 before


def test_naive_oracle_without_features_is_the_reference():
    batch = fp32_batch(MIXED)
    torch.testing.assert_close(naive(batch), paged_attention_ref(batch.query, batch.key_cache, batch.value_cache,
                                                                 batch.metadata, batch.scale).double(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FEATURES)
@pytest.mark.parametrize("seqs", SEQS)
def test_features_change_the_output(seqs, name):
    """Each feature set moves the output well beyond the tolerances (the tests below can fail)."""
    batch = fp32_batch(SEQS[seqs] + [(1, 60)])
    features = features_of(name, 8, CPU)
    assert (naive(batch, **features) - naive(batch)).abs().max() > 0.05


@pytest.mark.parametrize("name", FEATURES)
@pytest.mark.parametrize("seqs", SEQS)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (4, 1)])
def test_reference(num_heads, num_kv_heads, seqs, name):
    batch = fp32_batch(SEQS[seqs], num_heads, num_kv_heads)
    features = features_of(name, num_heads, CPU)
    out = paged_attention_ref(batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale,
                              **features)
    assert_close_to_naive(out, batch, features, tol=1e-5)


def test_reference_score_chunks(monkeypatch):
    """The explicit-score path bounds its memory by query chunks: several chunks, the same answer."""
    batch = fp32_batch([(40, 40), (30, 90)])
    features = features_of("all", 8, CPU)
    monkeypatch.setattr(attention_ref, "_MAX_SCORE_ELEMENTS", 8 * 2 * 90 * 7)
    out = paged_attention_ref(batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale,
                              **features)
    assert_close_to_naive(out, batch, features, tol=1e-5)


# ---- the grouped CPU path -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FEATURES)
@pytest.mark.parametrize("seqs", SEQS)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (9, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu(dtype, num_heads, num_kv_heads, seqs, name):
    batch = cpu_batch(SEQS[seqs], num_heads, num_kv_heads, dtype=dtype)
    features = features_of(name, num_heads, CPU)
    tol = 1e-5 if dtype == torch.float32 else TOLERANCES[dtype]
    assert_close_to_naive(run_cpu(batch, **features), batch, features, tol=tol)


@pytest.mark.parametrize("window", [1, 7, 13, 16, 33, 52, 100])
@pytest.mark.parametrize("seqs", ["mixed", "decode", "prefix_hit"])
def test_cpu_window_sizes(seqs, window):
    """Windows smaller than, equal to (13, 33, 52: a context's length) and larger than the contexts."""
    batch = cpu_batch(SEQS[seqs])
    assert_close_to_naive(run_cpu(batch, sliding_window=window), batch, dict(sliding_window=window), tol=1e-5)


@pytest.mark.parametrize("window", [1, 16, 17, 100, 1000])
@pytest.mark.parametrize("seed", range(2))
def test_cpu_windowed_decode_groups(seed, window):
    """Many decodes of spread lengths: each group gathers from each member's own first window block."""
    rng = random.Random(seed)
    seqs = [(1, rng.randint(1, 400)) for _ in range(40)] + [(rng.randint(2, 30), rng.randint(30, 120))]
    batch = poison_before_window(cpu_batch(seqs, 8, 2, 16), window, whole_blocks=True)
    features = dict(sliding_window=window, sinks=sinks_for(8, CPU))
    assert_close_to_naive(run_cpu(batch, **features), batch, features, tol=1e-5)
    plan = batch.metadata.host_plan
    assert set(plan.windowed) == {window}
    windowed = plan.windowed[window]
    assert sorted(int(r) for g in windowed.decode for r in g.rows) == list(range(40))
    assert max(g.max_len for g in windowed.decode) <= window + 15       # never more than the window's blocks
    if window >= 400:                                                   # past every context: plain causal
        torch.testing.assert_close(run_cpu(batch, sliding_window=window), run_cpu(batch), atol=1e-5, rtol=1e-5)


def test_cpu_plans_per_window_share_the_step():
    """Alternating windowed and full layers (Gemma): one plan per window, built once per step."""
    batch = cpu_batch(MIXED)
    run_cpu(batch)
    full = batch.metadata.host_plan
    run_cpu(batch, sliding_window=8)
    windowed = full.windowed[8]
    run_cpu(batch, sliding_window=8)
    run_cpu(batch, sliding_window=20)
    assert batch.metadata.host_plan is full and full.windowed[8] is windowed and set(full.windowed) == {8, 20}


@pytest.mark.parametrize("window", [3, 16, 40])
def test_cpu_skips_blocks_before_the_window(window):
    """NaN in every block wholly before the window: never gathered, the output finite and right."""
    batch = poison_before_window(cpu_batch([(1, 70), (20, 100), (30, 30), (1, 33)]), window, whole_blocks=True)
    features = dict(sliding_window=window, logit_softcap=3.0)
    assert_close_to_naive(run_cpu(batch, **features), batch, features, tol=1e-5)


@pytest.mark.parametrize("name", ["window", "all"])
def test_cpu_fresh_prompts_read_the_new_kv(name):
    """A fresh prompt under a window attends over the step's new K/V (the cache there is scribbled on)."""
    from test_attention_cpu import new_kv

    batch = cpu_batch([(40, 40), (20, 20), (5, 37)])
    key, value = new_kv(batch)
    for i in (0, 1):                                         # the fresh prompts' blocks: garbage
        blocks = batch.metadata.block_tables[i, : -(-batch.metadata.seq_lens[i].item() // 16)].long()
        batch.poisoned_key_cache[blocks] = 77.0
        batch.poisoned_value_cache[blocks] = -77.0
    features = features_of(name, 8, CPU)
    assert_close_to_naive(run_cpu(batch, key, value, **features), batch, features, tol=1e-5)


@pytest.mark.parametrize("seqs", ["mixed", "prefix_hit", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_fp8(dtype, seqs):
    batch = to_fp8(cpu_batch(SEQS[seqs], dtype=dtype), 0.05, 0.3)
    features = features_of("all", 8, CPU)
    tol = 1e-5 if dtype == torch.float32 else TOLERANCES[dtype]
    assert_close_to_naive(run_cpu(batch, **features), batch, features, tol=tol)


# ---- Triton (interpreter on CPU) ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", FEATURES)
@pytest.mark.parametrize("seqs", SEQS)
def test_triton(seqs, name, device):
    batch = fp32_batch(SEQS[seqs], device=device)
    features = features_of(name, 8, device)
    assert_close_to_naive(run_triton(batch, **features), batch, features)


@pytest.mark.parametrize("window", [1, 7, 13, 33, 52, 100])
@pytest.mark.parametrize("seqs", ["mixed", "decode"])
def test_triton_window_sizes(seqs, window, device):
    """Windows smaller than, equal to (13, 33, 52: a context's length) and larger than the contexts."""
    batch = fp32_batch(SEQS[seqs], device=device)
    assert_close_to_naive(run_triton(batch, sliding_window=window), batch, dict(sliding_window=window))


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
@pytest.mark.parametrize("name", ["window", "sinks", "all"])
def test_triton_decode_splits(name, num_splits, device):
    """The splits cover only the window; the reduce adds the sink once to the merged denominator."""
    batch = fp32_batch(DECODE + [(1, 150)], device=device)
    features = features_of(name, 8, device, **({"sliding_window": 40} if name == "window" else {}))
    out = torch.empty_like(batch.query)
    attention_triton.decode_attention(batch.query, batch.poisoned_key_cache, batch.poisoned_value_cache,
                                      batch.metadata, batch.scale, out=out, num_splits=num_splits, **features)
    assert_close_to_naive(out, batch, features)


def test_triton_window_caps_the_fixed_split_count(device, monkeypatch):
    """A split count fixed for CUDA graphs is capped for a short window (here: 1, no reduce)."""
    batch = fp32_batch(DECODE, device=device)
    batch.metadata.num_decode_splits = 8

    def reduce_must_not_run(*args, **kwargs):
        raise AssertionError("a 100-token window was split although no split may be shorter than 128 tokens")

    monkeypatch.setattr(attention_triton, "_decode_reduce_kernel", reduce_must_not_run)
    features = dict(sliding_window=100, sinks=sinks_for(8, device))
    assert_close_to_naive(run_triton(batch, **features), batch, features)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 1), (12, 2)])
@pytest.mark.parametrize("seqs", ["mixed", "decode"])
def test_triton_gqa(seqs, num_heads, num_kv_heads, device):
    batch = fp32_batch(SEQS[seqs], num_heads, num_kv_heads, device=device)
    features = features_of("all", num_heads, device)
    assert_close_to_naive(run_triton(batch, **features), batch, features)


@pytest.mark.parametrize("window", [3, 16, 40, 70])
def test_triton_long_prompt_window(window, device):
    """Several query tiles per sequence: lower band, unmasked middle and diagonal all in play."""
    batch = fp32_batch([(150, 200), (3, 3), (64, 300)], 2, 1, 32, 16, torch.float16, device)
    features = dict(sliding_window=window, sinks=sinks_for(2, device))
    assert_close_to_naive(run_triton(batch, **features), batch, features)


@pytest.mark.parametrize("seqs", ["mixed", "decode", "prefix_hit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_fp8_and_dtypes(dtype, seqs, device):
    batch = to_fp8(fp32_batch(SEQS[seqs], dtype=dtype, device=device), 0.05, 0.3)
    features = features_of("all", 8, device)
    assert_close_to_naive(run_triton(batch, **features), batch, features)


@pytest.mark.parametrize("window", [4, 16, 25])
@pytest.mark.parametrize("seqs", [[(1, 70), (20, 100), (1, 33)], [(150, 200), (1, 90)]], ids=["mixed", "long"])
def test_triton_never_reads_before_the_window(seqs, window, device):
    """NaN at every position no query of the sequence can see: any read of them would show."""
    batch = poison_before_window(fp32_batch(seqs, device=device), window, whole_blocks=False)
    features = dict(sliding_window=window, logit_softcap=3.0, sinks=sinks_for(8, device))
    assert_close_to_naive(run_triton(batch, **features), batch, features)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_triton_decode_splits_never_read_before_the_window(num_splits, device):
    batch = poison_before_window(fp32_batch([(1, 300), (1, 20), (1, 129)], device=device), 50, whole_blocks=False)
    features = dict(sliding_window=50, sinks=sinks_for(8, device))
    out = torch.empty_like(batch.query)
    attention_triton.decode_attention(batch.query, batch.poisoned_key_cache, batch.poisoned_value_cache,
                                      batch.metadata, batch.scale, out=out, num_splits=num_splits, **features)
    assert_close_to_naive(out, batch, features)


# ---- dispatch and errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_dispatch_passes_the_features(backend, device):
    batch = fp32_batch(MIXED, device=device)
    features = features_of("all", 8, device)
    key_cache, value_cache = batch.poisoned_key_cache, batch.poisoned_value_cache
    if backend == "auto" and device.type == "cpu":                     # the CPU path: garbage, not NaN
        key_cache, value_cache = garbage(key_cache), garbage(value_cache)
    with use_backend(backend):
        out = paged_attention(batch.query, key_cache, value_cache, batch.metadata, batch.scale, **features)
    assert_close_to_naive(out, batch, features)


@pytest.mark.parametrize("path", ["ref", "cpu", "triton"])
def test_rejects_bad_features(path, device):
    batch = fp32_batch(MIXED, device=device)
    run = {
        "ref": lambda **f: paged_attention_ref(batch.query, batch.key_cache, batch.value_cache, batch.metadata,
                                               batch.scale, **f),
        "cpu": lambda **f: paged_attention_cpu(batch.query.cpu(), batch.key_cache.cpu(), batch.value_cache.cpu(),
                                               batch.metadata, batch.scale, **f),
        "triton": lambda **f: run_triton(batch, **f),
    }[path]
    for bad, match in [(dict(sliding_window=0), "sliding_window"), (dict(sliding_window=4.0), "sliding_window"),
                       (dict(logit_softcap=0.0), "logit_softcap"), (dict(logit_softcap=float("inf")), "logit_softcap"),
                       (dict(sinks=torch.zeros(7, device=device)), "sinks"),
                       (dict(sinks=torch.zeros(8, dtype=torch.float64, device=device)), "sinks"),
                       (dict(sinks=torch.zeros(16, device=device)[::2]), "sinks")]:
        if path == "cpu" and "sinks" in bad:
            bad = dict(sinks=bad["sinks"].cpu())
        with pytest.raises(ValueError, match=match):
            run(**bad)


# ---- the feature variants compile for real GPUs (test_compile.py says how) ----------------------------------

FEATURE_LAUNCHES = '''
    from pagoda.kernels import attention_triton

    metadata = attention_metadata      # (the harness's)

    features = dict(sliding_window=4096, logit_softcap=50.0, sinks=torch.zeros(32))
    for cache_dtype in CACHE_DTYPES:
        cache = torch.zeros(64, 16, 8, 128, dtype=cache_dtype)
        scales = dict(k_scale=torch.ones(1), v_scale=torch.ones(1)) if cache_dtype == torch.float8_e4m3fn else {}
        query = torch.zeros(301, 32, 128, dtype=torch.bfloat16)
        attention_triton.paged_attention(query, cache, cache, metadata([1, 300], [40, 500]), 0.1, **scales,
                                         **features)
        out = torch.empty(2, 32, 128, dtype=torch.bfloat16)
        attention_triton.decode_attention(query[:2], cache, cache, metadata([1, 1], [40, 1000]), 0.1, out=out,
                                          num_splits=4, **scales, **features)
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile for real")
@pytest.mark.parametrize("cache_dtype,archs", [("torch.bfloat16", (80, 90)), ("torch.float8_e4m3fn", (89, 90))],
                         ids=["bf16", "fp8"])
def test_feature_kernels_compile(cache_dtype, archs):
    from triton_compile import compile_launches

    compiled = compile_launches(f"\n    CACHE_DTYPES = ({cache_dtype},)" + FEATURE_LAUNCHES, archs)
    if compiled is None:
        pytest.skip("Triton internals moved")
    expected = {f"{name}@sm_{arch}" for name in ("_prefill_kernel", "_decode_kernel", "_decode_reduce_kernel")
                for arch in archs}
    assert expected <= compiled, f"not compiled: {sorted(expected - compiled)}"
