"""Paged attention on the CPU: the same contract as `attention_ref.paged_attention_ref`, less padding.

The reference pads every sequence of the step to the longest context and the longest query and
makes one masked SDPA call. On the CPU that padding is most of the work: decode contexts in a
batch spread over several hundred tokens, and a fresh prompt padded to the batch's longest prompt
runs masked instead of causal. This path plans the step once (the plan is shared by every layer:
it depends only on the metadata) and then, per layer:

    decode sequences (1 new token)   sorted by context length, cut into groups where padding to the
                                     group's longest costs less than one more SDPA call
                                     -> one masked SDPA per group, no query padding
    prefill sequences (>1 new token) one SDPA each over its own context; `is_causal` when the
                                     whole context is new (no mask), else an explicit offset mask

Shapes as in `attention.py`: query (T, H, D); caches (num_blocks, block_size, Hkv, D). An FP8
cache's context is dequantized after the gather, as in the reference (`attention_ref.context_as`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .attention_ref import context_as, gather_context
from .kv_quant import check_scales, is_fp8
from .metadata import AttentionMetadata

# One more SDPA call costs about as much as this many (sequence x context token) cells of padded
# decode work (measured on a 2-core EPYC: ~0.1 ms per call vs ~0.3 us per cell at H=9, D=64).
GROUP_CALL_COST_CELLS = 384


@dataclass
class _DecodeGroup:
    rows: torch.Tensor                 # (n,) int64: query/output rows of the group's sequences
    tables: torch.Tensor               # (n, ceil(max_len / block_size)) int64
    max_len: int                       # longest context in the group
    valid: Optional[torch.Tensor]      # (n, 1, 1, max_len) bool key mask; None when all are max_len


@dataclass
class _PrefillSeq:
    start: int                         # first query row
    q_len: int
    seq_len: int                       # context, including the q_len new tokens (the last ones)
    blocks: torch.Tensor               # (ceil(seq_len / block_size),) int64
    mask: Optional[torch.Tensor]       # (q_len, seq_len) bool; None = plain causal (seq_len == q_len)


@dataclass
class CpuAttentionPlan:
    decode: list[_DecodeGroup]
    prefill: list[_PrefillSeq]


def plan_for(metadata: AttentionMetadata, block_size: int) -> CpuAttentionPlan:
    """The step's plan, built on first use and kept on the metadata for the other layers."""
    plan = metadata.host_plan
    if not isinstance(plan, CpuAttentionPlan):
        plan = build_plan(metadata, block_size)
        metadata.host_plan = plan
    return plan


