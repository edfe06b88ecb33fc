"""Triton reshape_and_cache vs `reshape_and_cache_ref`: the two caches must end up identical.

Copies are exact, so the tolerance is zero except where the cache dtype differs from the input
dtype (a rounding cast): there one unit of the cache dtype.
"""
from __future__ import annotations

import pytest
import torch

from pagoda.kernels import cache_triton
from pagoda.kernels.backend import use_backend
from pagoda.kernels.cache import reshape_and_cache, reshape_and_cache_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(num_tokens, num_kv_heads, head_dim, block_size, dtype, cache_dtype, device, num_blocks=8):
    # key/value as strided slices of one fused projection, like the model produces them.
    fused = torch.randn(num_tokens, 2, num_kv_heads, head_dim, device=device).to(dtype)
    key, value = fused[:, 0], fused[:, 1]                      # (num_tokens, num_kv_heads, head_dim), strided
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[::3] = -1                                            # padding tokens: skipped
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device).to(cache_dtype)
    value_cache = torch.randn_like(key_cache)
    return key, value, key_cache, value_cache, slots


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (1, 128), (3, 96)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_matches_reference(block_size, num_kv_heads, head_dim, dtype, device):
    key, value, key_cache, value_cache, slots = make_inputs(13, num_kv_heads, head_dim, block_size,
                                                            dtype, dtype, device)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    reshape_and_cache_ref(key, value, expected_k, expected_v, slots)
    cache_triton.reshape_and_cache(key, value, key_cache, value_cache, slots)
    torch.testing.assert_close(key_cache, expected_k, atol=0, rtol=0)
    torch.testing.assert_close(value_cache, expected_v, atol=0, rtol=0)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=str)
def test_casts_to_cache_dtype(dtype, cache_dtype, device):
    key, value, key_cache, value_cache, slots = make_inputs(10, 2, 64, 16, dtype, cache_dtype, device)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    reshape_and_cache_ref(key, value, expected_k, expected_v, slots.to(torch.int32))
    cache_triton.reshape_and_cache(key, value, key_cache, value_cache, slots.to(torch.int32))
    tol = 0 if cache_dtype == torch.float32 else 8e-3                       # one bf16 ulp, relative
    torch.testing.assert_close(key_cache, expected_k, atol=0, rtol=tol)
    torch.testing.assert_close(value_cache, expected_v, atol=0, rtol=tol)


def test_dispatch_uses_triton(device):
    key, value, key_cache, value_cache, slots = make_inputs(9, 2, 64, 16, torch.float16, torch.float16, device)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    reshape_and_cache_ref(key, value, expected_k, expected_v, slots)
    with use_backend("triton"):
        reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)


def test_rejects_bad_inputs(device):
    key, value, key_cache, value_cache, slots = make_inputs(4, 2, 64, 16, torch.float16, torch.float16, device)
    with pytest.raises(ValueError, match="slot_mapping"):
        cache_triton.reshape_and_cache(key, value, key_cache, value_cache, slots[:3])
    with pytest.raises(ValueError, match="key_cache"):
        cache_triton.reshape_and_cache(key, value, key_cache[:, :, :1], value_cache, slots)
    with pytest.raises(ValueError, match="contiguous"):
        cache_triton.reshape_and_cache(key.transpose(1, 2), value.transpose(1, 2),
                                       key_cache.transpose(2, 3), value_cache.transpose(2, 3), slots)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_no_host_sync(device):
    key, value, key_cache, value_cache, slots = make_inputs(64, 8, 128, 16, torch.bfloat16, torch.bfloat16,
                                                            device, num_blocks=16)
    cache_triton.reshape_and_cache(key, value, key_cache, value_cache, slots)   # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cache_triton.reshape_and_cache(key, value, key_cache, value_cache, slots)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- FP8 cache: stored = value / scale, saturated to +-448, rounded to nearest even ------------------------

FP8 = torch.float8_e4m3fn
SCALES = [1.0, 0.0625, 0.37, 3.0]


def fp8_inputs(num_tokens, num_kv_heads, head_dim, dtype, device, spread=1.0):
    key, value, key_cache, value_cache, slots = make_inputs(num_tokens, num_kv_heads, head_dim, 16, dtype,
                                                            torch.float32, device)
    key, value = key * spread, value * spread
    return key, value, key_cache.to(FP8), value_cache.to(FP8), slots


def as_bits(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.uint8)


