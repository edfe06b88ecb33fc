"""Triton gated-MLP activations. Same contracts as `activation.silu_and_mul_ref` / `gelu_tanh_and_mul_ref`.

x (num_tokens, 2 * intermediate) = [gate | up]; out = act(gate) * up, (num_tokens, intermediate), with
act = SiLU or GeLU-tanh. Program (token, chunk) handles BLOCK columns of one row. The rounding mirrors
the reference (`act(gate) * up` in the input dtype): the activation is computed in fp32 and rounded to
the input dtype, then multiplied by `up` in fp32 and rounded again.

GeLU-tanh: 0.5 * g * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 * g^3))), computed as
g * sigmoid(2 * sqrt(2 / pi) * (g + 0.044715 * g^3)) (the same function, since 1 + tanh(z) =
2 * sigmoid(2z)), which needs no tanh and saturates cleanly for large |g|.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK = 1024
_SILU, _GELU_TANH = 0, 1


@triton.jit
def _act_and_mul_row(
    out_ptr,        # (num_tokens, intermediate) contiguous
    x_ptr,          # (num_tokens, 2 * intermediate), row stride stride_x
    stride_x,
    intermediate,
    ACT: tl.constexpr,          # _SILU or _GELU_TANH
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        act = gate * tl.sigmoid(gate)
    else:
        # 2 * sqrt(2 / pi) = 1.5957691216057308
        act = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
    act = act.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * intermediate + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, stride_x, intermediate, BLOCK: tl.constexpr):
    _act_and_mul_row(out_ptr, x_ptr, stride_x, intermediate, 0, BLOCK)


@triton.jit
def _gelu_tanh_and_mul_kernel(out_ptr, x_ptr, stride_x, intermediate, BLOCK: tl.constexpr):
    _act_and_mul_row(out_ptr, x_ptr, stride_x, intermediate, 1, BLOCK)


_KERNELS = {_SILU: _silu_and_mul_kernel, _GELU_TANH: _gelu_tanh_and_mul_kernel}


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x (num_tokens, 2 * I), leading dims flattened; a new (num_tokens, I)."""
    return _act_and_mul(x, _SILU)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x[..., :I]) * x[..., I:] for x (num_tokens, 2 * I), leading dims flattened; a new (num_tokens, I)."""
    return _act_and_mul(x, _GELU_TANH)


def _act_and_mul(x: torch.Tensor, act: int) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(f"x must be (num_tokens, 2 * intermediate), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be one of {_DTYPES}, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(f"x must be contiguous in its last dim, got strides {x.stride()}")
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])          # (num_tokens, 2 * I)
    num_tokens, intermediate = x2d.shape[0], x2d.shape[1] // 2
    out = torch.empty(num_tokens, intermediate, dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        block = min(_BLOCK, triton.next_power_of_2(intermediate))
        _KERNELS[act][(num_tokens, triton.cdiv(intermediate, block))](
            out, x2d, x2d.stride(0), intermediate, BLOCK=block, num_warps=4 if block >= 512 else 1)
    return out.view(*x.shape[:-1], intermediate)
