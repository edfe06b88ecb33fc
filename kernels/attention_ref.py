"""Paged attention in plain torch: the oracle of the Triton and CPU paths, and the path elsewhere.

It sits below both `attention.py` (the dispatch) and `attention_cpu.py` (the grouped CPU path), which
share `gather_context`; neither of them is imported here, so the three modules form no cycle.

Shapes as in `attention.py`: query (T, H, D); caches (num_blocks, block_size, Hkv, D); output like
query. GQA: query head h reads KV head h // (H // Hkv). An FP8 cache's gathered context is
dequantized (stored * k_scale / v_scale, `kv_quant.dequantize`) before the attention math.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .kv_quant import check_scales, dequantize, is_fp8
from .metadata import AttentionMetadata


def paged_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Torch reference: gather each sequence's context into a padded batch, one masked SDPA call.

    Vectorised (no per-sequence Python loop); the oracle of the Triton and CPU paths' tests.
    k_scale / v_scale: (1,) float32, required for (and read only with) an FP8 cache.
    """
    check_scales(key_cache, k_scale, v_scale)
    if query.device.type == "cpu" and query.dtype != torch.float32:
        # NOTE: the CPU SDPA kernel is several times slower in bf16 than in fp32 (measured 11.7 vs
        # 2.6 ms per decode layer call): attend in fp32, the inputs' values are unchanged.
        return paged_attention_ref(query.float(), key_cache, value_cache, metadata, scale,
                                   k_scale, v_scale).to(query.dtype)
    if metadata.max_query_len == 1 and query.shape[0] == metadata.num_seqs:
        return _decode_ref(query, key_cache, value_cache, metadata, scale, k_scale, v_scale)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = metadata.num_seqs
    max_q, max_s = metadata.max_query_len, metadata.max_seq_len
    device = query.device

    qsl = metadata.query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]                                  # (num_seqs,)
    seq_lens = metadata.seq_lens.long()                          # (num_seqs,)

    num_blocks = (max_s + block_size - 1) // block_size
    tables = metadata.block_tables[:, :num_blocks].long()        # (num_seqs, num_blocks)
    keys = context_as(gather_context(key_cache, tables, max_s), query.dtype, k_scale)   # (S, Hkv, max_s, D)
    values = context_as(gather_context(value_cache, tables, max_s), query.dtype, v_scale)

    # Scatter the flat queries into (num_seqs, max_q) slots.
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens)  # (T,)
    index_in_seq = torch.arange(num_tokens, device=device) - qsl[seq_of_token]             # (T,)
    padded_q = query.new_zeros(num_seqs, max_q, num_heads, head_dim)
    padded_q[seq_of_token, index_in_seq] = query

    # Query j of sequence i sits at position seq_lens[i] - q_lens[i] + j; it sees keys at <= that.
    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]    # (S, max_q)
    k_pos = torch.arange(max_s, device=device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < seq_lens[:, None, None])

    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2),          # (S, H, max_q, D)
        keys,                              # (S, Hkv, max_s, D)
        values,
        attn_mask=mask[:, None],           # (S, 1, max_q, max_s)
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )                                      # (S, H, max_q, D)
    return out.transpose(1, 2)[seq_of_token, index_in_seq]       # (T, H, D)


def gather_context(cache: torch.Tensor, tables: torch.Tensor, max_s: int) -> torch.Tensor:
    """(num_blocks, block_size, Hkv, D) cache, (S, blocks) table -> (S, Hkv, max_s, D) view.

    NOTE: index_select on the flattened table is about twice as fast as advanced indexing on CPU."""
    num_seqs, num_blocks = tables.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    gathered = cache.index_select(0, tables.reshape(-1))
    return gathered.view(num_seqs, num_blocks * block_size, num_kv_heads, head_dim)[:, :max_s].transpose(1, 2)


def context_as(context: torch.Tensor, dtype: torch.dtype, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Gathered cache contents as real values in `dtype`: dequantized from FP8, else cast."""
    return dequantize(context, scale, dtype) if is_fp8(context) else context.to(dtype)


def _decode_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """One query token per sequence: no query padding, a key-length mask only."""
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    max_s = metadata.max_seq_len
    tables = metadata.block_tables[:, : (max_s + block_size - 1) // block_size].long()
    keys = context_as(gather_context(key_cache, tables, max_s), query.dtype, k_scale)     # (S, Hkv, max_s, D)
    values = context_as(gather_context(value_cache, tables, max_s), query.dtype, v_scale)
    valid = torch.arange(max_s, device=query.device)[None, :] < metadata.seq_lens.long()[:, None]
    out = F.scaled_dot_product_attention(
        query[:, :, None, :], keys, values, attn_mask=valid[:, None, None, :], scale=scale,
        enable_gqa=num_heads != num_kv_heads)                                   # (S, H, 1, D)
    return out.squeeze(2)
