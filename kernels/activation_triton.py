"""Triton SiLU-and-multiply for gated MLPs. Same contract as `activation.silu_and_mul_ref`.

x (num_tokens, 2 * intermediate) = [gate | up]; out = silu(gate) * up, (num_tokens, intermediate).
Program (token, chunk) handles BLOCK columns of one row. The rounding mirrors the reference
(`F.silu(gate) * up` in the input dtype): silu is computed in fp32 and rounded to the input dtype,
then multiplied by `up` in fp32 and rounded again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    out_ptr,        # (num_tokens, intermediate) contiguous
    x_ptr,          # (num_tokens, 2 * intermediate), row stride stride_x
    stride_x,
    intermediate,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * intermediate + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x (num_tokens, 2 * I), leading dims flattened; a new (num_tokens, I)."""
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
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(intermediate, block))](
            out, x2d, x2d.stride(0), intermediate, BLOCK=block, num_warps=4 if block >= 512 else 1)
    return out.view(*x.shape[:-1], intermediate)
