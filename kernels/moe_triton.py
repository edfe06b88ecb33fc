"""Triton fused mixture-of-experts: the contract, shapes and rounding points of `moe.fused_moe_ref`.

Four launches, none of which waits on the host (the decode step runs inside a CUDA graph):
  1. `_align_kernel` (one program): groups the T*K (token, k) pairs by local expert and pads each
     expert's run to BLOCK_M rows (`moe.MoeAlignment`): a histogram of the experts, their padded
     offsets (a cumsum), then each pair takes the next free row of its expert with an atomic add.
     Sized for the worst case, so its outputs have fixed sizes for a given T.
  2. `_gate_up_kernel`: a grouped GEMM over the padded rows; each program owns BLOCK_M rows of one
     expert and BLOCK_N intermediate columns, accumulates the gate tile and the matching up tile
     (rows n and N + n of w13) and writes act(gate, up) in the model dtype: (T*K, N).
  3. `_down_kernel`: the same over w2, times each pair's routing weight: (T*K, H) in the model dtype.
  4. `_sum_kernel`: out[t] = the sum over k of the rows of its pairs, in float32 (pairs whose expert
     lives on another rank are skipped: their rows were never written).

Blocks past the last expert's run (block_expert == -1) exit at once; the grids are sized for the worst
case. Padding rows read row 0 of their input (always valid memory) and are never stored, so the
main loops need no row masks.

Block sizes: `get_config(E, N, H, M)` with M = T*K, from a tuned JSON file per shape and GPU under
moe_configs/ (written by bench/tune_moe.py) when one exists, else `default_config`'s heuristics.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Optional

import torch
import triton
import triton.language as tl

from . import tuned_configs
from .moe_layout import SWIGLU_ALPHA, SWIGLU_LIMIT, MoeAlignment, max_aligned_rows
from .tuned_configs import device_name  # one GPU naming for every tuned table

CONFIG_DIR = tuned_configs.config_dir("moe")
_ACTIVATION_CODES = {"silu": 0, "swigluoai": 1}


@dataclasses.dataclass(frozen=True)
class GemmTile:
    """One grouped GEMM's launch shape (BLOCK_M is shared by both GEMMs: it is the alignment's)."""
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    block_m: int
    gate_up: GemmTile
    down: GemmTile

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "MoeConfig":
        return cls(int(data["block_m"]), GemmTile(**data["gate_up"]), GemmTile(**data["down"]))


# ---- configs -------------------------------------------------------------------------------------------

def default_config(num_experts: int, n: int, hidden_size: int, num_pairs: int, num_sms: int = 132) -> MoeConfig:
    """Heuristic launch shapes, keyed by the average rows per expert under uniform routing.

    NOTE: a starting point for H100-class GPUs, not measured values. Decode (a few rows per expert) is
    weight-bandwidth bound: 16-row tiles (the smallest tensor-core tile), long K steps, and narrower
    columns when the experts hit would leave SMs idle. Prefill uses 64- or 128-row tiles; the gate-up
    tile is half as wide as the down tile because it keeps two accumulators (gate and up)."""
    rows_per_expert = num_pairs / max(1, num_experts)
    if rows_per_expert <= 16:
        experts_hit = min(num_experts, num_pairs)
        block_n = 64 if experts_hit * triton.cdiv(n, 64) >= 2 * num_sms else 32
        return MoeConfig(16, GemmTile(block_n, 128, 1, 4, 4), GemmTile(64, 128, 1, 4, 4))
    if rows_per_expert <= 64:
        return MoeConfig(32, GemmTile(64, 64, 4, 4, 4), GemmTile(64, 64, 4, 4, 4))
    if rows_per_expert <= 256:
        return MoeConfig(64, GemmTile(64, 64, 8, 4, 4), GemmTile(128, 64, 8, 4, 4))
    return MoeConfig(128, GemmTile(64, 64, 8, 8, 3), GemmTile(128, 64, 8, 8, 3))


def config_file(num_experts: int, n: int, hidden_size: int, device_name: str,
                config_dir: Optional[Path] = None) -> Path:
    """Where the tuned configs of one shape on one GPU model live: a JSON object {M: MoeConfig}
    (moe_configs/E=..,N=..,H=..,device=<GPU>.json, or under `config_dir`)."""
    return tuned_configs.table_file("moe", device_name, f"E={num_experts},N={n},H={hidden_size}", config_dir)


@functools.lru_cache(maxsize=4096)
def get_config(num_experts: int, n: int, hidden_size: int, num_pairs: int, device: torch.device,
               config_dir: Optional[Path] = None) -> MoeConfig:
    """The tuned config of the smallest tuned M >= num_pairs (the largest one past the table's end),
    else `default_config`. Cached: the per-call cost is one dictionary lookup."""
    table = tuned_configs.read_table(config_file(num_experts, n, hidden_size, device_name(device), config_dir))
    if table:
        return MoeConfig.from_json(tuned_configs.at_or_above(table, num_pairs) or tuned_configs.largest(table))
    return default_config(num_experts, n, hidden_size, num_pairs, num_sms(device))


@functools.lru_cache(maxsize=None)
def _num_sms_of(device_type: str, index: Optional[int]) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index).multi_processor_count
    return 132                                                        # interpreter: any plausible GPU


def num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else None)
    return _num_sms_of(device.type, index)


# ---- kernels -------------------------------------------------------------------------------------------

@triton.jit
def _local_key(ids_ptr, map_ptr, offs, num_pairs, num_experts, HAS_MAP: tl.constexpr):
    """Each pair's local expert, or num_experts for a pair on another rank or past the end."""
    in_range = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=in_range, other=0)
    if HAS_MAP:
        local = tl.load(map_ptr + ids, mask=in_range, other=-1).to(tl.int32)
    else:
        local = ids.to(tl.int32)
    return tl.where(in_range & (local >= 0), local, num_experts)