@pytest.mark.parametrize("k_scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (3, 96)])
def test_fp8_matches_reference(num_kv_heads, head_dim, dtype, k_scale, device):
    """Bit-identical FP8 bytes: saturation (values far beyond 448 * scale), ties to even, subnormals."""
    key, value, key_cache, value_cache, slots = fp8_inputs(13, num_kv_heads, head_dim, dtype, device, spread=40.0)
    k_scale_t = torch.tensor([k_scale], device=device)
    v_scale_t = torch.tensor([k_scale * 0.5], device=device)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    reshape_and_cache_ref(key, value, expected_k, expected_v, slots, k_scale_t, v_scale_t)
    cache_triton.reshape_and_cache(key, value, key_cache, value_cache, slots, k_scale_t, v_scale_t)
    assert torch.equal(as_bits(key_cache), as_bits(expected_k))
    assert torch.equal(as_bits(value_cache), as_bits(expected_v))


def test_fp8_ties_and_subnormals_match_torch(device):
    """Every midpoint between two neighbouring e4m3 values (ties go to the even one), both signs."""
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    codes = codes[codes.isfinite() & (codes >= 0)].unique().sort().values            # 0 .. 448
    mids = torch.cat([(codes[1:] + codes[:-1]) / 2, codes[:1] + 2 ** -11])          # + a subnormal tie
    mids = torch.cat([mids, -mids])
    num_tokens = -(-mids.numel() // 64)
    key = torch.zeros(num_tokens * 64)
    key[:mids.numel()] = mids * 0.5                                                  # scale 0.5: exact
    key = key.view(num_tokens, 1, 64).to(device)
    slots = torch.arange(num_tokens, device=device)
    caches = [torch.zeros(num_tokens, 1, 1, 64, dtype=FP8, device=device) for _ in range(4)]
    scale = torch.tensor([0.5], device=device)
    reshape_and_cache_ref(key, key, caches[0], caches[1], slots, scale, scale)
    cache_triton.reshape_and_cache(key, key, caches[2], caches[3], slots, scale, scale)
    assert torch.equal(as_bits(caches[2]), as_bits(caches[0]))
    # the torch cast rounds ties to even: 1.0625 (between 1 and 1.125) -> 1.0; 1.1875 -> 1.25
    assert caches[0].flatten()[(codes == 1.0).nonzero().item()].float() == 1.0


@pytest.mark.parametrize("scale", [1.0, 0.02])
def test_fp8_reference_is_scaled_saturated_rounding(scale, device):
    """The reference itself: stored * scale is within half an e4m3 step of the value; beyond the
    range the stored value is +-448, never NaN; padding slots are untouched."""
    key, value, key_cache, value_cache, slots = fp8_inputs(12, 2, 64, torch.float32, device, spread=20.0)
    assert slots[1] >= 0                                       # (every third slot is padding)
    key[1, 0, :4] = torch.tensor([1e6, -1e6, 448.0 * scale * 1.01, 0.0], device=device)
    before = key_cache.clone()
    scale_t = torch.tensor([scale], device=device)
    reshape_and_cache_ref(key, value, key_cache, value_cache, slots, scale_t, scale_t)
    flat = key_cache.view(-1, 2, 64)
    valid = slots >= 0
    stored = flat[slots[valid]].float()
    real = key[valid].float() / scale
    assert not stored.isnan().any()
    assert stored.abs().max() == 448.0
    in_range = real.abs() <= 448
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, absolute <= 2^-10 for subnormals
    err = (stored - real).abs()[in_range]
    assert (err <= torch.maximum(real.abs()[in_range] * 2 ** -4, torch.full_like(err, 2 ** -10))).all()
    assert flat[slots[1], 0, :4].float().tolist() == [448.0, -448.0, 448.0, 0.0]
    untouched = torch.ones(key_cache.shape[0] * key_cache.shape[1], dtype=torch.bool, device=device)
    untouched[slots[valid]] = False
    assert torch.equal(as_bits(key_cache.view(-1, 2, 64)[untouched]), as_bits(before.view(-1, 2, 64)[untouched]))


def test_fp8_scale_changes_what_is_stored(device):
    key, value, key_cache, value_cache, slots = fp8_inputs(8, 2, 64, torch.bfloat16, device)
    one, half = torch.ones(1, device=device), torch.full((1,), 0.5, device=device)
    cache_triton.reshape_and_cache(key, value, key_cache, value_cache, slots, one, one)
    first = key_cache.float().clone()
    cache_triton.reshape_and_cache(key, value, key_cache, value_cache, slots, half, one)
    valid = slots[slots >= 0]
    flat_first, flat_now = first.view(-1, 2, 64)[valid], key_cache.float().view(-1, 2, 64)[valid]
    torch.testing.assert_close(flat_now, flat_first * 2, atol=0.07, rtol=0.07)   # 2x the value, re-rounded


def test_fp8_dispatch_and_missing_scales(device):
    key, value, key_cache, value_cache, slots = fp8_inputs(9, 2, 64, torch.float16, device)
    scale = torch.tensor([0.25], device=device)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    reshape_and_cache_ref(key, value, expected_k, expected_v, slots, scale, scale)
    with use_backend("triton"):
        reshape_and_cache(key, value, key_cache, value_cache, slots, scale, scale)
    assert torch.equal(as_bits(key_cache), as_bits(expected_k))
    with pytest.raises(ValueError, match="k_scale"):
        cache_triton.reshape_and_cache(key, value, key_cache, value_cache, slots)
    with pytest.raises(ValueError, match="v_scale"):
        reshape_and_cache_ref(key, value, key_cache, value_cache, slots, scale, torch.ones(2, device=device))
    with pytest.raises(ValueError, match="value_cache dtype"):
        cache_triton.reshape_and_cache(key, value, key_cache, value_cache.float(), slots, scale, scale)
