"""Triton RMSNorm and fused residual-add + RMSNorm. Same contract as `norm.rms_norm_ref`.

One program per token holds the whole hidden vector in registers (one read, one write). The
rounding follows the reference step by step, so results differ from it only by fp32 reduction
order and rsqrt ulps (at most one unit of the output dtype):
  normed = (x_f32 * rsqrt(mean(x_f32^2) + eps)) rounded to x.dtype, then * weight in the promoted
  dtype (Hugging Face LlamaRMSNorm); the fused variant first rounds x + residual to the input dtype,
  returns that as the new residual, and normalises the rounded sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HIDDEN = 65536  # one row must fit in one program's registers


@triton.jit
def _rms_norm_row(
    x,              # (BLOCK,) fp32, already rounded to the input dtype; 0 past `hidden`
    weight_ptr,     # (hidden,)
    offs,           # (BLOCK,) int32
    mask,           # (BLOCK,) offs < hidden
    hidden,
    eps,
    X_DTYPE: tl.constexpr,     # the input dtype (rounding point of the normalised value)
    OUT_DTYPE: tl.constexpr,   # promote(x.dtype, weight.dtype)
):
    variance = tl.sum(x * x, 0) / hidden
    normed = (x * tl.rsqrt(variance + eps)).to(X_DTYPE).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (normed * weight).to(OUT_DTYPE)


@triton.jit
def _rms_norm_kernel(
    out_ptr,        # (num_tokens, hidden) contiguous
    x_ptr,          # (num_tokens, hidden), row stride stride_x
    weight_ptr,     # (hidden,)
    stride_x,
    hidden,
    eps,
    BLOCK: tl.constexpr,       # next power of 2 of hidden
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    out = _rms_norm_row(x.to(tl.float32), weight_ptr, offs, mask, hidden, eps,
                        x_ptr.dtype.element_ty, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * hidden + offs, out, mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(
    out_ptr,        # (num_tokens, hidden) contiguous: rms_norm(x + residual)
    sum_ptr,        # (num_tokens, hidden) contiguous: x + residual, input dtype
    x_ptr,          # (num_tokens, hidden), row stride stride_x
    residual_ptr,   # (num_tokens, hidden), row stride stride_r
    weight_ptr,     # (hidden,)
    stride_x,
    stride_r,
    hidden,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
    summed = (x + residual).to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * hidden + offs, summed, mask=mask)
    out = _rms_norm_row(summed.to(tl.float32), weight_ptr, offs, mask, hidden, eps,
                        sum_ptr.dtype.element_ty, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * hidden + offs, out, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (num_tokens, hidden) (leading dims are flattened); a new tensor."""
    x2d = _as_rows(x)
    _check_inputs(x2d, weight, eps)
    num_tokens, hidden = x2d.shape
    out = torch.empty(num_tokens, hidden, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if num_tokens > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_tokens,)](out, x2d, weight, x2d.stride(0), hidden, eps,
                                        BLOCK=block, num_warps=_num_warps(block))
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) as new tensors; the sum is in x.dtype."""
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype} {x.device}, "
                         f"got {tuple(residual.shape)} {residual.dtype} {residual.device}")
    x2d, residual2d = _as_rows(x), _as_rows(residual)
    _check_inputs(x2d, weight, eps)
    if residual2d.stride(-1) != 1:
        raise ValueError(f"residual must be contiguous in hidden, got strides {residual.stride()}")
    num_tokens, hidden = x2d.shape
    out = torch.empty(num_tokens, hidden, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    summed = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    if num_tokens > 0:
        block = triton.next_power_of_2(hidden)
        _fused_add_rms_norm_kernel[(num_tokens,)](
            out, summed, x2d, residual2d, weight, x2d.stride(0), residual2d.stride(0), hidden, eps,
            BLOCK=block, num_warps=_num_warps(block))
    return out.view(x.shape), summed.view(x.shape)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., hidden) -> (rows, hidden); a view whenever possible (2-D inputs always stay as they are)."""
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (hidden), got a scalar")
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 512))        # ~16 elements per thread


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if weight.shape != (x.shape[1],):
        raise ValueError(f"weight must have shape ({x.shape[1]},), got {tuple(weight.shape)}")
    if x.shape[1] > _MAX_HIDDEN:
        raise ValueError(f"hidden size {x.shape[1]} exceeds the single-pass limit {_MAX_HIDDEN}")
    for name, tensor in (("x", x), ("weight", weight)):
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be one of {_DTYPES}, got {tensor.dtype}")
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {tensor.stride()}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