@triton.jit
def _align_kernel(
    ids_ptr,             # (T * K,) expert ids
    map_ptr,             # (E_global,) global -> local or -1 (HAS_MAP)
    sorted_ids_ptr,      # (num_blocks * BLOCK_M,) int32 out
    block_expert_ptr,    # (num_blocks,) int32 out
    cursor_ptr,          # (E_PAD,) int32 scratch: each expert's next free row
    num_pairs, num_experts, num_blocks,
    BLOCK_M: tl.constexpr, HAS_MAP: tl.constexpr, E_PAD: tl.constexpr,
    CHUNK: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr,
):
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), tl.int32)
    for start in range(0, num_pairs, CHUNK):
        key = _local_key(ids_ptr, map_ptr, start + tl.arange(0, CHUNK), num_pairs, num_experts, HAS_MAP)
        counts += tl.histogram(key, E_PAD)           # bin num_experts (< E_PAD) collects the left-outs
    real = experts < num_experts
    padded = tl.where(real, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    ends = tl.cumsum(padded, 0)
    # NOTE: an atomic exchange, not a store: the atomics below read these words at L2
    tl.atomic_xchg(cursor_ptr + experts, ends - padded)
    ends = tl.where(real, ends, 2147483647)
    for b0 in range(0, num_blocks, BLOCKS_PER_STEP):
        blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
        in_range = blocks < num_blocks
        # block b belongs to the expert whose run covers row b * BLOCK_M: the number of runs ending at
        # or before that row (empty experts end where they start, so they are skipped)
        before = tl.sum((ends[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, tl.where(before < num_experts, before, -1), mask=in_range)
        rows = blocks[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        tl.store(sorted_ids_ptr + rows, tl.full(rows.shape, 0, tl.int32) + num_pairs, mask=in_range[:, None])
    tl.debug_barrier()                               # the padding fill lands before the pairs overwrite it
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        key = _local_key(ids_ptr, map_ptr, offs, num_pairs, num_experts, HAS_MAP)
        mine = key < num_experts
        row = tl.atomic_add(cursor_ptr + key, 1, mask=mine)
        tl.store(sorted_ids_ptr + row, offs, mask=mine)


@triton.jit
def _tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of program `pid`: GROUP_M row blocks share each column band, so
    programs that run together read the same weight tiles (L2 reuse when an expert spans blocks)."""
    per_band = GROUP_M * num_pid_n
    first_m = (pid // per_band) * GROUP_M
    band_rows = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % per_band) % band_rows, (pid % per_band) // band_rows


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _tile_prologue(sorted_ids_ptr, block_expert_ptr, num_pairs, num_blocks, num_cols,
                   PAIRS_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """What both expert GEMMs open with, for this program's tile (a block of BLOCK_M sorted pairs x
    BLOCK_N of the `num_cols` output columns): its expert (< 0: a padding block or another rank's
    experts, which the caller skips), the (token, expert) pairs of its rows and their mask, the input
    row each reads (pair // PAIRS_PER_ROW: the token for gate-up, the pair itself for down; 0 where
    masked), the output columns and their mask, the columns to load (column 0 repeats where masked,
    so the loads need no mask) and the offsets along the reduced dimension."""
    pid_m, pid_n = _tile(tl.program_id(0), num_blocks, tl.cdiv(num_cols, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    # NOTE: a block the caller skips has loaded its pair ids too (in bounds: sorted_ids has BLOCK_M rows
    # per block): a helper cannot end its caller, and one small load costs less than a second helper
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    mask_m = pair < num_pairs
    row = tl.where(mask_m, pair // PAIRS_PER_ROW, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_cols
    cols = tl.where(mask_n, offs_n, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    return expert, pair, mask_m, row, offs_n, mask_n, cols, offs_k


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    num_pairs, num_blocks, N, H,
    stride_xm, stride_we, stride_wn, stride_wk, stride_be, stride_om,
    TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    expert, pair, mask_m, token, offs_n, mask_n, cols, offs_k = _tile_prologue(
        sorted_ids_ptr, block_expert_ptr, num_pairs, num_blocks, N, TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    if expert < 0:
        return
    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]
    g_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk   # (K, N)
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            wg = tl.load(g_ptrs)
            wu = tl.load(u_ptrs)
        else:
            mask_k = offs_k < H - k0
            a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
            wg = tl.load(g_ptrs, mask=mask_k[:, None], other=0.0)
            wu = tl.load(u_ptrs, mask=mask_k[:, None], other=0.0)
        acc_g = _dot(a, wg, acc_g, DOT_PRECISION, UPCAST)
        acc_u = _dot(a, wu, acc_u, DOT_PRECISION, UPCAST)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias = bias_ptr + expert * stride_be + cols
        acc_g += tl.load(bias).to(tl.float32)[None, :]
        acc_u += tl.load(bias + N).to(tl.float32)[None, :]
    if ACTIVATION == 0:                                             # silu(gate) * up
        h = acc_g * tl.sigmoid(acc_g) * acc_u
    else:                                                           # gpt-oss: clamped SwiGLU, (up + 1)
        gate = tl.minimum(acc_g, LIMIT)
        up = tl.minimum(tl.maximum(acc_u, -LIMIT), LIMIT)
        h = (up + 1.0) * (gate * tl.sigmoid(gate * ALPHA))
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _down_kernel(
    a_ptr, w_ptr, bias_ptr, weights_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    num_pairs, num_blocks, H, N,                                    # H output columns, N reduced
    stride_am, stride_we, stride_wn, stride_wk, stride_be, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    expert, pair, mask_m, row, offs_n, mask_n, cols, offs_k = _tile_prologue(
        sorted_ids_ptr, block_expert_ptr, num_pairs, num_blocks, H, 1, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    if expert < 0:
        return
    a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, N, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            mask_k = offs_k < N - k0
            a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0)
        acc = _dot(a, w, acc, DOT_PRECISION, UPCAST)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + cols).to(tl.float32)[None, :]
    acc = acc * tl.load(weights_ptr + row).to(tl.float32)[:, None]
    out_ptrs = out_ptr + row[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _sum_kernel(
    y_ptr, ids_ptr, map_ptr, out_ptr, H, stride_ym, stride_om,
    TOP_K: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for k in tl.static_range(TOP_K):
        pair = token * TOP_K + k
        keep = mask
        if HAS_MAP:
            local = tl.load(map_ptr + tl.load(ids_ptr + pair))
            keep = mask & ((tl.zeros((BLOCK_H,), tl.int32) + local) >= 0)
        acc += tl.load(y_ptr + pair * stride_ym + offs, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---- launches ------------------------------------------------------------------------------------------

def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int,
              expert_map: Optional[torch.Tensor] = None) -> MoeAlignment:
    """`moe.moe_align` in one launch. Within an expert the pairs come in atomic order (the GEMMs'
    rows are independent, so the results do not depend on it)."""
    if block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of 2 for the Triton alignment, got {block_m}")
    ids = topk_ids.reshape(-1)
    ids = ids if ids.is_contiguous() else ids.contiguous()
    num_pairs = ids.numel()
    num_rows = max_aligned_rows(num_pairs, num_experts, block_m)
    num_blocks = num_rows // block_m
    sorted_ids = torch.empty(num_rows, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=ids.device)
    if num_pairs:
        e_pad = triton.next_power_of_2(num_experts + 1)
        cursor = torch.empty(e_pad, dtype=torch.int32, device=ids.device)
        _align_kernel[(1,)](
            ids, expert_map if expert_map is not None else ids, sorted_ids, block_expert, cursor,
            num_pairs, num_experts, num_blocks,
            BLOCK_M=block_m, HAS_MAP=expert_map is not None, E_PAD=e_pad,
            CHUNK=min(1024, max(16, triton.next_power_of_2(num_pairs))),
            BLOCKS_PER_STEP=max(1, min(4096 // e_pad, 2048 // block_m)), num_warps=8 if num_pairs > 1024 else 4)
    return MoeAlignment(sorted_ids, block_expert, block_m, num_pairs)


def _fit(block: int, size: int) -> int:
    """A tile no wider than the dimension needs (a power of 2, >= 16 for tensor-core dots)."""
    return max(16, min(block, triton.next_power_of_2(size)))


def _dot_args(x: torch.Tensor) -> dict:
    # NOTE: the Triton interpreter keeps bf16 as raw uint16 bits: it casts them but cannot multiply them
    upcast = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    return {"DOT_PRECISION": "tf32x3" if x.dtype == torch.float32 else "tf32", "UPCAST": upcast}


def gate_up(hidden: torch.Tensor, w13: torch.Tensor, w13_bias: Optional[torch.Tensor], align: MoeAlignment,
            top_k: int, activation: str, tile: GemmTile, out: torch.Tensor) -> None:
    """out (T*K, N) <- act(gate, up) of each pair's token through its expert (launch 2)."""
    n, hidden_size = w13.shape[1] // 2, w13.shape[2]
    block_n, block_k = _fit(tile.block_n, n), _fit(tile.block_k, hidden_size)
    grid = (align.num_blocks * triton.cdiv(n, block_n),)
    _gate_up_kernel[grid](
        hidden, w13, w13_bias if w13_bias is not None else w13, out, align.sorted_ids, align.block_expert,
        align.num_pairs, align.num_blocks, n, hidden_size,
        hidden.stride(0), w13.stride(0), w13.stride(1), w13.stride(2),
        w13_bias.stride(0) if w13_bias is not None else 0, out.stride(0),
        TOP_K=top_k, ACTIVATION=_ACTIVATION_CODES[activation], ALPHA=SWIGLU_ALPHA, LIMIT=SWIGLU_LIMIT,
        HAS_BIAS=w13_bias is not None, BLOCK_M=align.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=tile.group_m, EVEN_K=hidden_size % block_k == 0, **_dot_args(hidden),
        num_warps=tile.num_warps, num_stages=tile.num_stages)


def down(inter: torch.Tensor, w2: torch.Tensor, w2_bias: Optional[torch.Tensor], weights: torch.Tensor,
         align: MoeAlignment, tile: GemmTile, out: torch.Tensor) -> None:
    """out (T*K, H) <- weight * (w2 @ inter + bias) per pair (launch 3); `weights` (T*K,) float32."""
    hidden_size, n = w2.shape[1], w2.shape[2]
    block_n, block_k = _fit(tile.block_n, hidden_size), _fit(tile.block_k, n)
    grid = (align.num_blocks * triton.cdiv(hidden_size, block_n),)
    _down_kernel[grid](
        inter, w2, w2_bias if w2_bias is not None else w2, weights, out, align.sorted_ids, align.block_expert,
        align.num_pairs, align.num_blocks, hidden_size, n,
        inter.stride(0), w2.stride(0), w2.stride(1), w2.stride(2),
        w2_bias.stride(0) if w2_bias is not None else 0, out.stride(0),
        HAS_BIAS=w2_bias is not None, BLOCK_M=align.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=tile.group_m, EVEN_K=n % block_k == 0, **_dot_args(inter),
        num_warps=tile.num_warps, num_stages=tile.num_stages)


def moe_sum(y: torch.Tensor, topk_ids: torch.Tensor, expert_map: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """out (T, H) <- the sum over k of y's (T*K, H) rows, skipping pairs on other ranks (launch 4)."""
    num_tokens, top_k = topk_ids.shape
    hidden_size = out.shape[1]
    block_h = min(1024, triton.next_power_of_2(hidden_size))
    _sum_kernel[(num_tokens, triton.cdiv(hidden_size, block_h))](
        y, topk_ids, expert_map if expert_map is not None else topk_ids, out, hidden_size, y.stride(0),
        out.stride(0), TOP_K=top_k, HAS_MAP=expert_map is not None, BLOCK_H=block_h,
        num_warps=4 if block_h >= 512 else 1)


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu", w13_bias: Optional[torch.Tensor] = None,
              w2_bias: Optional[torch.Tensor] = None, expert_map: Optional[torch.Tensor] = None,
              out: Optional[torch.Tensor] = None, config: Optional[MoeConfig] = None) -> torch.Tensor:
    """`moe.fused_moe` on the GPU (inputs as checked by `moe.check_inputs`); `config` overrides
    `get_config` (tests, tuning)."""
    num_tokens, hidden_size = hidden.shape
    num_experts, n = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if out is not None and out.stride(-1) != 1:
        raise ValueError(f"out must have unit column stride, got strides {out.stride()}")
    result = out if out is not None else torch.empty_like(hidden, memory_format=torch.contiguous_format)
    if num_pairs == 0:
        return result.zero_()
    hidden = _unit_stride(hidden)
    w13_bias, w2_bias = (_unit_stride(b) if b is not None else None for b in (w13_bias, w2_bias))
    topk_ids = topk_ids.contiguous()
    weights = topk_weights.to(torch.float32).reshape(-1).contiguous()
    config = config or get_config(num_experts, n, hidden_size, num_pairs, hidden.device)
    align = moe_align(topk_ids, num_experts, config.block_m, expert_map)
    inter = torch.empty(num_pairs, n, dtype=hidden.dtype, device=hidden.device)
    gate_up(hidden, w13, w13_bias, align, top_k, activation, config.gate_up, inter)
    y = torch.empty(num_pairs, hidden_size, dtype=hidden.dtype, device=hidden.device)
    down(inter, w2, w2_bias, weights, align, config.down, y)
    moe_sum(y, topk_ids, expert_map, result)
    return result


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (the kernels index columns directly); a copy only if it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()
