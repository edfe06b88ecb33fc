"""Triton GEMM and GEMV for weight-only quantized weights (`weight_only.GroupQuantWeight`):
y = x @ W.T + bias, W dequantized in registers from its packed integers, never written out in full.

Per (BLOCK_N, BLOCK_K) tile of W, each program:
  1. loads the packed weight as int32 words (8 int4 or 4 int8 values each: byte j of a row holds
     k = 2j and 2j+1, so on a little-endian device word w holds k = 8w .. 8w+7 in nibble order),
     splits them with shifts and interleaves the pieces back into k order (`_unpack`: the values of
     a word stay in the thread that loaded it, so the (BLOCK_N, BLOCK_K) tile needs no shuffle);
     6-bit weights load two such planes, the low 4 bits as int4 and the top 2 bits 16 to a word
     (`_unpack2`), and join them (q = low | high << 4);
  2. turns each integer into float32 without an int->float conversion instruction (a quarter-rate
     one on recent GPUs, and there are two per byte of weight): `q | 0x4B000000` read as float32 is
     2^23 + q exactly, so `(2^23 + q) - (2^23 + z)` is q - z exactly;
  3. multiplies:
     GEMV (M <= 8, `GemmConfig.block_m` < 16): float32 multiply-adds of (q - z) with each row of x,
       summed over the tile's part of a group before the group's scale is applied (one multiply per
       group and row instead of one per value: at batch 1 the dequantization's arithmetic, not the
       weight stream, would otherwise bound the kernel), plus min * sum(x) where there are mins;
     GEMM (M > 8): the group's scale (and super-scale, min) applied in float32 in the reference's
       order, so the tile equals `weight_only.dequantize` bit for bit, cast to the activations'
       dtype (the reference's rounding point) and fed to tl.dot.

Shapes and why (the decode-time GEMMs are memory-bound, the weight is the traffic):
- M <= 64: few output tiles, so the K loop is split over `split_k` programs until there are several
  programs per SM; otherwise batch-1 reads would come from a fraction of the SMs. Each split writes
  its float32 partial sums to a scratch buffer and bumps a per-tile counter; the split that arrives
  last adds the partials in split order (the same sum on every run), adds the bias and writes the
  output (`split_k_triton.finish`, shared with the FP8 GEMM). One launch per GEMM: no zero-filled
  accumulator, no cast kernel after it (inside a CUDA graph every extra kernel costs microseconds, and
  a decode step runs four GEMMs per layer). The last split sets its counter back to 0, so the counters
  are zeroed once, when first allocated; counters and scratch are allocated once per device.
- M > 64: wide tiles, no split; each weight tile is dequantized once per BLOCK_M rows of x.
`pick_config` takes a tuned table (weight_only_configs/<GPU name>.json, written by
bench/tune_weight_only.py) where it has the shape, else the heuristics of `default_config`.

A tile never straddles a group boundary it cannot handle: BLOCK_K is a multiple of the group size
(several groups per tile: the tile is viewed as (BLOCK_N, groups, group)) or divides it (one group
per tile); a format that fits neither (a group size not a multiple of 16) is not `supported` (the
dispatch in weight_only.py then refuses it by name on a GPU).
"""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from . import split_k_triton, tuned_configs
from .split_k_triton import tile_counters as _tile_counters
from .tuned_configs import read_table as load_table    # the tuned table of a path, read once ({} if none)

# NOTE: `weight` arguments below are `weight_only.GroupQuantWeight`s, used by their fields only: this
# module does not import weight_only (which dispatches here), so the two never import each other.

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAGIC = 8388608.0          # 2^23: float32 2^23 + q has q in its low mantissa bits
GEMV_MAX_M = 8              # rows the GEMV takes; above, the tensor-core GEMM
CONFIG_DIR = tuned_configs.config_dir("weight_only")


