"""Triton GEMM for weight-only quantized weights (`weight_only.GroupQuantWeight`): y = x @ W.T + bias,
W dequantized in registers from its packed integers, never written out in full.

Per (BLOCK_N, BLOCK_K) tile of W, each program:
  1. loads the packed weight as int32 words (8 int4 or 4 int8 values each: byte j of a row holds
     k = 2j and 2j+1, so on a little-endian device word w holds k = 8w .. 8w+7 in nibble order) and
     splits them with shifts;
  2. turns each integer into float32 without an int->float conversion instruction (a quarter-rate
     one on recent GPUs, and there are two per byte of weight): `q | 0x4B000000` read as float32 is
     2^23 + q exactly, so `(2^23 + q) - (2^23 + z)` is q - z exactly;
  3. applies the group's scale (and two-level super-scale, zero point, min) in float32, in the
     reference's order, so the tile equals `weight_only.dequantize` bit for bit; then
  4. multiplies: tl.dot on the tile cast to the activations' dtype (the reference's rounding point)
     for M >= 2, or float32 multiply-adds for M == 1 (a tensor-core tile would be 1/16 used).

Shapes and why (the decode-time GEMMs are memory-bound, the weight is the traffic):
- M == 1..64: few output tiles, so the K loop is split over SPLIT_K programs (partial sums added
  atomically into a float32 buffer) until there are several programs per SM; otherwise batch-1
  reads would come from a fraction of the SMs and fall far short of the DRAM bandwidth.
- M > 64: wide tiles, no split; each weight tile is dequantized once per BLOCK_M rows of x.
`pick_config` holds these heuristics; tests pass explicit configs to cover every path.

A tile never straddles a group boundary it cannot handle: BLOCK_K is a multiple of the group size
(several groups per tile: the tile is viewed as (BLOCK_N, groups, group)) or divides it (one group
per tile); a format that fits neither (a group size not a multiple of 16) is not `supported` (the
dispatch in weight_only.py then uses the torch reference).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import triton
import triton.language as tl

# NOTE: `weight` arguments below are `weight_only.GroupQuantWeight`s, used by their fields only: this
# module does not import weight_only (which dispatches here), so the two never import each other.

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAGIC = 8388608.0          # 2^23: float32 2^23 + q has q in its low mantissa bits


@dataclass(frozen=True)
class GemmConfig:
    """One launch shape. block_m == 1 selects the multiply-add path (M must be 1)."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _group_params(scales_ptr, zeros_ptr, mins_ptr, sscales_ptr, smins_ptr, offs_n, cols, super_cols, mask,
                  stride_sn, stride_zn, stride_mn, stride_ssn, stride_smn, zero_magic,
                  HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_SUPER_SCALES: tl.constexpr,
                  HAS_SUPER_MINS: tl.constexpr):
    """Float32 (scale, 2^23 + zero, min) of the groups at `cols` (any shape broadcast with offs_n)."""
    scale = tl.load(scales_ptr + offs_n * stride_sn + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SUPER_SCALES:
        scale = tl.load(sscales_ptr + offs_n * stride_ssn + super_cols, mask=mask, other=0.0).to(tl.float32) * scale
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + offs_n * stride_zn + cols, mask=mask, other=0).to(tl.float32) + 8388608.0  # 2^23
    else:
        zero = tl.zeros(scale.shape, tl.float32) + zero_magic
    low = tl.zeros(scale.shape, tl.float32)
    if HAS_MINS:
        low = tl.load(mins_ptr + offs_n * stride_mn + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SUPER_MINS:
            low = tl.load(smins_ptr + offs_n * stride_smn + super_cols, mask=mask, other=0.0).to(tl.float32) * low
    return scale, zero, low


@triton.jit
def _weight_only_gemm_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, mins_ptr, sscales_ptr, smins_ptr, perm_ptr, bias_ptr, out_ptr,
    M, N, K, num_groups, k_tiles_per_split,
    stride_xm, stride_qn, stride_sn, stride_zn, stride_mn, stride_ssn, stride_smn, stride_om,
    zero_magic,                        # 2^23 + the constant zero point (when there are no zeros)
    BITS: tl.constexpr, GROUP: tl.constexpr, SUPER_GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_SUPER_SCALES: tl.constexpr,
    HAS_SUPER_MINS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,              # the interpreter: bf16 operands rounded, then a float32 dot
):
    PACK: tl.constexpr = 32 // BITS                # values per int32 word
    WORDS: tl.constexpr = BLOCK_K // PACK
    MASK: tl.constexpr = (1 << BITS) - 1
    ONE_GROUP: tl.constexpr = BLOCK_K <= GROUP     # a tile lies in one group (else holds BLOCK_K // GROUP)

    # output tiles in GROUP_M-row bands, so neighbouring programs share weight tiles in L2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * num_pid_n)
    first_m = band * GROUP_M
    band_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band_rows)
    pid_n = (pid % (GROUP_M * num_pid_n)) // band_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shifts = tl.arange(0, PACK) * BITS
    if BLOCK_M == 1:
        acc1 = tl.zeros((BLOCK_N,), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

    k_tiles = tl.cdiv(K, BLOCK_K)
    first_tile = pid_k * k_tiles_per_split
    last_tile = tl.minimum(first_tile + k_tiles_per_split, k_tiles)
    for tile in range(first_tile, last_tile):
        k0 = tile * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        offs_w = k0 // PACK + tl.arange(0, WORDS)
        words = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_w[None, :],
                        mask=mask_n[:, None] & (offs_w < K // PACK)[None, :], other=0)
        q = (words[:, :, None] >> shifts[None, None, :]) & MASK            # (BLOCK_N, WORDS, PACK)
        f = (tl.reshape(q, (BLOCK_N, BLOCK_K)) | 0x4B000000).to(tl.float32, bitcast=True)   # 2^23 + q
        if ONE_GROUP:
            # k0 < K and K is a multiple of GROUP: the group exists, only the rows need a mask
            scale, zero, low = _group_params(
                scales_ptr, zeros_ptr, mins_ptr, sscales_ptr, smins_ptr, offs_n, k0 // GROUP, k0 // SUPER_GROUP,
                mask_n, stride_sn, stride_zn, stride_mn, stride_ssn, stride_smn,
                zero_magic, HAS_ZEROS, HAS_MINS, HAS_SUPER_SCALES, HAS_SUPER_MINS)
            w = (f - zero[:, None]) * scale[:, None]
            if HAS_MINS:
                w = w + low[:, None]
        else:
            TILE_GROUPS: tl.constexpr = BLOCK_K // GROUP
            cols = k0 // GROUP + tl.arange(0, TILE_GROUPS)
            scale, zero, low = _group_params(
                scales_ptr, zeros_ptr, mins_ptr, sscales_ptr, smins_ptr, offs_n[:, None],
                cols[None, :], (cols * GROUP // SUPER_GROUP)[None, :], mask_n[:, None] & (cols < num_groups)[None, :],
                stride_sn, stride_zn, stride_mn, stride_ssn, stride_smn, zero_magic,
                HAS_ZEROS, HAS_MINS, HAS_SUPER_SCALES, HAS_SUPER_MINS)
            f3 = tl.reshape(f, (BLOCK_N, TILE_GROUPS, GROUP))
            w3 = (f3 - zero[:, :, None]) * scale[:, :, None]
            if HAS_MINS:
                w3 = w3 + low[:, :, None]
            w = tl.reshape(w3, (BLOCK_N, BLOCK_K))
        if HAS_PERM:
            x_cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            x_cols = offs_k
        if BLOCK_M == 1:
            # NOTE: reduced every step (a few shuffles) rather than kept as a (BLOCK_N, BLOCK_K)
            # accumulator: the registers go to more programs per SM, i.e. more loads in flight
            xv = tl.load(x_ptr + pid_m * stride_xm + x_cols, mask=mask_k, other=0.0)
            acc1 += tl.sum(w * xv.to(tl.float32)[None, :], axis=1)
        else:
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + x_cols[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), tl.trans(w.to(a.dtype).to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, input_precision=DOT_PRECISION)
    if BLOCK_M == 1:
        acc = tl.reshape(acc1, (1, BLOCK_N))

    if HAS_BIAS:
        if pid_k == 0:                                                    # added once over the splits
            acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)                       # float32 partial sums


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _fit_block_k(block_k: int, group: int, k: int) -> Optional[int]:
    """The largest BLOCK_K <= block_k (>= 16) whose tiles never straddle a group unevenly."""
    while block_k >= 16:
        if block_k <= group and (group % block_k == 0 or group == k):
            return block_k
        if block_k > group and block_k % group == 0:
            return block_k
        block_k //= 2
    return None


def supported(weight: Any) -> bool:
    """Whether this kernel takes `weight` (else the torch reference must): 4 or 8 bits, K a multiple
    of 8 (whole int32 words per row) and a power-of-2 tile of 16 to 64 values that fits the groups."""
    k = weight.shape[1]
    return weight.bits in (4, 8) and k % 8 == 0 and _fit_block_k(64, weight.group_size, k) is not None


def pick_config(m: int, n: int, k: int, weight: Any, device: torch.device) -> Optional[GemmConfig]:
    """A launch shape for (M, N, K), or None where no tile fits the group size (not `supported`).

    NOTE: a starting point for H100-class GPUs, not a tuned table: batch 1 multiply-adds 32 rows a
    step (4 KiB of packed weight); up to 64 rows use 16/32/64-row tensor-core tiles; both split K
    until there are about 4 (batch 1) or 2 programs per SM, keeping at least 4 K tiles per program.
    Larger M uses 64 or 128-row tiles, 128 columns wide unless that leaves SMs idle."""
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    if m == 1:
        block_m, block_n, block_k, warps, stages, waves = 1, 32, 256 if weight.bits == 4 else 128, 4, 3, 4
    elif m <= 64:
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        block_n, block_k, warps, stages, waves = 64, 128, 4, 4, 2
    else:
        block_m = 64 if m <= 128 else 128
        block_n = 128 if triton.cdiv(m, block_m) * triton.cdiv(n, 128) >= sms else 64
        block_k, warps, stages, waves = 64, 4 if block_m == 64 else 8, 3, 0
    fitted = _fit_block_k(block_k, weight.group_size, k)
    if fitted is None:
        return None
    split = 1
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, fitted)
    while tiles * split < waves * sms and k_tiles // (2 * split) >= 4:
        split *= 2
    return GemmConfig(block_m, block_n, fitted, split, warps, stages)


def _check(x: torch.Tensor, weight: Any, bias: Optional[torch.Tensor],
           out: Optional[torch.Tensor], m: int) -> None:
    n, k = weight.shape
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    if weight.bits not in (4, 8):
        raise ValueError(f"weight bits must be 4 or 8, got {weight.bits}")
    if k % weight.group_size:
        raise ValueError(f"the weight's {k} input features are not a multiple of group_size {weight.group_size}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if out is not None and (out.shape != (m, n) or out.dtype != x.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must be a ({m}, {n}) {x.dtype} tensor with unit column stride, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")


def weight_only_linear(x: torch.Tensor, weight: Any, bias: Optional[torch.Tensor] = None,
                       out: Optional[torch.Tensor] = None, config: Optional[GemmConfig] = None) -> torch.Tensor:
    """(..., K) @ dequantize(weight).T + bias -> (..., N) in x's dtype; into `out` ((T, N)) when given.
    `config` overrides `pick_config` (tests)."""
    n, k = weight.shape
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    m = x2.shape[0]
    _check(x2, weight, bias, out, m)
    result = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return result if out is not None else result.view(*x.shape[:-1], n)
    if config is not None and _fit_block_k(config.block_k, weight.group_size, k) != config.block_k:
        raise ValueError(f"config block_k={config.block_k} does not fit group_size {weight.group_size} (K={k})")
    config = config or pick_config(m, n, k, weight, x.device)
    if config is None or not supported(weight):
        raise ValueError(f"the Triton GEMM does not take this weight ({weight.bits} bits, group_size "
                         f"{weight.group_size}, K={k}): see `supported`")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if config.block_m == 1 and m != 1:
        raise ValueError(f"config block_m=1 is the single-row path; got {m} rows")
    if config.split_k > 1:
        # float32 partial sums: straight into `result` when it is float32, else a buffer copied once
        target = result if result.dtype == torch.float32 else torch.empty(m, n, dtype=torch.float32,
                                                                             device=x.device)
        target.zero_()
    else:
        target = result
    _launch(x2, weight, bias, target, config)
    if target is not result:
        result.copy_(target)
    return result if out is not None else result.view(*x.shape[:-1], n)


def _launch(x: torch.Tensor, weight: Any, bias: Optional[torch.Tensor], target: torch.Tensor,
            config: GemmConfig) -> None:
    m = x.shape[0]
    n, k = weight.shape
    qweight = weight.qweight if weight.qweight.is_contiguous() else weight.qweight.contiguous()
    words = qweight.view(torch.int32)                   # (N, K * bits / 32); see the module docstring
    scales = _rows(weight.scales)
    optional = [_rows(t) if t is not None else None
                for t in (weight.zeros, weight.mins, weight.super_scales, weight.super_mins)]
    zeros, mins, super_scales, super_mins = (t if t is not None else words for t in optional)
    strides = [t.stride(0) if t is not None else 0 for t in optional]
    k_tiles = triton.cdiv(k, config.block_k)
    per_split = triton.cdiv(k_tiles, config.split_k)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), triton.cdiv(k_tiles, per_split))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"      # fp16/bf16 dots ignore it
    _weight_only_gemm_kernel[grid](
        x, words, scales, zeros, mins, super_scales, super_mins,
        weight.perm if weight.perm is not None else words, bias if bias is not None else words, target,
        m, n, k, scales.shape[1], per_split,
        x.stride(0), words.stride(0), scales.stride(0), *strides, target.stride(0),
        _MAGIC + weight.zero,
        BITS=weight.bits, GROUP=weight.group_size, SUPER_GROUP=weight.super_group,
        HAS_ZEROS=weight.zeros is not None, HAS_MINS=weight.mins is not None,
        HAS_SUPER_SCALES=weight.super_scales is not None, HAS_SUPER_MINS=weight.super_mins is not None,
        HAS_PERM=weight.perm is not None, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        GROUP_M=8, DOT_PRECISION=precision, UPCAST=_needs_upcast(x),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _needs_upcast(x: torch.Tensor) -> bool:
    # NOTE: the Triton interpreter keeps bf16 as raw uint16 bits: it casts them but cannot multiply them
    return x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (the kernel indexes columns directly); a copy only if it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()
