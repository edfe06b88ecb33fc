"""Triton rotary embedding vs `apply_rotary_ref` (neox rotate-half, [cos | sin] cache).

Both compute in fp32 and round once, so the tolerance is one unit of the dtype: fp32 1e-5,
fp16 1e-3, bf16 1.6e-2 (relative, with the same absolute term).
"""
from __future__ import annotations

import pytest
import torch

from pagoda.kernels import rotary_triton
from pagoda.kernels.backend import use_backend
from pagoda.kernels.rotary import apply_rotary, apply_rotary_ref

TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cos_sin_cache(max_position: int, head_dim: int, device, base: float = 500000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)   # (max_position, head_dim / 2)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)                  # (max_position, head_dim)


def assert_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOLERANCES[actual.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_matches_reference(head_dim, num_heads, num_kv_heads, dtype, device):
    num_tokens = 7
    cache = cos_sin_cache(8192, head_dim, device)
    positions = torch.tensor([0, 1, 2, 8191, 4000, 17, 17], device=device)
    # query/key as strided views of a fused qkv projection.
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device).to(dtype)
    query, key = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]
    q, k = rotary_triton.apply_rotary(positions, query, key, cache)
    expected_q, expected_k = apply_rotary_ref(positions, query, key, cache)
    assert_close(q, expected_q)
    assert_close(k, expected_k)


def test_half_precision_cache_and_int32_positions(device):
    cache = cos_sin_cache(64, 96, device).to(torch.bfloat16)
    positions = torch.randint(0, 64, (5,), device=device, dtype=torch.int32)
    query = torch.randn(5, 4, 96, device=device).to(torch.bfloat16)
    key = torch.randn(5, 2, 96, device=device).to(torch.bfloat16)
    q, k = rotary_triton.apply_rotary(positions, query, key, cache)
    expected_q, expected_k = apply_rotary_ref(positions.long(), query, key, cache)
    assert_close(q, expected_q)
    assert_close(k, expected_k)


def test_dispatch_uses_triton(device):
    cache = cos_sin_cache(128, 64, device)
    positions = torch.arange(3, device=device)
    query, key = torch.randn(3, 4, 64, device=device), torch.randn(3, 2, 64, device=device)
    with use_backend("triton"):
        q, k = apply_rotary(positions, query, key, cache)
    expected_q, expected_k = apply_rotary_ref(positions, query, key, cache)
    assert_close(q, expected_q)
    assert_close(k, expected_k)


def test_rejects_bad_inputs(device):
    cache = cos_sin_cache(16, 64, device)
    query, key = torch.randn(3, 4, 64, device=device), torch.randn(3, 2, 64, device=device)
    with pytest.raises(ValueError, match="positions"):
        rotary_triton.apply_rotary(torch.arange(2, device=device), query, key, cache)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rotary_triton.apply_rotary(torch.arange(3, device=device), query, key, cache[:, :32])
    with pytest.raises(ValueError, match="positions must be int"):
        rotary_triton.apply_rotary(torch.arange(3, device=device).float(), query, key, cache)
