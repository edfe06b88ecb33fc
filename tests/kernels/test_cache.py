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