def build_plan(metadata: AttentionMetadata, block_size: int) -> CpuAttentionPlan:
    starts = metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens.tolist()
    tables = metadata.block_tables
    decode_rows: list[int] = []
    decode_lens: list[int] = []
    decode_seqs: list[int] = []
    prefill: list[_PrefillSeq] = []
    for i, seq_len in enumerate(seq_lens):
        start, q_len = starts[i], starts[i + 1] - starts[i]
        if q_len <= 0:
            continue
        if q_len == 1:
            decode_rows.append(start)
            decode_lens.append(seq_len)
            decode_seqs.append(i)
            continue
        if q_len > seq_len:
            raise ValueError(f"sequence {i} has {q_len} new tokens but a context of only {seq_len}")
        blocks = tables[i, : -(-seq_len // block_size)].long()
        mask = None
        if seq_len != q_len:
            # query j sits at position seq_len - q_len + j and sees keys at positions <= that
            positions = torch.arange(seq_len - q_len, seq_len)
            mask = torch.arange(seq_len)[None, :] <= positions[:, None]
        prefill.append(_PrefillSeq(start, q_len, seq_len, blocks, mask))
    return CpuAttentionPlan(_group_decodes(decode_rows, decode_lens, decode_seqs, tables, block_size), prefill)


def _group_decodes(rows: list[int], lens: list[int], seqs: list[int], tables: torch.Tensor,
                   block_size: int) -> list[_DecodeGroup]:
    if not rows:
        return []
    order = sorted(range(len(rows)), key=lens.__getitem__)
    sorted_lens = [lens[k] for k in order]
    groups = []
    for lo, hi in _cut_points(sorted_lens):
        members = order[lo:hi]
        max_len = sorted_lens[hi - 1]
        member_lens = torch.tensor([lens[k] for k in members])
        valid = None
        if sorted_lens[lo] != max_len:
            valid = (torch.arange(max_len)[None, :] < member_lens[:, None])[:, None, None, :]
        seq_index = torch.tensor([seqs[k] for k in members])
        groups.append(_DecodeGroup(
            rows=torch.tensor([rows[k] for k in members], dtype=torch.int64),
            tables=tables.index_select(0, seq_index)[:, : -(-max_len // block_size)].long(),
            max_len=max_len,
            valid=valid,
        ))
    return groups


def _cut_points(sorted_lens: list[int]) -> list[tuple[int, int]]:
    """Groups [lo, hi) of the ascending lengths minimising sum(n * group max) + calls * call cost.

    An exact O(n^2) dynamic programme over the sorted lengths (n <= max_num_seqs, once per step).
    """
    n = len(sorted_lens)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for hi in range(1, n + 1):
        longest = sorted_lens[hi - 1]
        for lo in range(hi):
            cost = best[lo] + (hi - lo) * longest + GROUP_CALL_COST_CELLS
            if cost < best[hi]:
                best[hi], cut[hi] = cost, lo
    spans = []
    hi = n
    while hi > 0:
        spans.append((cut[hi], hi))
        hi = cut[hi]
    return spans[::-1]


def paged_attention_cpu(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    key: Optional[torch.Tensor] = None,
    value: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """key, value: optionally the step's new K/V (T, Hkv, D), the values just written to the cache;
    a prefill whose whole context is new then reads them instead of gathering from the cache.
    k_scale / v_scale: (1,) float32, required for (and read only with) an FP8 cache."""
    check_scales(key_cache, k_scale, v_scale)
    if query.dtype != torch.float32:
        # NOTE: the CPU SDPA kernel is several times slower in bf16 than in fp32 (measured 11.7 vs
        # 2.6 ms per decode layer call): attend in fp32, the inputs' values are unchanged.
        return paged_attention_cpu(query.float(), key_cache, value_cache, metadata, scale, key, value,
                                   k_scale, v_scale).to(query.dtype)
    if is_fp8(key_cache):
        # NOTE: the new K/V are not what the FP8 cache holds (it rounded them): a fresh prompt reads
        # the cache like every other sequence, so that a prompt attends to the same values whether
        # it is computed fresh, from a prefix-cache hit or recomputed after a preemption.
        key = value = None
    num_heads, head_dim = query.shape[1], query.shape[2]
    _, block_size, num_kv_heads, _ = key_cache.shape
    gqa = num_heads != num_kv_heads
    plan = plan_for(metadata, block_size)
    out = torch.zeros_like(query)                                          # (T, H, D); padding rows stay 0

    for group in plan.decode:
        n = group.rows.shape[0]
        keys = context_as(gather_context(key_cache, group.tables, group.max_len), query.dtype,
                          k_scale)                                                   # (n, Hkv, L, D)
        values = context_as(gather_context(value_cache, group.tables, group.max_len), query.dtype, v_scale)
        q = query.index_select(0, group.rows)[:, :, None, :]                 # (n, H, 1, D)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=group.valid, scale=scale,
                                                  enable_gqa=gqa)            # (n, H, 1, D)
        out.index_copy_(0, group.rows, attended.view(n, num_heads, head_dim))

    for seq in plan.prefill:
        if seq.mask is None and key is not None and value is not None:      # the whole context is new
            rows = slice(seq.start, seq.start + seq.q_len)
            keys = key[rows].to(query.dtype).transpose(0, 1)[None]             # (1, Hkv, S, D)
            values = value[rows].to(query.dtype).transpose(0, 1)[None]
        else:
            keys = context_as(gather_context(key_cache, seq.blocks[None], seq.seq_len), query.dtype,
                              k_scale)                                               # (1, Hkv, S, D)
            values = context_as(gather_context(value_cache, seq.blocks[None], seq.seq_len), query.dtype, v_scale)
        q = query[seq.start:seq.start + seq.q_len].transpose(0, 1)[None]         # (1, H, q, D)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=seq.mask,
                                                  is_causal=seq.mask is None, scale=scale, enable_gqa=gqa)
        out[seq.start:seq.start + seq.q_len] = attended[0].transpose(0, 1)
    return out
