"""Triton rotary embedding vs `apply_rotary_ref` (neox rotate-half, [cos | sin] cache), including
partial rotary (a cache narrower than the head: the tail of each head passes through).

Both compute in fp32 and round once, so the tolerance is one unit of the dtype: fp32 1e-5,
fp16 1e-3, bf16 1.6e-2 (relative, with the same absolute term).
"""
from __future__ import annotations

import pytest
import torch
from triton_compile import compile_launches

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
    with pytest.raises(ValueError, match="cos_sin_cache"):            # wider than the head
        rotary_triton.apply_rotary(torch.arange(3, device=device), query, key, cos_sin_cache(16, 128, device))
    with pytest.raises(ValueError, match="rotary_dim even"):
        rotary_triton.apply_rotary(torch.arange(3, device=device), query, key, cache[:, :31])
    with pytest.raises(ValueError, match="positions must be int"):
        rotary_triton.apply_rotary(torch.arange(3, device=device).float(), query, key, cache)


# -- partial rotary (Phi-4-mini: partial_rotary_factor 0.75) ----------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,rotary_dim", [(128, 96), (64, 16), (80, 64), (96, 2)])
def test_partial_rotary_matches_reference(head_dim, rotary_dim, dtype, device):
    num_tokens, num_heads, num_kv_heads = 5, 4, 2
    cache = cos_sin_cache(512, rotary_dim, device, base=10000.0)
    positions = torch.tensor([0, 3, 511, 100, 100], device=device)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device).to(dtype)
    query, key = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]
    q, k = rotary_triton.apply_rotary(positions, query, key, cache)
    expected_q, expected_k = apply_rotary_ref(positions, query, key, cache)
    assert_close(q, expected_q)
    assert_close(k, expected_k)
    # the tail is passed through exactly, the rotated part moved
    assert torch.equal(q[..., rotary_dim:], query[..., rotary_dim:])
    assert torch.equal(k[..., rotary_dim:], key[..., rotary_dim:])
    assert not torch.allclose(q[1:3, :, :rotary_dim].float(), query[1:3, :, :rotary_dim].float())


def test_partial_reference_is_hugging_face_apply_rotary_pos_emb(device):
    """The reference against transformers' own partial-rotary formula (Phi-3's apply_rotary_pos_emb)."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    head_dim, rotary_dim, num_tokens = 64, 48, 6
    cache = cos_sin_cache(32, rotary_dim, device, base=10000.0)
    positions = torch.arange(num_tokens, device=device) * 5
    query = torch.randn(num_tokens, 4, head_dim, device=device)
    key = torch.randn(num_tokens, 2, head_dim, device=device)
    cos, sin = cache[positions].chunk(2, dim=-1)
    cos, sin = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]        # (1, T, rotary_dim)
    # transformers' layout: (batch, heads, tokens, head_dim)
    hf_q, hf_k = apply_rotary_pos_emb(query.transpose(0, 1)[None], key.transpose(0, 1)[None], cos, sin)
    q, k = apply_rotary_ref(positions, query, key, cache)
    torch.testing.assert_close(q, hf_q[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k, hf_k[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile for real")
def test_partial_rotary_kernel_compiles_for_sm80_and_sm90():
    launches = """
    from pagoda.kernels import rotary_triton
    bf16 = torch.bfloat16
    rotary_triton.apply_rotary(torch.arange(4), torch.zeros(4, 24, 128, dtype=bf16), torch.zeros(4, 8, 128, dtype=bf16),
                               torch.zeros(8, 96))
    """
    compiled = compile_launches(launches, (80, 90))
    if compiled is None:
        pytest.skip("Triton internals moved")
    assert {"_rotary_kernel@sm_80", "_rotary_kernel@sm_90"} <= compiled, compiled
