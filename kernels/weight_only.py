"""Weight-only quantized linear layers (W4A16, W8A16): integer weights in groups along the input
dim, each group with a scale and optionally a zero point and a min; activations stay in the model
dtype. One format serves GPTQ, AWQ, compressed-tensors' pack-quantized and GGUF's Q4_0, Q4_1, Q8_0,
Q4_K and Q6_K blocks, each converted to it exactly (no re-quantization) and held at its own size.

    w[n, k] = (q[n, k] - z[n, g]) * s[n, g] + m[n, g]        g = k // group_size, computed in float32

    q  qweight    bits=4: uint8 (N, K/2), byte j of a row holds k = 2j (low nibble) and 2j+1 (high)
                  bits=8: uint8 (N, K)
                  bits=6: the low 4 bits of each value as bits=4, and
       qweight_high       uint8 (N, K/4) their top 2 bits: byte j holds k = 4j .. 4j+3 in bits 0-1,
                          2-3, 4-5, 6-7 (q = low | high << 4: GGUF's Q6_K at its own 6 bits a value)
    s  scales     (N, K/group_size) float; or integer sub-scales when super_scales is given:
                  s = super_scales[n, k // super_group] * scales[n, g]   (GGUF's K-quants: a 6- or
                  8-bit scale per group and a float16 scale per 256-value super-block)
    z  zeros      uint8 (N, K/group_size), or the constant `zero` for every group (8 = symmetric int4,
                  128 = int8 stored offset as uint8, 0 = none); int16 where a zero point is 2^bits
                  (GPTQ's format stores z - 1 in `bits` bits, so its z runs from 1 to 2^bits)
    m  mins       None, (N, K/group_size) float, or integer sub-mins with super_mins as for s
    perm          None, or int (K,): stored column j is input feature perm[j] (GPTQ's act-order
                  checkpoints quantize the input features in an order of their own; sorting the
                  columns by group at load makes every group contiguous, and the GEMM reads x[:, perm])

Why float32 and in this order: GGUF's own dequantizer computes `d * q` then `+ m` (or `- dmin * m`) in
float32, and the products of a float16 scale and a small integer are exact there, so the reference
below equals `gguf.quants.dequantize` bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .backend import use_triton


@dataclass
class GroupQuantWeight:
    """One (N, K) weight in the format above (this rank's slice). Invariants: K % group_size == 0;
    super_group % group_size == 0 when super_scales or super_mins is given; qweight_high is given
    exactly when bits == 6 (and then K % 4 == 0)."""
    qweight: torch.Tensor
    bits: int
    group_size: int
    scales: torch.Tensor
    zeros: Optional[torch.Tensor] = None
    zero: int = 0
    mins: Optional[torch.Tensor] = None
    super_scales: Optional[torch.Tensor] = None
    super_mins: Optional[torch.Tensor] = None
    super_group: int = 256
    perm: Optional[torch.Tensor] = None
    qweight_high: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 6, 8):
            raise ValueError(f"bits must be 4, 6 or 8, got {self.bits}")
        if (self.bits == 6) != (self.qweight_high is not None):
            raise ValueError(f"qweight_high goes with bits=6 (and only then), got bits={self.bits} and "
                             f"qweight_high {'given' if self.qweight_high is not None else 'None'}")

    @property
    def shape(self) -> tuple[int, int]:                    # (N, K)
        rows, width = self.qweight.shape
        return rows, width * (1 if self.bits == 8 else 2)

    def nbytes(self) -> int:
        tensors = (self.qweight, self.qweight_high, self.scales, self.zeros, self.mins, self.super_scales,
                   self.super_mins, self.perm)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def unpack(weight: GroupQuantWeight) -> torch.Tensor:
    """The integers q as int32 (N, K)."""
    q = weight.qweight
    if weight.bits == 8:
        return q.to(torch.int32)
    low, high = (q & 0xF).to(torch.int32), (q >> 4).to(torch.int32)
    values = torch.stack([low, high], dim=-1).reshape(q.shape[0], -1)   # (N, K/2, 2) -> (N, K)
    if weight.bits == 6:
        top = weight.qweight_high.to(torch.int32)                       # (N, K/4)
        shifts = torch.arange(0, 8, 2, dtype=torch.int32, device=top.device)
        values = values | (((top[..., None] >> shifts) & 3).reshape(q.shape[0], -1) << 4)
    return values


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in [0, 16) -> uint8 (N, K/2) in the layout above."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def pack_int6(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) integers in [0, 64) -> (qweight uint8 (N, K/2), qweight_high uint8 (N, K/4)) as above."""
    q = q.to(torch.uint8)
    top = q >> 4
    high = top[:, 0::4] | (top[:, 1::4] << 2) | (top[:, 2::4] << 4) | (top[:, 3::4] << 6)
    return pack_int4(q & 0xF), high.contiguous()


def group_values(values: torch.Tensor, supers: Optional[torch.Tensor], weight: GroupQuantWeight) -> torch.Tensor:
    """Per-group float32 (N, K/group_size): `values`, or `supers * values` per super-block."""
    out = values.to(torch.float32)
    if supers is not None:
        out = supers.to(torch.float32).repeat_interleave(weight.super_group // weight.group_size, dim=1) * out
    return out


def dequantize(weight: GroupQuantWeight) -> torch.Tensor:
    """The float32 (N, K) weight (the reference every kernel is tested against)."""
    q = unpack(weight).to(torch.float32)                                # (N, K)
    rows, k = q.shape
    groups = k // weight.group_size
    q = q.view(rows, groups, weight.group_size)                          # (N, G, group)
    zero = (weight.zeros.to(torch.float32)[..., None] if weight.zeros is not None
            else torch.tensor(float(weight.zero)))
    w = (q - zero) * group_values(weight.scales, weight.super_scales, weight)[..., None]
    if weight.mins is not None:
        w = w + group_values(weight.mins, weight.super_mins, weight)[..., None]
    w = w.view(rows, k)
    if weight.perm is not None:                    # back to the input features' own order
        w = torch.empty_like(w).index_copy_(1, weight.perm.long(), w)
    return w


def weight_only_linear(x: torch.Tensor, weight: GroupQuantWeight, bias: Optional[torch.Tensor] = None,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(T, K) @ dequantize(weight).T + bias -> (T, N) in x's dtype; written into `out` when given."""
    if use_triton(x):
        from . import weight_only_triton

        if not weight_only_triton.supported(weight):
            # NOTE: never a silent fallback to dequantizing the whole weight on every call (float32 copies
            # of it, far slower); the first forward pass (KV-cache profiling) meets this at start-up
            raise ValueError(f"a {weight.bits}-bit weight of shape {weight.shape} in groups of {weight.group_size} "
                             f"is not supported by the GPU kernel (4, 6 or 8 bits, K a multiple of 8 (16 for 6 bits), "
                             f"groups of 16 values or a multiple of 16)")
        return weight_only_triton.weight_only_linear(x, weight, bias, out=out)
    return weight_only_linear_ref(x, weight, bias, out=out)


def weight_only_linear_ref(x: torch.Tensor, weight: GroupQuantWeight, bias: Optional[torch.Tensor] = None,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    y = F.linear(x, dequantize(weight).to(x.dtype), bias)
    return y if out is None else out.copy_(y)
