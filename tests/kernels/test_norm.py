"""Triton RMSNorm / fused add + RMSNorm vs the torch references.

The kernels round at the same points as the reference, so errors are one unit of the output dtype
at most: tolerance fp32 1e-5, fp16 1e-3, bf16 1.6e-2 (relative), plus a small absolute term. The
residual sum of the fused kernel is one rounding of x + residual, like torch's, so it must be exact
on GPU; on the CPU interpreter bf16 rounding truncates, so it gets one bf16 unit there.
"""
from __future__ import annotations

import os

import pytest
import torch

from pagoda.kernels import norm_triton
from pagoda.kernels.backend import use_backend
from pagoda.kernels.norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref

TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def assert_close(actual, expected, rounded_to=None):
    """`rounded_to`: the coarsest dtype the value was rounded through (default: its own dtype)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOLERANCES[rounded_to or actual.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 96, 4096])
def test_rms_norm(hidden, dtype, device):
    x = torch.randn(5, hidden, device=device).to(dtype) * 3
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    assert_close(norm_triton.rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [96, 4096])
def test_fused_add_rms_norm(hidden, dtype, device):
    x = torch.randn(5, hidden, device=device).to(dtype)
    residual = torch.randn(5, hidden, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    normed, summed = norm_triton.fused_add_rms_norm(x, residual, weight, 1e-5)
    expected_normed, expected_summed = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert_close(normed, expected_normed)
    exact = not (INTERPRETED and dtype == torch.bfloat16)
    tol = 0 if exact else TOLERANCES[dtype]
    torch.testing.assert_close(summed, expected_summed, atol=tol, rtol=tol)


def test_strided_rows_and_fp32_weight(device):
    """A row-strided view of x works, and an fp32 weight promotes the output like the reference."""
    x = torch.randn(4, 2 * 128, device=device).to(torch.bfloat16)[:, :128]
    weight = 1 + 0.1 * torch.randn(128, device=device)
    out = norm_triton.rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32
    assert_close(out, rms_norm_ref(x, weight, 1e-6), rounded_to=torch.bfloat16)


def test_leading_dims_are_flattened(device):
    """Like the reference, any (..., hidden) input works, e.g. per-head q/k norms on (T, H, D)."""
    x = torch.randn(3, 4, 64, device=device)
    residual = torch.randn_like(x)
    weight = torch.rand(64, device=device)
    assert_close(norm_triton.rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6))
    normed, summed = norm_triton.fused_add_rms_norm(x, residual, weight, 1e-6)
    expected_normed, expected_summed = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    assert_close(normed, expected_normed)
    assert_close(summed, expected_summed)


def test_dispatch_uses_triton(device):
    x = torch.randn(3, 256, device=device).to(torch.float16)
    residual = torch.randn_like(x)
    weight = torch.rand(256, device=device).to(torch.float16)
    with use_backend("triton"):
        assert_close(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6))
        normed, _ = fused_add_rms_norm(x, residual, weight, 1e-6)
    assert_close(normed, fused_add_rms_norm_ref(x, residual, weight, 1e-6)[0])


def test_rejects_bad_inputs(device):
    x = torch.randn(3, 64, device=device)
    with pytest.raises(ValueError, match="weight"):
        norm_triton.rms_norm(x, torch.ones(32, device=device), 1e-6)
    with pytest.raises(ValueError, match="scalar"):
        norm_triton.rms_norm(x[0, 0], torch.ones(64, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        norm_triton.fused_add_rms_norm(x, x.half(), torch.ones(64, device=device), 1e-6)
