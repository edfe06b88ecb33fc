"""Paged attention in plain torch: the oracle of the Triton and CPU paths, and the path elsewhere.

It sits below both `attention.py` (the dispatch) and `attention_cpu.py` (the grouped CPU path), which
share `gather_context`, `attend` and the input checks; neither of them is imported here, so the three
modules form no cycle.

Shapes as in `attention.py`: query (T, H, D); caches (num_blocks, block_size, Hkv, D); output like
query. GQA: query head h reads KV head h // (H // Hkv). An FP8 cache's gathered context is
dequantized (stored * k_scale / v_scale, `kv_quant.dequantize`) before the attention math.

Per-layer attention features (`attention.py` states their exact meaning): a sliding window, logit
soft-capping and attention sinks. Plain causal attention (and a window alone, which is only a mask)
runs as one SDPA call; soft-capping and sinks change the softmax itself, which SDPA cannot express,
so `attend` then computes the scores explicitly, in chunks of query rows to bound their memory.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .kv_quant import check_cache_pair, check_scales, dequantize, is_fp8
from .metadata import AttentionMetadata

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CACHE_DTYPES = _DTYPES + (torch.float8_e4m3fn,)
# explicit-score path: at most this many fp32 scores per chunk of query rows (64 MiB)
_MAX_SCORE_ELEMENTS = 1 << 24


def paged_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    *,
    sliding_window: Optional[int] = None,
    logit_softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Torch reference: gather each sequence's context into a padded batch, one masked attention call.

    Vectorised (no per-sequence Python loop); the oracle of the Triton and CPU paths' tests.
    k_scale / v_scale: (1,) float32, required for (and read only with) an FP8 cache.
    sliding_window, logit_softcap, sinks: see `attention.paged_attention`.
    """
    check_scales(key_cache, k_scale, v_scale)
    check_features(query, sliding_window, logit_softcap, sinks)
    if query.device.type == "cpu" and query.dtype != torch.float32:
        # NOTE: the CPU SDPA kernel is several times slower in bf16 than in fp32 (measured 11.7 vs
        # 2.6 ms per decode layer call): attend in fp32, the inputs' values are unchanged.
        return paged_attention_ref(query.float(), key_cache, value_cache, metadata, scale, k_scale, v_scale,
                                   sliding_window=sliding_window, logit_softcap=logit_softcap,
                                   sinks=sinks).to(query.dtype)
    features = dict(logit_softcap=logit_softcap, sinks=sinks)
    if metadata.max_query_len == 1 and query.shape[0] == metadata.num_seqs:
        return _decode_ref(query, key_cache, value_cache, metadata, scale, k_scale, v_scale, sliding_window,
                           **features)
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

    # Query j of sequence i sits at position seq_lens[i] - q_lens[i] + j; it sees keys at <= that
    # (and, with a window, at > that - sliding_window).
    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]    # (S, max_q)
    k_pos = torch.arange(max_s, device=device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < seq_lens[:, None, None])
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window

    out = attend(padded_q.transpose(1, 2), keys, values, mask[:, None], scale, **features)  # (S, H, max_q, D)
    return out.transpose(1, 2)[seq_of_token, index_in_seq]       # (T, H, D)


