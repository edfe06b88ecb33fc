"""Triton silu_and_mul vs `silu_and_mul_ref`.

The kernel rounds silu(gate) to the input dtype before multiplying, like the reference, so errors
are about one unit of the dtype: fp32 1e-5, fp16 1e-3, bf16 1.6e-2 (relative and absolute).
"""
from __future__ import annotations

import pytest
import torch

from pagoda.kernels import activation_triton
from pagoda.kernels.activation import silu_and_mul, silu_and_mul_ref
from pagoda.kernels.backend import use_backend

TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("intermediate", [64, 100, 1500])
def test_matches_reference(intermediate, dtype, device):
    x = (3 * torch.randn(4, 2 * intermediate, device=device)).to(dtype)
    out = activation_triton.silu_and_mul(x)
    expected = silu_and_mul_ref(x)
    assert out.dtype == dtype and out.shape == (4, intermediate)
    torch.testing.assert_close(out, expected, atol=TOLERANCES[dtype], rtol=TOLERANCES[dtype])


def test_strided_rows_and_dispatch(device):
    x = torch.randn(3, 2 * 256 + 8, device=device)[:, :2 * 256]          # row stride != 2 * intermediate
    with use_backend("triton"):
        out = silu_and_mul(x)
    torch.testing.assert_close(out, silu_and_mul_ref(x), atol=1e-5, rtol=1e-5)


def test_leading_dims_are_flattened(device):
    x = torch.randn(2, 3, 2 * 48, device=device)
    torch.testing.assert_close(activation_triton.silu_and_mul(x), silu_and_mul_ref(x), atol=1e-5, rtol=1e-5)


def test_rejects_bad_inputs(device):
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        activation_triton.silu_and_mul(torch.randn(3, 7, device=device))
    with pytest.raises(ValueError, match="dtype"):
        activation_triton.silu_and_mul(torch.randn(3, 8, device=device).double())
