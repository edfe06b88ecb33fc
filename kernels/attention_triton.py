"""Triton paged attention: one flash-attention kernel for prefill-shaped batches, one flash-decoding
kernel (plus a reduce) for pure decode steps. Same contract as `attention.paged_attention_ref`.

Prefill, chunked prefill, prefix hits and mixed batches (`max_query_len > 1`)
    One program owns one KV head and a tile of BLOCK_M rows, a row being one (query token, query
    head) pair: the tile packs BLOCK_Q = BLOCK_M // GROUP consecutive tokens of one sequence times
    all GROUP query heads that share that KV head, so each K/V tile is loaded once per GQA group.
    The program streams its context through the block table with an online softmax. Tiles that every
    row of the query tile sees completely are processed without the causal mask; only the tiles on
    the diagonal pay for it.

        query tiles of sequence i: first tile id = query_start_loc[i] // BLOCK_Q + i
        grid dim 0 = num_tokens // BLOCK_Q + num_seqs   (an upper bound; spare programs exit)

    Each program finds its sequence by binary search over `query_start_loc`, so the grid depends
    only on shapes and nothing is read back to the host.

Decode (`max_query_len == 1`)
    At small batch, one program per (sequence, KV head) leaves most SMs idle on long contexts, so the
    context is split into NUM_SPLITS partitions (flash-decoding). Each (sequence, KV head, split)
    program writes a partial max, sum and unnormalised output; a second kernel merges the splits.
    Split boundaries are computed in the kernel from each sequence's own `seq_lens`, so any split
    count is correct for any batch: the count is only a performance choice (made from the batch
    size and `max_seq_len`, or fixed by `metadata.num_decode_splits` when a CUDA graph is captured),
    and the grid depends only on it and on shapes.

Numerics: fp16/bf16/fp32 inputs, fp32 accumulation, softmax in base 2 (scale * log2(e) folded in).
fp32 inputs use 3xTF32 dot products (fp32-level accuracy on tensor cores), never plain TF32, so fp32
stays a tight oracle. Running maxima start at a finite -1e30 rather than -inf so that fully masked
rows never produce inf - inf = NaN. Positions at or beyond `seq_lens[i]` are never loaded, so stale
or NaN cache slots cannot leak in, and `block_tables` may have any number of spare columns.
Under the Triton interpreter (CPU tests) bf16 MMA operands are upcast to fp32, because the
interpreter stores bf16 as raw uint16 and cannot do arithmetic on it (`UPCAST`).

Layer features (`attention.py`), constexpr switches (off: the same code as before, a few unread args):
  SLIDING  a prefill tile loads nothing before its first row's window start and runs three ranges: the
           lower band (window mask per row), the middle (no mask), the diagonal (causal + window).
           Decode splits cut only the window, which needs no mask.
  SOFTCAP  the dot's multiplier is scale / cap; tanh(.) * cap * log2(e) gives the base-2 logits.
  SINKS    each row adds exp2(sink * log2(e) - max) to its final denominator (split decode: the reduce).

FP8 caches (`FP8_KV`, a constexpr: 16/32-bit caches compile the same code as before, plus two unread
pointer arguments):
K/V tiles are loaded as e4m3 (half the bytes), converted exactly to the query dtype for the MMAs,
and the per-layer scales are applied outside the loop, never per element: k_scale multiplies the
softmax scale (q . (k * s) = s * (q . k)) and v_scale the accumulated output (a split's partial
output, which the reduce merges linearly). Both are loaded from (1,) tensors in the kernel.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .attention_ref import check_features, check_inputs
from .kv_quant import check_scales, is_fp8
from .metadata import AttentionMetadata

_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)
# Decode splitting: aim for about two waves of programs, never a split shorter than this.
_MIN_SPLIT_TOKENS = 128
_MAX_SPLITS = 32


@triton.jit
def _attend_kv_range(
    acc,                # (BLOCK_M, HEAD_DIM_PAD) fp32 running unnormalised output
    l_i,                # (BLOCK_M,) fp32 running softmax denominator
    m_i,                # (BLOCK_M,) fp32 running max of the base-2 logits
    q,                  # (BLOCK_M, HEAD_DIM_PAD) query rows, MMA operand dtype
    q_pos,              # (BLOCK_M,) int32 context position of each row's query token
    kv_lo,              # first context position of the loop
    kv_hi,              # one past the last context position to attend
    kv_min,             # WINDOW: positions below this are neither loaded nor attended
    key_cache_ptr,      # (num_blocks, block_size, num_kv_heads, head_dim)
    value_cache_ptr,    # (num_blocks, block_size, num_kv_heads, head_dim), same strides as keys
    block_table_ptr,    # (max_blocks_per_seq,) int32: this sequence's row of block_tables
    kv_head,            # KV head index
    qk_scale,           # softmax scale * log2(e); with SOFTCAP, scale / softcap (natural units)
    softcap_log2,       # SOFTCAP: softcap * log2(e)
    window,             # WINDOW: the sliding window (keys > q_pos - window are visible)
    stride_c_block, stride_c_slot, stride_c_head,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,     # tokens per KV cache block
    BLOCK_N: tl.constexpr,        # context tokens per iteration
    BOUNDED: tl.constexpr,        # mask positions >= kv_hi (kv_hi not a multiple of BLOCK_N)
    CAUSAL: tl.constexpr,         # mask positions > q_pos per row
    WINDOW: tl.constexpr,         # mask positions <= q_pos - window per row, and below kv_min
    SOFTCAP: tl.constexpr,        # scores = softcap * tanh(scores / softcap)
    UPCAST: tl.constexpr,         # do MMA in fp32 (Triton interpreter cannot compute in bf16)
    DOT_PRECISION: tl.constexpr,
):
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    for kv_start in range(kv_lo, kv_hi, BLOCK_N):
        k_pos = kv_start + tl.arange(0, BLOCK_N)                                  # (BLOCK_N,)
        if BOUNDED:
            k_valid = k_pos < kv_hi
        else:  # a constant mask that the compiler folds away
            k_valid = tl.full([BLOCK_N], 1, tl.int1)
        if WINDOW:
            k_valid = k_valid & (k_pos >= kv_min)
        block_id = tl.load(block_table_ptr + k_pos // BLOCK_SIZE, mask=k_valid, other=0)
        slot_offs = (block_id.to(tl.int64) * stride_c_block
                     + (k_pos % BLOCK_SIZE) * stride_c_slot + kv_head * stride_c_head)  # (BLOCK_N,)
        kv_mask = k_valid[:, None] & dim_valid[None, :]                           # (BLOCK_N, HEAD_DIM_PAD)
        kv_offs = slot_offs[:, None] + dims[None, :]                              # (BLOCK_N, HEAD_DIM_PAD)
        k = tl.load(key_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(value_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        else:
            k = k.to(q.dtype)
            v = v.to(q.dtype)

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale    # (BLOCK_M, BLOCK_N)
        if SOFTCAP:  # NOTE: tanh(|x|) = (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1], from exp2 (the interpreter
            # has no tanh): never overflows, exact +-1 at the extremes, ~1e-7 absolute near 0
            e = tl.exp2(tl.abs(qk) * (-2.0 * LOG2E))
            qk = tl.where(qk < 0, -softcap_log2, softcap_log2) * ((1.0 - e) / (1.0 + e))
        if CAUSAL:
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
            if WINDOW:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
            qk = tl.where(visible, qk, float("-inf"))
        elif BOUNDED or WINDOW:
            qk = tl.where(k_valid[None, :], qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))                                    # (BLOCK_M,)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])                                          # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:  # round p like the GPU path does before its bf16 MMA
            p = p.to(tl.bfloat16).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _find_sequence(query_start_loc_ptr, tile_id, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles contain `tile_id` (tiles of sequence i start at qsl[i] // BLOCK_Q + i)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs"])
def _prefill_kernel(
    out_ptr,                # (num_tokens, num_heads, head_dim)
    query_ptr,              # (num_tokens, num_heads, head_dim)
    key_cache_ptr,          # (num_blocks, block_size, num_kv_heads, head_dim)
    value_cache_ptr,        # (num_blocks, block_size, num_kv_heads, head_dim)
    block_tables_ptr,       # (num_seqs, max_blocks_per_seq) int32
    seq_lens_ptr,           # (num_seqs,) int32
    query_start_loc_ptr,    # (num_seqs + 1,) int32
    k_scale_ptr,            # (1,) fp32, read only when FP8_KV: real K = stored K * k_scale
    v_scale_ptr,            # (1,) fp32, read only when FP8_KV
    sinks_ptr,              # (num_heads,) fp32, read only when SINKS
    qk_scale,               # softmax scale * log2(e); with SOFTCAP, scale / softcap
    softcap_log2,           # SOFTCAP: softcap * log2(e)
    window,                 # SLIDING: the window in tokens
    num_seqs,
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head,
    stride_bt_seq,
    GROUP: tl.constexpr,          # query heads per KV head
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,   # next power of 2 of HEAD_DIM
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,        # rows per program: BLOCK_Q tokens x GROUP heads (+ padding)
    BLOCK_N: tl.constexpr,
    FP8_KV: tl.constexpr,         # the caches are float8_e4m3fn, scaled by k_scale / v_scale
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr,     # the layer's features
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)

    seq = _find_sequence(query_start_loc_ptr, tile_id, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile_start = (tile_id - (q_start // BLOCK_Q + seq)) * BLOCK_Q   # first token of this tile in the sequence
    if tile_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len                                    # cached tokens before the new ones

    rows = tl.arange(0, BLOCK_M)
    tok = tile_start + rows // GROUP                                 # (BLOCK_M,) token index in the sequence
    head = kv_head * GROUP + rows % GROUP                            # (BLOCK_M,) query head
    row_valid = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    dims = tl.arange(0, HEAD_DIM_PAD)
    io_mask = row_valid[:, None] & (dims < HEAD_DIM)[None, :]        # (BLOCK_M, HEAD_DIM_PAD)
    q_offs = (q_start + tok)[:, None] * stride_q_tok + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(query_ptr + q_offs, mask=io_mask, other=0.0)        # (BLOCK_M, HEAD_DIM_PAD)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = context_len + tok                                        # (BLOCK_M,)
    if FP8_KV:
        qk_scale = qk_scale * tl.load(k_scale_ptr)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    # Context positions [mid_lo, full_end) are visible to every row of the tile: no mask needed there.
    # [full_end, kv_end) is the diagonal band, masked per row; nothing past the tile's last token. With a
    # window, [kv_min, mid_lo) is the lower band (masked per row); nothing before kv_min is read.
    first_pos = context_len + tile_start
    last_tok = tl.minimum(tile_start + BLOCK_Q, q_len) - 1
    kv_end = context_len + last_tok + 1
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    mid_lo, kv_min = 0, 0
    if SLIDING:
        kv_min = tl.maximum(first_pos - window + 1, 0)
        # the first position every row's window holds, rounded up to a tile
        mid_lo = tl.minimum(tl.cdiv(tl.maximum(kv_end - window, 0), BLOCK_N) * BLOCK_N, kv_end)
        acc, l_i, m_i = _attend_kv_range(
            acc, l_i, m_i, q, q_pos, kv_min // BLOCK_N * BLOCK_N, mid_lo, kv_min, key_cache_ptr, value_cache_ptr,
            block_table_ptr, kv_head, qk_scale, softcap_log2, window, stride_c_block, stride_c_slot, stride_c_head,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, True, True, True, SOFTCAP, UPCAST, DOT_PRECISION)
    mid_hi = tl.maximum(full_end, mid_lo)
    acc, l_i, m_i = _attend_kv_range(
        acc, l_i, m_i, q, q_pos, mid_lo, mid_hi, kv_min, key_cache_ptr, value_cache_ptr, block_table_ptr,
        kv_head, qk_scale, softcap_log2, window, stride_c_block, stride_c_slot, stride_c_head,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, False, False, False, SOFTCAP, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _attend_kv_range(
        acc, l_i, m_i, q, q_pos, mid_hi, kv_end, kv_min, key_cache_ptr, value_cache_ptr, block_table_ptr,
        kv_head, qk_scale, softcap_log2, window, stride_c_block, stride_c_slot, stride_c_head,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, True, True, SLIDING, SOFTCAP, UPCAST, DOT_PRECISION)

    if SINKS:  # NOTE: relative to the row's max, unscaled; padding rows (max -1e30) add exp2(-inf) = 0
        l_i += tl.exp2(tl.load(sinks_ptr + head, mask=row_valid, other=float("-inf")) * LOG2E - m_i)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)                             # padding rows: avoid 0 / 0
    if FP8_KV:
        acc = acc * tl.load(v_scale_ptr)
    out = acc / l_i[:, None]
    o_offs = (q_start + tok)[:, None] * stride_o_tok + head[:, None] * stride_o_head + dims[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _decode_kernel(
    out_ptr,                # (num_tokens, num_heads, head_dim): written only when NUM_SPLITS == 1
    partial_out_ptr,        # (num_seqs, num_heads, NUM_SPLITS, HEAD_DIM_PAD) fp32, unnormalised
    partial_max_ptr,        # (num_seqs, num_heads, NUM_SPLITS) fp32, base-2 logits
    partial_sum_ptr,        # (num_seqs, num_heads, NUM_SPLITS) fp32
    query_ptr,              # (num_tokens, num_heads, head_dim)
    key_cache_ptr,          # (num_blocks, block_size, num_kv_heads, head_dim)
    value_cache_ptr,        # (num_blocks, block_size, num_kv_heads, head_dim)
    block_tables_ptr,       # (num_seqs, max_blocks_per_seq) int32
    seq_lens_ptr,           # (num_seqs,) int32
    query_start_loc_ptr,    # (num_seqs + 1,) int32
    k_scale_ptr,            # (1,) fp32, read only when FP8_KV
    v_scale_ptr,            # (1,) fp32, read only when FP8_KV
    sinks_ptr,              # (num_heads,) fp32, read here only when SINKS and NUM_SPLITS == 1
    qk_scale, softcap_log2, window,                                   # as in _prefill_kernel
    num_heads,
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head,
    stride_bt_seq,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,        # GROUP padded to a power of 2 >= 16 (MMA minimum)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    FP8_KV: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr,     # the layer's features
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:           # a sequence with no new token
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    # the token at seq_len - 1 sees [kv_first, seq_len) whole: the splits cut only that range
    kv_first = 0
    if SLIDING:
        kv_first = tl.maximum(seq_len - window, 0)
    split_len = tl.cdiv(tl.cdiv(seq_len - kv_first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_lo = kv_first + split * split_len
    kv_hi = tl.minimum(kv_lo + split_len, seq_len)                   # kv_lo >= kv_hi: an empty split

    rows = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + rows                                    # (BLOCK_H,)
    row_valid = rows < GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    io_mask = row_valid[:, None] & (dims < HEAD_DIM)[None, :]        # (BLOCK_H, HEAD_DIM_PAD)
    q_offs = q_start * stride_q_tok + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(query_ptr + q_offs, mask=io_mask, other=0.0)        # (BLOCK_H, HEAD_DIM_PAD)
    if UPCAST:
        q = q.to(tl.float32)
    if FP8_KV:
        qk_scale = qk_scale * tl.load(k_scale_ptr)

    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM_PAD], tl.float32)
    acc, l_i, m_i = _attend_kv_range(
        acc, l_i, m_i, q, rows, kv_lo, kv_hi, kv_first, key_cache_ptr, value_cache_ptr,
        block_tables_ptr + seq.to(tl.int64) * stride_bt_seq,
        kv_head, qk_scale, softcap_log2, window, stride_c_block, stride_c_slot, stride_c_head,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, True, False, False, SOFTCAP, UPCAST, DOT_PRECISION)
    if FP8_KV:
        acc = acc * tl.load(v_scale_ptr)                             # a split's partial output too

    if NUM_SPLITS == 1:
        if SINKS:
            l_i += tl.exp2(tl.load(sinks_ptr + head, mask=row_valid, other=float("-inf")) * LOG2E - m_i)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_offs = q_start * stride_o_tok + head[:, None] * stride_o_head + dims[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        part = (seq * num_heads + head) * NUM_SPLITS + split         # (BLOCK_H,)
        tl.store(partial_max_ptr + part, m_i, mask=row_valid)
        tl.store(partial_sum_ptr + part, l_i, mask=row_valid)
        tl.store(partial_out_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :], acc,
                 mask=row_valid[:, None])


@triton.jit
def _decode_reduce_kernel(
    out_ptr,                # (num_tokens, num_heads, head_dim)
    partial_out_ptr,        # (num_seqs, num_heads, NUM_SPLITS, HEAD_DIM_PAD) fp32
    partial_max_ptr,        # (num_seqs, num_heads, NUM_SPLITS) fp32
    partial_sum_ptr,        # (num_seqs, num_heads, NUM_SPLITS) fp32
    query_start_loc_ptr,    # (num_seqs + 1,) int32
    sinks_ptr,              # (num_heads,) fp32, read only when SINKS
    num_heads,
    stride_o_tok, stride_o_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,     # next power of 2 of NUM_SPLITS
    SINKS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:
        return
    splits = tl.arange(0, SPLITS_PAD)
    split_valid = splits < NUM_SPLITS
    part = (seq * num_heads + head) * NUM_SPLITS + splits            # (SPLITS_PAD,)
    # Empty splits hold max -1e30 and sum 0, so their weight below underflows to exactly 0.
    m_s = tl.load(partial_max_ptr + part, mask=split_valid, other=-1.0e30)
    l_s = tl.load(partial_sum_ptr + part, mask=split_valid, other=0.0)
    dims = tl.arange(0, HEAD_DIM_PAD)
    acc_s = tl.load(partial_out_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :],
                    mask=split_valid[:, None], other=0.0)            # (SPLITS_PAD, HEAD_DIM_PAD)
    m_max = tl.max(m_s, 0)
    weight = tl.exp2(m_s - m_max)                                    # (SPLITS_PAD,)
    total = tl.sum(weight * l_s, 0)
    if SINKS:                                                        # once, into the merged denominator
        total += tl.exp2(tl.load(sinks_ptr + head) * LOG2E - m_max)
    out = tl.sum(weight[:, None] * acc_s, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + q_start * stride_o_tok + head * stride_o_head + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def _feature_args(scale: float, sliding_window: Optional[int], logit_softcap: Optional[float]) -> tuple:
    """(qk_scale, softcap_log2, window): scale * log2(e), or scale / softcap (natural units) with a cap."""
    if logit_softcap is None:
        return scale * _LOG2E, 0.0, sliding_window or 0
    return scale / logit_softcap, logit_softcap * _LOG2E, sliding_window or 0


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    *, sliding_window: Optional[int] = None, logit_softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention of the new tokens against their paged context; returns (num_tokens, num_heads, head_dim).

    Output rows not covered by `metadata.query_start_loc` (graph padding) are left unwritten.
    k_scale / v_scale: (1,) float32, required for (and read only with) FP8 caches.
    sliding_window, logit_softcap, sinks: the layer's features (`attention.paged_attention`).
    """
    check_inputs(query, key_cache, value_cache, metadata, scale)
    check_scales(key_cache, k_scale, v_scale)
    check_features(query, sliding_window, logit_softcap, sinks)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if query.shape[0] == 0 or metadata.num_seqs == 0:
        return out
    attend = decode_attention if metadata.max_query_len == 1 else prefill_attention
    attend(query, key_cache, value_cache, metadata, scale, out=out, k_scale=k_scale, v_scale=v_scale,
           sliding_window=sliding_window, logit_softcap=logit_softcap, sinks=sinks)
    return out


def prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    *, sliding_window: Optional[int] = None, logit_softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
) -> None:
    """Flash-attention path; correct for any batch (decode tokens included). Inputs pre-checked."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    head_dim_pad = triton.next_power_of_2(head_dim)
    block_m, block_n, num_warps = _prefill_config(group, metadata.max_query_len, head_dim_pad, query.dtype)
    block_q = block_m // group
    grid = (num_tokens // block_q + metadata.num_seqs, num_kv_heads)
    fp8 = is_fp8(key_cache)
    _prefill_kernel[grid](
        out, query, key_cache, value_cache,
        metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
        k_scale if fp8 else out, v_scale if fp8 else out,                    # unread unless FP8
        out if sinks is None else sinks,                                     # unread unless SINKS
        *_feature_args(scale, sliding_window, logit_softcap), metadata.num_seqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        metadata.block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, FP8_KV=fp8,
        SLIDING=sliding_window is not None, SOFTCAP=logit_softcap is not None, SINKS=sinks is not None,
        UPCAST=_needs_upcast(query), DOT_PRECISION=_dot_precision(query),
        num_warps=num_warps, num_stages=2,
    )


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    num_splits: int | None = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    *, sliding_window: Optional[int] = None, logit_softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None, launch: Optional[DecodeLaunch] = None,
) -> None:
    """Flash-decoding path for batches with at most one new token per sequence. Inputs pre-checked.

    `num_splits` (default: `metadata.num_decode_splits`, fixed by CUDA-graph capture, else
    `num_decode_splits` from the batch size and `max_seq_len`) only changes speed, never the result.
    A windowed layer splits only its window: the default count is then capped for the window's
    length (a shape-only choice, so a captured graph's grid stays fixed). `launch` overrides the
    tile width, warps and pipeline stages (bench/sweep_decode.py; None = `decode_launch`'s choice).
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = metadata.num_seqs
    chosen = num_splits is None
    if num_splits is None:
        num_splits = metadata.num_decode_splits
    context = metadata.max_seq_len if sliding_window is None else min(metadata.max_seq_len, sliding_window)
    if num_splits is None:
        num_splits = num_decode_splits(num_seqs, num_kv_heads, context, query.device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits (metadata.num_decode_splits) must be an int >= 1, got {num_splits!r}")
    if chosen and sliding_window is not None:
        num_splits = min(num_splits, _splits_for_length(sliding_window))
    group = num_heads // num_kv_heads
    head_dim_pad = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        partial_out = torch.empty(num_seqs, num_heads, num_splits, head_dim_pad,
                                  dtype=torch.float32, device=query.device)
        partial_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty_like(partial_max)
    else:  # the kernel writes `out` directly; the partial pointers are never touched
        partial_out = partial_max = partial_sum = out
    fp8 = is_fp8(key_cache)
    launch = launch or decode_launch(head_dim_pad, query.dtype)
    sinks_arg = out if sinks is None else sinks                              # unread unless SINKS
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, partial_out, partial_max, partial_sum,
        query, key_cache, value_cache,
        metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
        k_scale if fp8 else out, v_scale if fp8 else out,                    # unread unless FP8
        sinks_arg, *_feature_args(scale, sliding_window, logit_softcap), num_heads,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        metadata.block_tables.stride(0),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        BLOCK_N=launch.block_n, NUM_SPLITS=num_splits, FP8_KV=fp8,
        SLIDING=sliding_window is not None, SOFTCAP=logit_softcap is not None, SINKS=sinks is not None,
        UPCAST=_needs_upcast(query), DOT_PRECISION=_dot_precision(query),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, partial_out, partial_max, partial_sum, metadata.query_start_loc, sinks_arg,
            num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), SINKS=sinks is not None,
            num_warps=4,
        )


def num_decode_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Context partitions per sequence: enough programs for ~2 waves, none shorter than 128 tokens.

    A power of 2 (bounded set of compiled variants), 1 once the batch alone fills the GPU.
    """
    programs = max(1, num_seqs * num_kv_heads)
    wanted = triton.cdiv(2 * _num_sms(device), programs)
    limit = min(wanted, _splits_for_length(max_seq_len))
    return 1 << (limit.bit_length() - 1)                             # largest power of 2 <= limit


def _splits_for_length(context: int) -> int:
    """The most splits worth making of `context` tokens (none shorter than _MIN_SPLIT_TOKENS), a power of 2."""
    limit = min(max(1, triton.cdiv(context, _MIN_SPLIT_TOKENS)), _MAX_SPLITS)
    return 1 << (limit.bit_length() - 1)


def _prefill_config(group: int, max_query_len: int, head_dim_pad: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps), sized so the sm_80/sm_90 builds do not spill (checked with ptxas):
    128x64 tiles for 16-bit inputs up to head_dim 128, smaller for larger heads and for fp32 (exact
    fp32 dots take 3 tf32 MMAs each); short queries shrink BLOCK_M so a batch
    of decode tokens does not pad every tile to 128 rows."""
    if dtype != torch.float32:
        large, block_n = (128, 64) if head_dim_pad <= 128 else (64, 32)
    else:
        large, block_n = (32, 32) if head_dim_pad <= 128 else (16, 16)
    block_m = min(large, max(16, triton.next_power_of_2(group * max(1, max_query_len))))
    block_m = max(block_m, triton.next_power_of_2(group))           # at least one token's heads per tile
    num_warps = 8 if block_m >= 128 else 4
    return block_m, block_n, num_warps


class DecodeLaunch(NamedTuple):
    block_n: int          # context tokens per iteration
    num_warps: int
    num_stages: int       # software-pipeline depth of the K/V loads


def decode_launch(head_dim_pad: int, dtype: torch.dtype) -> DecodeLaunch:
    """The decode kernel's launch for queries of `dtype`: 64-token tiles for 16-bit queries (bf16,
    fp16 or FP8 caches alike), narrower fp32 ones (twice the bytes); 3 stages measured 8% faster
    than 2 at batch 256 x 1k context on an H200 (bench/sweep_decode.py, bf16 cache)."""
    if dtype == torch.float32:
        return DecodeLaunch(32 if head_dim_pad <= 128 else 16, num_warps=8, num_stages=3)
    return DecodeLaunch(64, num_warps=4, num_stages=3)


@functools.lru_cache(maxsize=None)
def _num_sms_of(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index).multi_processor_count
    return 128                                                        # interpreter: any plausible GPU


def _num_sms(device: torch.device) -> int:
    device = torch.device(device)
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else None)
    return _num_sms_of(device.type, index)


def _needs_upcast(query: torch.Tensor) -> bool:
    # The Triton interpreter keeps bf16 as raw uint16 and only supports casting it, not arithmetic.
    return query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _dot_precision(query: torch.Tensor) -> str:
    return "tf32x3" if query.dtype == torch.float32 else "tf32"       # tf32 is ignored for 16-bit inputs