def check_inputs(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> None:
    """The contract of the fast paths (the Triton kernels): shapes, dtypes, devices, strides, metadata."""
    if query.dim() != 3:
        raise ValueError(f"query must be (num_tokens, num_heads, head_dim), got shape {tuple(query.shape)}")
    if key_cache.dim() != 4:
        raise ValueError("key_cache must be (num_blocks, block_size, num_kv_heads, head_dim), "
                         f"got shape {tuple(key_cache.shape)}")
    check_cache_pair(key_cache, value_cache)
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim:
        raise ValueError(f"key_cache head_dim {key_cache.shape[3]} != query head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    for name, tensor in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        allowed = _DTYPES if name == "query" else _CACHE_DTYPES
        if tensor.dtype not in allowed:
            raise ValueError(f"{name} dtype must be one of {allowed}, got {tensor.dtype}")
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim, got strides {tensor.stride()}")
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device}, query on {query.device}")
    num_seqs = metadata.seq_lens.shape[0]
    for name, tensor, shape in (
        ("seq_lens", metadata.seq_lens, (num_seqs,)),
        ("query_start_loc", metadata.query_start_loc, (num_seqs + 1,)),
        ("block_tables", metadata.block_tables, (num_seqs, metadata.block_tables.shape[-1])),
    ):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"metadata.{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if tensor.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"metadata.{name} must be int32 or int64, got {tensor.dtype}")
        if tensor.device != query.device:
            raise ValueError(f"metadata.{name} is on {tensor.device}, query on {query.device}")
    if metadata.block_tables.stride(-1) != 1:
        raise ValueError(f"metadata.block_tables must be row-contiguous, got strides {metadata.block_tables.stride()}")
    if metadata.max_query_len < 1 and query.shape[0] > 0:
        raise ValueError(f"metadata.max_query_len must be >= 1, got {metadata.max_query_len}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")


def check_features(
    query: torch.Tensor,
    sliding_window: Optional[int],
    logit_softcap: Optional[float],
    sinks: Optional[torch.Tensor],
) -> None:
    """The per-layer attention features are well formed (ValueError naming the bad one otherwise)."""
    check_window_and_softcap(sliding_window, logit_softcap)
    if sinks is not None:
        num_heads = query.shape[1] if query.dim() == 3 else None
        if (sinks.dim() != 1 or sinks.shape[0] != num_heads or sinks.dtype != torch.float32
                or sinks.device != query.device or sinks.stride(0) != 1):
            raise ValueError(f"sinks must be a contiguous float32 tensor of shape ({num_heads},) (one logit per "
                             f"query head) on {query.device}, got shape {tuple(sinks.shape)} {sinks.dtype} "
                             f"on {sinks.device}")


def check_window_and_softcap(sliding_window: Optional[int], logit_softcap: Optional[float]) -> None:
    """The layer constants: a window of >= 1 tokens, a positive finite cap (None: the feature is off)."""
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    if logit_softcap is not None and (isinstance(logit_softcap, bool) or not isinstance(logit_softcap, (int, float))
                                      or not math.isfinite(logit_softcap) or logit_softcap <= 0):
        raise ValueError(f"logit_softcap must be None or a positive finite float, got {logit_softcap!r}")


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    is_causal: bool = False,
    logit_softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of q (B, H, Q, D) over keys / values (B, Hkv, S, D) -> (B, H, Q, D).

    mask: bool, broadcastable to (B, H, Q, S), True = visible; `is_causal` (Q == S, no mask) instead.
    Scores are `scale * q . k`, then `logit_softcap * tanh(score / logit_softcap)`, then masked; the
    softmax denominator also holds exp(sinks[h]) (a logit with no value: the sink is never capped).
    """
    num_heads, num_kv_heads = q.shape[1], keys.shape[1]
    if logit_softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=num_heads != num_kv_heads)
    if num_heads != num_kv_heads:               # the same head mapping as SDPA's enable_gqa: h -> h // group
        keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=1)
        values = values.repeat_interleave(num_heads // num_kv_heads, dim=1)
    batch, _, num_q, _ = q.shape
    num_k = keys.shape[2]
    if is_causal:
        mask = torch.arange(num_k, device=q.device)[None, :] <= torch.arange(num_q, device=q.device)[:, None]
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * num_heads * num_k))
    outs = []
    for lo in range(0, num_q, chunk):
        rows = slice(lo, min(lo + chunk, num_q))
        scores = torch.matmul(q[:, :, rows].float(), keys.float().transpose(-1, -2)) * scale    # (B, H, q, S)
        if logit_softcap is not None:
            scores = torch.tanh(scores / logit_softcap) * logit_softcap
        if mask is not None:
            chunk_mask = mask[..., rows, :] if mask.shape[-2] == num_q and num_q > 1 else mask
            scores = scores.masked_fill(~chunk_mask, float("-inf"))
        if sinks is not None:
            sink = sinks.float().view(1, num_heads, 1, 1).expand(batch, num_heads, scores.shape[2], 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        outs.append(torch.matmul(probs, values.float()).to(q.dtype))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


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
    sliding_window: Optional[int],
    logit_softcap: Optional[float],
    sinks: Optional[torch.Tensor],
) -> torch.Tensor:
    """One query token per sequence (at position seq_len - 1): no query padding, a key-range mask only."""
    block_size = key_cache.shape[1]
    max_s = metadata.max_seq_len
    tables = metadata.block_tables[:, : (max_s + block_size - 1) // block_size].long()
    keys = context_as(gather_context(key_cache, tables, max_s), query.dtype, k_scale)     # (S, Hkv, max_s, D)
    values = context_as(gather_context(value_cache, tables, max_s), query.dtype, v_scale)
    k_pos = torch.arange(max_s, device=query.device)[None, :]
    seq_lens = metadata.seq_lens.long()[:, None]
    valid = k_pos < seq_lens
    if sliding_window is not None:
        valid &= k_pos >= seq_lens - sliding_window
    out = attend(query[:, :, None, :], keys, values, valid[:, None, None, :], scale,
                 logit_softcap=logit_softcap, sinks=sinks)                     # (S, H, 1, D)
    return out.squeeze(2)
