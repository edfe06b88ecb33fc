"""Paged attention on the CPU: the same contract as `attention_ref.paged_attention_ref`, less padding.

The reference pads every sequence of the step to the longest context and the longest query and
makes one masked SDPA call. On the CPU that padding is most of the work: decode contexts in a
batch spread over several hundred tokens, and a fresh prompt padded to the batch's longest prompt
runs masked instead of causal. This path plans the step once (the plan is shared by every layer:
it depends only on the metadata, and on the layer's sliding window) and then, per layer:

    decode sequences (1 new token)   sorted by context length, cut into groups where padding to the
                                     group's longest costs less than one more SDPA call
                                     -> one masked SDPA per group, no query padding
    prefill sequences (>1 new token) one SDPA each over its own context; `is_causal` when the
                                     whole context is new (no mask), else an explicit offset mask

A layer with a sliding window reads only the blocks from the one holding its earliest visible
position on (a decode token's last `sliding_window` positions; a prefill's from its first query's
window start): the blocks wholly before the window are never gathered. Its plan is built once per
step and window (Gemma-style models alternate windowed and full layers) and kept beside the full one.

Shapes as in `attention.py`: query (T, H, D); caches (num_blocks, block_size, Hkv, D). An FP8
cache's context is dequantized after the gather, as in the reference (`attention_ref.context_as`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .attention_ref import attend, check_features, context_as, gather_context
from .kv_quant import check_scales, is_fp8
from .metadata import AttentionMetadata

# One more SDPA call costs about as much as this many (sequence x context token) cells of padded
# decode work (measured on a 2-core EPYC: ~0.1 ms per call vs ~0.3 us per cell at H=9, D=64).
GROUP_CALL_COST_CELLS = 384


@dataclass
class _DecodeGroup:
    rows: torch.Tensor                 # (n,) int64: query/output rows of the group's sequences
    tables: torch.Tensor               # (n, ceil(max_len / block_size)) int64, from each one's first read block
    max_len: int                       # the longest gathered span in the group (tokens)
    valid: Optional[torch.Tensor]      # (n, 1, 1, max_len) bool key mask; None when all of it is visible


@dataclass
class _PrefillSeq:
    start: int                         # first query row
    q_len: int
    seq_len: int                       # context, including the q_len new tokens (the last ones)
    context_start: int                 # position of the first gathered token (a block boundary)
    blocks: torch.Tensor               # (ceil(seq_len / block_size) - context_start / block_size,) int64
    mask: Optional[torch.Tensor]       # (q_len, seq_len - context_start) bool; None = plain causal


@dataclass
class CpuAttentionPlan:
    decode: list[_DecodeGroup]
    prefill: list[_PrefillSeq]
    # the same step's plans for windowed layers, by window (built on first use)
    windowed: dict[int, "CpuAttentionPlan"] = field(default_factory=dict)


def plan_for(metadata: AttentionMetadata, block_size: int, sliding_window: Optional[int] = None) -> CpuAttentionPlan:
    """The step's plan, built on first use and kept on the metadata for the other layers."""
    plan = metadata.host_plan
    if not isinstance(plan, CpuAttentionPlan):
        plan = build_plan(metadata, block_size)
        metadata.host_plan = plan
    if sliding_window is None:
        return plan
    windowed = plan.windowed.get(sliding_window)
    if windowed is None:
        windowed = plan.windowed[sliding_window] = build_plan(metadata, block_size, sliding_window)
    return windowed


