"""FP8 W8A8 linear layers (e4m3): FP8 weights with one scale per output channel, activations
quantized to FP8 per token (or with one static scale), products accumulated in float32.

    x_scale[t] = max(amax(|x[t, :]|), MIN_AMAX) / 448      (dynamic; or the static input_scale)
    x_q[t, k]  = e4m3(clamp(x[t, k] / x_scale[t], -448, 448))       round to nearest even
    y[t, n]    = (sum_k x_q[t, k] * w_q[n, k]) * x_scale[t] * w_scale[n]  (+ bias[n])   in float32,
                 rounded once to x's dtype

    x      (T, K) float32 / float16 / bfloat16       w_q      (N, K) torch.float8_e4m3fn
    w_scale (N,) float32                              input_scale  None, or one float32 scalar

Every kernel quantizes the activations exactly like `quantize_per_token` / `quantize_static` (the
same float32 division and rounding), so the kernels and this reference differ only by float32
summation order. 448 is e4m3fn's largest finite value: a row's largest element maps onto it.
The products of two e4m3 values are exact in float32 (and in bf16 operands widened from e4m3),
so the kernels may multiply in bf16 with float32 accumulation without changing the math.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backend import use_triton
from .kv_quant import FP8_DTYPE, FP8_MAX  # e4m3 and its largest finite value (448)

# NOTE: a token whose largest |x| is below this (an all-zero row) gets the scale of this amax
# instead of 0, so dividing by the scale never makes a NaN; its values stay exact in FP8 anyway.
MIN_AMAX = 1e-12


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, K) -> (x_q float8_e4m3fn (T, K), scale float32 (T, 1)) with x ~= x_q * scale."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    return _to_fp8(x32 / scale), scale


def quantize_static(x: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, K) with one static scale (a calibrated checkpoint's) -> (x_q, scale float32 (T, 1));
    values beyond 448 * input_scale saturate."""
    scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return _to_fp8(x.float() / scale), scale


def quantize_weight_per_channel(weight: torch.Tensor, rows_per_chunk: int = 4096
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (w_q float8_e4m3fn (N, K), scale float32 (N,)): one scale per output
    channel (row), amax / 448. Chunked by rows so that quantizing a large layer needs float32
    room for one chunk only."""
    w_q = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows_per_chunk):
        rows = weight[start:start + rows_per_chunk].float()
        chunk_scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
        w_q[start:start + rows_per_chunk] = _to_fp8(rows / chunk_scale)
        scale[start:start + rows_per_chunk] = chunk_scale.squeeze(-1)
    return w_q, scale


def _to_fp8(scaled: torch.Tensor) -> torch.Tensor:
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               input_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(T, K) -> (T, N) in x's dtype (see the module docstring); written into `out` when given."""
    if use_triton(x):
        from . import fp8_triton

        return fp8_triton.fp8_linear(x, w_q, w_scale, input_scale, bias, out=out)
    y = fp8_linear_ref(x, w_q, w_scale, input_scale, bias)
    return y if out is None else out.copy_(y)


def fp8_linear_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   input_scale: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float32 reference every kernel is tested against (and the CPU path)."""
    x2d = x.reshape(-1, x.shape[-1])
    if input_scale is None:
        x_q, x_scale = quantize_per_token(x2d)
    else:
        x_q, x_scale = quantize_static(x2d, input_scale)
    y = torch.mm(x_q.float(), w_q.float().t()) * x_scale * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])