@dataclass(frozen=True)
class GemmConfig:
    """One launch shape. block_m < 16 (1, 2, 4 or 8, at least M) selects the GEMV; 16 and up the
    tensor-core GEMM with BLOCK_M = block_m."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    @property
    def gemv(self) -> bool:
        return self.block_m < 16


@triton.jit
def _unpack(words, BITS: tl.constexpr):
    """(R, W) int32 words -> (R, W * 32 / BITS) int32 values in k order, each still in its word's thread."""
    if BITS == 4:
        q0 = words & 0xF
        q1 = (words >> 4) & 0xF
        q2 = (words >> 8) & 0xF
        q3 = (words >> 12) & 0xF
        q4 = (words >> 16) & 0xF
        q5 = (words >> 20) & 0xF
        q6 = (words >> 24) & 0xF
        q7 = (words >> 28) & 0xF
        # interleave(a, b) = a0 b0 a1 b1 ...: three levels put value j of word w at 8w + j
        return tl.interleave(tl.interleave(tl.interleave(q0, q4), tl.interleave(q2, q6)),
                             tl.interleave(tl.interleave(q1, q5), tl.interleave(q3, q7)))
    else:
        q0 = words & 0xFF
        q1 = (words >> 8) & 0xFF
        q2 = (words >> 16) & 0xFF
        q3 = (words >> 24) & 0xFF
        return tl.interleave(tl.interleave(q0, q2), tl.interleave(q1, q3))


@triton.jit
def _unpack2(words):
    """(R, W) int32 words of 2-bit values (value j of a word in bits 2j, 2j+1) -> (R, W * 16) int32
    values in k order, as `_unpack` does for 4 and 8 bits (four levels of interleave)."""
    q0 = words & 3
    q1 = (words >> 2) & 3
    q2 = (words >> 4) & 3
    q3 = (words >> 6) & 3
    q4 = (words >> 8) & 3
    q5 = (words >> 10) & 3
    q6 = (words >> 12) & 3
    q7 = (words >> 14) & 3
    q8 = (words >> 16) & 3
    q9 = (words >> 18) & 3
    q10 = (words >> 20) & 3
    q11 = (words >> 22) & 3
    q12 = (words >> 24) & 3
    q13 = (words >> 26) & 3
    q14 = (words >> 28) & 3
    q15 = (words >> 30) & 3
    # order(v_0 .. v_2n) = interleave(order(even v), order(odd v)); at 2 values, interleave itself
    evens = tl.interleave(tl.interleave(tl.interleave(q0, q8), tl.interleave(q4, q12)),
                          tl.interleave(tl.interleave(q2, q10), tl.interleave(q6, q14)))
    odds = tl.interleave(tl.interleave(tl.interleave(q1, q9), tl.interleave(q5, q13)),
                         tl.interleave(tl.interleave(q3, q11), tl.interleave(q7, q15)))
    return tl.interleave(evens, odds)