def build_plan(metadata: AttentionMetadata, block_size: int, sliding_window: Optional[int] = None) -> CpuAttentionPlan:
    starts = metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens.tolist()
    tables = metadata.block_tables
    decodes: list[tuple[int, int, int, int]] = []     # (query row, sequence, first visible position, seq_len)
    prefill: list[_PrefillSeq] = []
    for i, seq_len in enumerate(seq_lens):
        start, q_len = starts[i], starts[i + 1] - starts[i]
        if q_len <= 0:
            continue
        if q_len == 1:
            first = 0 if sliding_window is None else max(0, seq_len - sliding_window)
            decodes.append((start, i, first, seq_len))
            continue
        if q_len > seq_len:
            raise ValueError(f"sequence {i} has {q_len} new tokens but a context of only {seq_len}")
        # query j sits at position seq_len - q_len + j and sees keys at positions <= that (and, with a
        # window, > that - sliding_window): nothing before the first query's window start is read
        first = 0 if sliding_window is None else max(0, seq_len - q_len - sliding_window + 1)
        context_start = first // block_size * block_size
        blocks = tables[i, context_start // block_size: -(-seq_len // block_size)].long()
        mask = None
        windowed = sliding_window is not None and sliding_window < seq_len
        if seq_len != q_len or windowed:
            positions = torch.arange(seq_len - q_len, seq_len)[:, None]
            key_positions = torch.arange(context_start, seq_len)[None, :]
            mask = key_positions <= positions
            if windowed:
                mask &= key_positions > positions - sliding_window
        prefill.append(_PrefillSeq(start, q_len, seq_len, context_start, blocks, mask))
    return CpuAttentionPlan(_group_decodes(decodes, tables, block_size), prefill)


def _group_decodes(decodes: list[tuple[int, int, int, int]], tables: torch.Tensor,
                   block_size: int) -> list[_DecodeGroup]:
    """Groups by gathered span: from the block holding each one's first visible position to its end."""
    if not decodes:
        return []
    first_blocks = [first // block_size for _, _, first, _ in decodes]
    spans = [seq_len - fb * block_size for (_, _, _, seq_len), fb in zip(decodes, first_blocks)]
    order = sorted(range(len(decodes)), key=spans.__getitem__)
    sorted_spans = [spans[k] for k in order]
    width = tables.shape[1]
    groups = []
    for lo, hi in _cut_points(sorted_spans):
        members = order[lo:hi]
        max_len = sorted_spans[hi - 1]
        num_blocks = -(-max_len // block_size)
        member_first = torch.tensor([first_blocks[k] for k in members])
        # NOTE: a shorter member's columns past its own blocks are clamped into the table; masked below
        columns = (member_first[:, None] + torch.arange(num_blocks)[None, :]).clamp_(max=width - 1)
        seq_index = torch.tensor([decodes[k][1] for k in members])
        offsets = torch.tensor([decodes[k][2] - first_blocks[k] * block_size for k in members])
        ends = torch.tensor([spans[k] for k in members])
        valid = None
        if bool((offsets != 0).any()) or sorted_spans[lo] != max_len:
            t = torch.arange(max_len)[None, :]
            valid = ((t >= offsets[:, None]) & (t < ends[:, None]))[:, None, None, :]
        groups.append(_DecodeGroup(
            rows=torch.tensor([decodes[k][0] for k in members], dtype=torch.int64),
            tables=tables.index_select(0, seq_index).long().gather(1, columns),
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
    *,
    sliding_window: Optional[int] = None,
    logit_softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """key, value: optionally the step's new K/V (T, Hkv, D), the values just written to the cache;
    a prefill whose whole context is new then reads them instead of gathering from the cache.
    k_scale / v_scale: (1,) float32, required for (and read only with) an FP8 cache.
    sliding_window, logit_softcap, sinks: see `attention.paged_attention`."""
    check_scales(key_cache, k_scale, v_scale)
    check_features(query, sliding_window, logit_softcap, sinks)
    if query.dtype != torch.float32:
        # NOTE: the CPU SDPA kernel is several times slower in bf16 than in fp32 (measured 11.7 vs
        # 2.6 ms per decode layer call): attend in fp32, the inputs' values are unchanged.
        return paged_attention_cpu(query.float(), key_cache, value_cache, metadata, scale, key, value,
                                   k_scale, v_scale, sliding_window=sliding_window, logit_softcap=logit_softcap,
                                   sinks=sinks).to(query.dtype)
    if is_fp8(key_cache):
        # NOTE: the new K/V are not what the FP8 cache holds (it rounded them): a fresh prompt reads
        # the cache like every other sequence, so that a prompt attends to the same values whether
        # it is computed fresh, from a prefix-cache hit or recomputed after a preemption.
        key = value = None
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size = key_cache.shape[1]
    plan = plan_for(metadata, block_size, sliding_window)
    features = dict(logit_softcap=logit_softcap, sinks=sinks)
    out = torch.zeros_like(query)                                          # (T, H, D); padding rows stay 0

    for group in plan.decode:
        n = group.rows.shape[0]
        keys = context_as(gather_context(key_cache, group.tables, group.max_len), query.dtype,
                          k_scale)                                                   # (n, Hkv, L, D)
        values = context_as(gather_context(value_cache, group.tables, group.max_len), query.dtype, v_scale)
        q = query.index_select(0, group.rows)[:, :, None, :]                 # (n, H, 1, D)
        attended = attend(q, keys, values, group.valid, scale, **features)   # (n, H, 1, D)
        out.index_copy_(0, group.rows, attended.view(n, num_heads, head_dim))

    for seq in plan.prefill:
        context_len = seq.seq_len - seq.context_start
        if seq.q_len == seq.seq_len and key is not None and value is not None:   # the whole context is new
            rows = slice(seq.start + seq.context_start, seq.start + seq.q_len)
            keys = key[rows].to(query.dtype).transpose(0, 1)[None]             # (1, Hkv, L, D)
            values = value[rows].to(query.dtype).transpose(0, 1)[None]
        else:
            keys = context_as(gather_context(key_cache, seq.blocks[None], context_len), query.dtype,
                              k_scale)                                               # (1, Hkv, L, D)
            values = context_as(gather_context(value_cache, seq.blocks[None], context_len), query.dtype, v_scale)
        q = query[seq.start:seq.start + seq.q_len].transpose(0, 1)[None]         # (1, H, q, D)
        attended = attend(q, keys, values, seq.mask, scale, is_causal=seq.mask is None, **features)
        out[seq.start:seq.start + seq.q_len] = attended[0].transpose(0, 1)
    return out