@triton.jit
def _load_words(ptr, offs_n, mask_n, k0, K, stride_n, PACK: tl.constexpr, BLOCK_K: tl.constexpr):
    """The int32 words holding k0 .. k0 + BLOCK_K of rows offs_n, PACK values a word (0 past K)."""
    offs_w = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    return tl.load(ptr + offs_n[:, None] * stride_n + offs_w[None, :],
                   mask=mask_n[:, None] & (offs_w < K // PACK)[None, :], other=0)


@triton.jit
def _load_tile(qw_ptr, qh_ptr, offs_n, mask_n, k0, K, stride_qn, stride_qhn, BITS: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """Float32 2^23 + q of the (BLOCK_N, BLOCK_K) tile at k0 (0 past K)."""
    if BITS == 6:
        low = _unpack(_load_words(qw_ptr, offs_n, mask_n, k0, K, stride_qn, 8, BLOCK_K), 4)
        high = _unpack2(_load_words(qh_ptr, offs_n, mask_n, k0, K, stride_qhn, 16, BLOCK_K))
        values = low | (high << 4)
    else:
        values = _unpack(_load_words(qw_ptr, offs_n, mask_n, k0, K, stride_qn, 32 // BITS, BLOCK_K), BITS)
    return (values | 0x4B000000).to(tl.float32, bitcast=True)


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
def _unpack_scaled(words, BITS: tl.constexpr):
    """`_unpack` without most shifts: value j of a word comes out as q * 2^(BITS * (j % (PACK / 2))), masked
    in place in the word's low or high half (one logic op per value instead of shift, mask, or)."""
    hi = words >> 16
    if BITS == 4:
        return tl.interleave(tl.interleave(tl.interleave(words & 0xF, hi & 0xF), tl.interleave(words & 0xF00, hi & 0xF00)),
                             tl.interleave(tl.interleave(words & 0xF0, hi & 0xF0),
                                           tl.interleave(words & 0xF000, hi & 0xF000)))
    else:
        return tl.interleave(tl.interleave(words & 0xFF, hi & 0xFF), tl.interleave(words & 0xFF00, hi & 0xFF00))


@triton.jit
def _weight_only_gemv_kernel(
    x_ptr, qw_ptr, qh_ptr, scales_ptr, zeros_ptr, mins_ptr, sscales_ptr, smins_ptr, perm_ptr, bias_ptr, out_ptr,
    partial_ptr, counter_ptr,
    M, N, K, num_groups, k_tiles_per_split, splits,
    stride_xm, stride_qn, stride_qhn, stride_sn, stride_zn, stride_mn, stride_ssn, stride_smn, stride_om,
    zero_magic,                        # 2^23 + the constant zero point (when there are no zeros)
    BITS: tl.constexpr, GROUP: tl.constexpr, SUPER_GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_SUPER_SCALES: tl.constexpr,
    HAS_SUPER_MINS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,               # splits > 1 (a runtime count: one compiled kernel serves every split)
):
    """All M (<= BLOCK_M) rows of x against BLOCK_N weight rows over one K range; grid (N tiles, splits).

    The tile holds 2^23 + q * 2^e (`_unpack_scaled`, e = BITS * (j % (PACK / 2)) for value j of a word,
    at most 12 bits: exact in float32's mantissa); minus 2^23 + z * 2^e it is (q - z) * 2^e exactly, and
    x is multiplied by 2^-e once per tile (shared by all BLOCK_N rows), so the products are (q - z) * x
    exactly as without the scaling (powers of 2)."""
    PACK: tl.constexpr = 32 // BITS
    SCALED: tl.constexpr = BITS != 6               # 6-bit values come whole from two planes: unscaled (e = 0)
    ONE_GROUP: tl.constexpr = BLOCK_K <= GROUP     # a tile lies in one group (else holds BLOCK_K // GROUP)
    TILE_GROUPS: tl.constexpr = 1 if ONE_GROUP else BLOCK_K // GROUP
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)     # transposed: a row's sums stay in its threads
    if SCALED:
        exponent = ((tl.arange(0, BLOCK_K) % PACK) % (PACK // 2)) * BITS
    else:
        exponent = tl.zeros([BLOCK_K], tl.int32)
    up = tl.exp2(exponent.to(tl.float32))                                    # 2^e per column
    down = tl.exp2(-exponent.to(tl.float32))                                 # 2^-e
    const_zero = (zero_magic - 8388608.0) * up + 8388608.0                   # 2^23 + z * 2^e

    k_tiles = tl.cdiv(K, BLOCK_K)
    first_tile = pid_k * k_tiles_per_split
    last_tile = tl.minimum(first_tile + k_tiles_per_split, k_tiles)
    for tile in range(first_tile, last_tile):
        k0 = tile * BLOCK_K
        if SCALED:
            words = _load_words(qw_ptr, offs_n, mask_n, k0, K, stride_qn, PACK, BLOCK_K)
            f = (_unpack_scaled(words, BITS) | 0x4B000000).to(tl.float32, bitcast=True)     # 2^23 + q * 2^e
        else:
            f = _load_tile(qw_ptr, qh_ptr, offs_n, mask_n, k0, K, stride_qn, stride_qhn, BITS, BLOCK_K)  # 2^23 + q
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if HAS_PERM:
            x_cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            x_cols = offs_k
        if ONE_GROUP:
            # k0 < K and K is a multiple of GROUP: the group exists, only the rows need a mask
            scale, zero, low = _group_params(
                scales_ptr, zeros_ptr, mins_ptr, sscales_ptr, smins_ptr, offs_n, k0 // GROUP, k0 // SUPER_GROUP,
                mask_n, stride_sn, stride_zn, stride_mn, stride_ssn, stride_smn,
                zero_magic, HAS_ZEROS, HAS_MINS, HAS_SUPER_SCALES, HAS_SUPER_MINS)
            if HAS_ZEROS:
                d = f - ((zero - 8388608.0)[:, None] * up[None, :] + 8388608.0)    # (q - z) * 2^e
            else:
                d = f - const_zero[None, :]
        else:
            cols = k0 // GROUP + tl.arange(0, TILE_GROUPS)
            scale, zero, low = _group_params(
                scales_ptr, zeros_ptr, mins_ptr, sscales_ptr, smins_ptr, offs_n[:, None],
                cols[None, :], (cols * GROUP // SUPER_GROUP)[None, :], mask_n[:, None] & (cols < num_groups)[None, :],
                stride_sn, stride_zn, stride_mn, stride_ssn, stride_smn, zero_magic,
                HAS_ZEROS, HAS_MINS, HAS_SUPER_SCALES, HAS_SUPER_MINS)
            if HAS_ZEROS:
                up3 = tl.reshape(up, (TILE_GROUPS, GROUP))
                d = tl.reshape(f, (BLOCK_N, TILE_GROUPS, GROUP)) - \
                    ((zero - 8388608.0)[:, :, None] * up3[None, :, :] + 8388608.0)
            else:
                d = tl.reshape(f - const_zero[None, :], (BLOCK_N, TILE_GROUPS, GROUP))
        for row in tl.static_range(BLOCK_M):
            row_k = tl.full((BLOCK_K,), row, tl.int32)                       # rows past M read as 0
            xv = tl.load(x_ptr + row * stride_xm + x_cols, mask=mask_k & (row_k < M), other=0.0).to(tl.float32)
            xs = xv * down
            if ONE_GROUP:
                part = tl.sum(d * xs[None, :], axis=1) * scale                  # (BLOCK_N,)
                if HAS_MINS:
                    part += low * tl.sum(xv, axis=0)
            else:
                sums = tl.sum(d * tl.reshape(xs, (TILE_GROUPS, GROUP))[None, :, :], axis=2) * scale
                if HAS_MINS:
                    sums += low * tl.sum(tl.reshape(xv, (TILE_GROUPS, GROUP)), axis=1)[None, :]
                part = tl.sum(sums, axis=1)                                      # (BLOCK_N,)
            acc += tl.where(offs_m[None, :] == row, part[:, None], 0.0)
    split_k_triton.finish(tl.trans(acc), out_ptr, partial_ptr, counter_ptr, bias_ptr, bias_ptr, bias_ptr,
                          offs_m, offs_n, mask_m, mask_n, M, N, stride_om, pid_n, pid_k, splits, HAS_BIAS, False,
                          SPLIT)


@triton.jit
def _weight_only_gemm_kernel(
    x_ptr, qw_ptr, qh_ptr, scales_ptr, zeros_ptr, mins_ptr, sscales_ptr, smins_ptr, perm_ptr, bias_ptr, out_ptr,
    partial_ptr, counter_ptr,
    M, N, K, num_groups, k_tiles_per_split, splits,
    stride_xm, stride_qn, stride_qhn, stride_sn, stride_zn, stride_mn, stride_ssn, stride_smn, stride_om,
    zero_magic,                        # 2^23 + the constant zero point (when there are no zeros)
    BITS: tl.constexpr, GROUP: tl.constexpr, SUPER_GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_SUPER_SCALES: tl.constexpr,
    HAS_SUPER_MINS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,               # splits > 1 (a runtime count: one compiled kernel serves every split)
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,              # the interpreter: bf16 operands rounded, then a float32 dot
):
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

    k_tiles = tl.cdiv(K, BLOCK_K)
    first_tile = pid_k * k_tiles_per_split
    last_tile = tl.minimum(first_tile + k_tiles_per_split, k_tiles)
    for tile in range(first_tile, last_tile):
        k0 = tile * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        f = _load_tile(qw_ptr, qh_ptr, offs_n, mask_n, k0, K, stride_qn, stride_qhn, BITS, BLOCK_K)  # 2^23 + q
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
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + x_cols[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), tl.trans(w.to(a.dtype).to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, input_precision=DOT_PRECISION)
    split_k_triton.finish(acc, out_ptr, partial_ptr, counter_ptr, bias_ptr, bias_ptr, bias_ptr, offs_m, offs_n,
                          mask_m, mask_n, M, N, stride_om, pid, pid_k, splits, HAS_BIAS, False, SPLIT)


# ---- launch configuration ------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """The device's SMs; 132 (an H100) off CUDA, where the interpreter runs the kernels."""
    if device.type != "cuda":
        return 132
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


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
    """Whether this kernel takes `weight` (else the torch reference must): 4, 6 or 8 bits, K a multiple
    of 8 (whole int32 words per row; 16 for 6 bits, whose top-2-bit plane packs 16 a word) and a
    power-of-2 tile of 16 to 64 values that fits the groups."""
    k = weight.shape[1]
    return (weight.bits in (4, 6, 8) and k % (16 if weight.bits == 6 else 8) == 0
            and _fit_block_k(64, weight.group_size, k) is not None)


def split_for(tiles: int, k_tiles: int, target_programs: int, min_tiles_per_split: int = 4) -> int:
    """The power-of-2 split of K that brings `tiles` output tiles up to `target_programs` programs,
    keeping at least `min_tiles_per_split` K tiles per split."""
    split = 1
    while tiles * split < target_programs and k_tiles // (2 * split) >= min_tiles_per_split:
        split *= 2
    return split


def default_config(m: int, n: int, k: int, bits: int, group: int, sms: int = 132) -> Optional[GemmConfig]:
    """Heuristic launch shape for (M, N, K), or None where no tile fits the group size (not `supported`).

    NOTE: a starting point for H100-class GPUs, not measured: the GEMV (M <= 8) streams 32 rows of 256
    values a step (4 KiB of int4); up to 64 rows use 16/32/64-row tensor-core tiles; both split K
    until there are about 4 (GEMV) or 2 programs per SM, keeping at least 4 K tiles per split.
    Larger M uses 64 or 128-row tiles, 128 columns wide unless that leaves SMs idle."""
    if m <= GEMV_MAX_M:
        block_m = triton.next_power_of_2(m)
        block_n, block_k, warps, stages, waves = 32, 256 if bits == 4 else 128, 4, 3, 4
    elif m <= 64:
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        block_n, block_k, warps, stages, waves = 64, 128, 4, 4, 2
    else:
        block_m = 64 if m <= 128 else 128
        block_n = 128 if triton.cdiv(m, block_m) * triton.cdiv(n, 128) >= sms else 64
        block_k, warps, stages, waves = 64, 4 if block_m == 64 else 8, 3, 0
    fitted = _fit_block_k(block_k, group, k)
    if fitted is None:
        return None
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = split_for(tiles, triton.cdiv(k, fitted), waves * sms)
    return GemmConfig(block_m, block_n, fitted, split, warps, stages)


def shape_key(n: int, k: int, bits: int, group: int) -> str:
    """A tuned table's key for one weight shape and format."""
    return f"N={n},K={k},bits={bits},group={group}"


def config_file(device_name: str, config_dir: Optional[Path] = None) -> Path:
    """Where one GPU model's tuned configs live: {shape_key: {M: GemmConfig fields}}
    (weight_only_configs/<GPU>.json, or under `config_dir`)."""
    return tuned_configs.table_file("weight_only", device_name, directory=config_dir)


def tuned_config(m: int, n: int, k: int, bits: int, group: int, device_name: str,
                 config_dir: Optional[Path] = None) -> Optional[GemmConfig]:
    """The table's config of the smallest tuned M >= m for this shape, or None: no file, shape or M
    that large (the heuristics then decide), or an entry that does not fit (a GEMV narrower than M,
    a tile across groups)."""
    per_m = load_table(config_file(device_name, config_dir)).get(shape_key(n, k, bits, group))
    entry = tuned_configs.at_or_above(per_m, m)
    if entry is None:
        return None
    config = GemmConfig(**entry)
    if (config.gemv and config.block_m < m) or _fit_block_k(config.block_k, group, k) != config.block_k:
        return None
    return config


@functools.lru_cache(maxsize=4096)
def _pick(m: int, n: int, k: int, bits: int, group: int, device: torch.device) -> Optional[GemmConfig]:
    return tuned_config(m, n, k, bits, group, tuned_configs.device_name(device)) or \
        default_config(m, n, k, bits, group, num_sms(device))


def pick_config(m: int, n: int, k: int, weight: Any, device: torch.device) -> Optional[GemmConfig]:
    """The launch shape for (M, N, K): the tuned table's where it has one, else `default_config`'s.
    Cached per shape: a call costs one dictionary lookup."""
    return _pick(m, n, k, weight.bits, weight.group_size, device)


# ---- entry point ---------------------------------------------------------------------------------

def _check(x: torch.Tensor, weight: Any, bias: Optional[torch.Tensor],
           out: Optional[torch.Tensor], m: int) -> None:
    n, k = weight.shape
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    if weight.bits not in (4, 6, 8):
        raise ValueError(f"weight bits must be 4, 6 or 8, got {weight.bits}")
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
    `config` overrides `pick_config` (tests, the tuner)."""
    n, k = weight.shape
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    m = x2.shape[0]
    _check(x2, weight, bias, out, m)
    result = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return result if out is not None else result.view(*x.shape[:-1], n)
    if config is not None:
        if _fit_block_k(config.block_k, weight.group_size, k) != config.block_k:
            raise ValueError(f"config block_k={config.block_k} does not fit group_size {weight.group_size} (K={k})")
        if config.gemv and (config.block_m < m or config.block_m & (config.block_m - 1)):
            raise ValueError(f"config block_m={config.block_m} selects the GEMV, which takes up to block_m rows "
                             f"(a power of 2); got {m} rows")
    config = config or pick_config(m, n, k, weight, x.device)
    if config is None or not supported(weight):
        raise ValueError(f"the Triton GEMM does not take this weight ({weight.bits} bits, group_size "
                         f"{weight.group_size}, K={k}): see `supported`")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    _launch(x2, weight, bias, result, config)
    return result if out is not None else result.view(*x.shape[:-1], n)


def _launch(x: torch.Tensor, weight: Any, bias: Optional[torch.Tensor], out: torch.Tensor,
            config: GemmConfig) -> None:
    m = x.shape[0]
    n, k = weight.shape
    qweight = weight.qweight if weight.qweight.is_contiguous() else weight.qweight.contiguous()
    words = qweight.view(torch.int32)                   # (N, K * bits / 32); see the module docstring
    high = words                                        # unread unless 6 bits: their top-2-bit plane
    if weight.bits == 6:
        high = weight.qweight_high if weight.qweight_high.is_contiguous() else weight.qweight_high.contiguous()
        high = high.view(torch.int32)                   # (N, K / 16)
    scales = _rows(weight.scales)
    optional = [_rows(t) if t is not None else None
                for t in (weight.zeros, weight.mins, weight.super_scales, weight.super_mins)]
    zeros, mins, super_scales, super_mins = (t if t is not None else words for t in optional)
    strides = [t.stride(0) if t is not None else 0 for t in optional]
    k_tiles = triton.cdiv(k, config.block_k)
    per_split, splits = split_k_triton.split_count(k_tiles, config.split_k)
    tiles = triton.cdiv(n, config.block_n) * (1 if config.gemv else triton.cdiv(m, config.block_m))
    if splits > 1:
        partial = split_k_triton.partials(x.device, splits, m, n)
        counters = _tile_counters(x.device, tiles)
    else:
        partial = counters = words                      # unused
    common = dict(BITS=weight.bits, GROUP=weight.group_size, SUPER_GROUP=weight.super_group,
                  HAS_ZEROS=weight.zeros is not None, HAS_MINS=weight.mins is not None,
                  HAS_SUPER_SCALES=weight.super_scales is not None, HAS_SUPER_MINS=weight.super_mins is not None,
                  HAS_PERM=weight.perm is not None, HAS_BIAS=bias is not None,
                  BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT=splits > 1,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    args = (x, words, high, scales, zeros, mins, super_scales, super_mins,
            weight.perm if weight.perm is not None else words, bias if bias is not None else words, out,
            partial, counters, m, n, k, scales.shape[1], per_split, splits,
            x.stride(0), words.stride(0), high.stride(0), scales.stride(0), *strides, out.stride(0),
            _MAGIC + weight.zero)
    if config.gemv:
        _weight_only_gemv_kernel[(triton.cdiv(n, config.block_n), splits)](*args, **common)
    else:
        precision = "ieee" if x.dtype == torch.float32 else "tf32"      # fp16/bf16 dots ignore it
        _weight_only_gemm_kernel[(tiles, splits)](*args, GROUP_M=8, DOT_PRECISION=precision,
                                                  UPCAST=_needs_upcast(x), **common)


def _needs_upcast(x: torch.Tensor) -> bool:
    # NOTE: the Triton interpreter keeps bf16 as raw uint16 bits: it casts them but cannot multiply them
    return x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (the kernel indexes columns directly); a copy only if it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def config_json(config: GemmConfig) -> dict:
    """A config as the tuned table stores it."""
    return asdict(config)
