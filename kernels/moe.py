"""Fused mixture-of-experts feed-forward: every token through its top-k experts' gated MLPs, weighted
by the router and summed, in one call (the dispatch, the torch reference, and the expert sort).

    out[t] = sum_k  topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t])
    expert_e(x) = w2[e] @ act(w13[e] @ x + w13_bias[e]) + w2_bias[e]

Shapes (this rank's slice of the experts):
    hidden        (T, H) model dtype
    w13           (E_local, 2N, H): rows [0, N) the gate projection, [N, 2N) the up projection
    w2            (E_local, H, N)
    topk_weights  (T, K) float32, already renormalised where the family does
    topk_ids      (T, K) int32 / int64 global expert ids
    expert_map    (E_global,) int32: global id -> local index, -1 = the expert lives on another rank
                  (expert parallelism: such pairs contribute nothing here; the caller sums over ranks)

Activations ("silu" and gpt-oss's "swigluoai", see `activation_ref`) act on the [gate; up] halves.

Rounding points (float32 accumulation everywhere), shared by the reference and the Triton kernels so
their results differ by summation order only:
    1. act(gate, up) computed in float32 from the float32 projection (+ bias), rounded to the model dtype
    2. the down projection in float32 (+ bias), times the routing weight, rounded to the model dtype
    3. the sum over k in float32, rounded to the model dtype

`moe_align` groups the (token, k) pairs by expert and pads each expert's run to the GEMM's row tile;
it never synchronises with the host (fixed-size outputs for a given T), so the decode step can run
inside a CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .backend import use_triton
from .moe_layout import SWIGLU_ALPHA, SWIGLU_LIMIT, MoeAlignment, max_aligned_rows

ACTIVATIONS = ("silu", "swigluoai")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int,
              expert_map: Optional[torch.Tensor] = None) -> MoeAlignment:
    """Sort the (token, k) pairs of `topk_ids` (T, K) by local expert (`expert_map` applied; pairs
    mapped to -1 are left out) and pad each expert's run to a multiple of `block_m`. No host sync."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be (num_tokens, top_k), got shape {tuple(topk_ids.shape)}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    if use_triton(topk_ids):
        from . import moe_triton

        return moe_triton.moe_align(topk_ids, num_experts, block_m, expert_map)
    return moe_align_ref(topk_ids, num_experts, block_m, expert_map)


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                  expert_map: Optional[torch.Tensor] = None) -> MoeAlignment:
    """`moe_align` with torch ops only (sync-free too: a stable sort, scatters and a search), pairs in
    token order within each expert."""
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    num_rows = max_aligned_rows(num_pairs, num_experts, block_m)
    local = _local_ids(topk_ids, expert_map).reshape(-1)
    key = torch.where(local >= 0, local, num_experts)                      # dropped pairs: bucket E, last
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = torch.cat([ends.new_zeros(1), ends[:-1], ends.new_full((1,), num_rows)])   # bucket E: a dump row
    sorted_key, order = torch.sort(key, stable=True)
    first = counts.cumsum(0) - counts                                      # where each bucket begins in `order`
    rank = torch.arange(num_pairs, device=device) - first[sorted_key]
    dest = torch.where(sorted_key < num_experts, starts[sorted_key] + rank, num_rows)
    sorted_ids = torch.full((num_rows + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    # block b's expert: how many experts end at or before its first row (empty experts end where they start)
    block_starts = torch.arange(0, num_rows, block_m, device=device)
    block_expert = torch.searchsorted(ends, block_starts, right=True).to(torch.int32)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return MoeAlignment(sorted_ids[:num_rows], block_expert, block_m, num_pairs)


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu", w13_bias: Optional[torch.Tensor] = None,
              w2_bias: Optional[torch.Tensor] = None, expert_map: Optional[torch.Tensor] = None,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(T, H): sum_k topk_weights[t, k] * expert_k(hidden[t]) over this rank's experts (module docstring).
    Written into `out` ((T, H), hidden's dtype) when given. Expert ids are not range-checked (that
    would synchronise with the device): ids must be < E_local, or < E_global with an expert_map."""
    check_inputs(hidden, w13, w2, topk_weights, topk_ids, activation, w13_bias, w2_bias, expert_map, out)
    if use_triton(hidden):
        from . import moe_triton

        return moe_triton.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation, w13_bias, w2_bias,
                                    expert_map, out)
    return fused_moe_ref(hidden, w13, w2, topk_weights, topk_ids, activation, w13_bias, w2_bias, expert_map, out)


def activation_ref(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate, up) in float32. swigluoai follows transformers' GptOssExperts:
    gate <- min(gate, limit); up <- clamp(up, -limit, limit); (up + 1) * gate * sigmoid(alpha * gate)."""
    gate, up = gate.float(), up.float()
    if activation == "silu":
        return F.silu(gate) * up
    gate = gate.clamp(max=SWIGLU_LIMIT)
    up = up.clamp(min=-SWIGLU_LIMIT, max=SWIGLU_LIMIT)
    return (up + 1) * (gate * torch.sigmoid(gate * SWIGLU_ALPHA))


def fused_moe_ref(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str = "silu", w13_bias: Optional[torch.Tensor] = None,
                  w2_bias: Optional[torch.Tensor] = None, expert_map: Optional[torch.Tensor] = None,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The torch reference: one pair of matmuls per expert hit, with the rounding points of the module
    docstring. NOTE: it reads which experts were hit back to the host (fine on CPU, its use)."""
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    n = w13.shape[1] // 2
    dtype = hidden.dtype
    local = _local_ids(topk_ids, expert_map).reshape(-1)                  # (T * K,) local expert or -1
    weights = topk_weights.reshape(-1).float()
    acc = torch.zeros(num_tokens, hidden_size, dtype=torch.float32, device=hidden.device)
    for expert in torch.unique(local).tolist():
        if expert < 0:
            continue
        pairs = (local == expert).nonzero().squeeze(1)
        tokens = pairs // top_k
        gate_up = hidden[tokens].float() @ w13[expert].float().t()       # (pairs, 2N)
        if w13_bias is not None:
            gate_up = gate_up + w13_bias[expert].float()
        inter = activation_ref(gate_up[:, :n], gate_up[:, n:], activation).to(dtype)
        y = inter.float() @ w2[expert].float().t()                        # (pairs, H)
        if w2_bias is not None:
            y = y + w2_bias[expert].float()
        y = (y * weights[pairs, None]).to(dtype)
        acc.index_add_(0, tokens, y.float())
    result = acc.to(dtype)
    return result if out is None else out.copy_(result)


def _local_ids(topk_ids: torch.Tensor, expert_map: Optional[torch.Tensor]) -> torch.Tensor:
    ids = topk_ids.long()
    return ids if expert_map is None else expert_map.long()[ids]


def check_inputs(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, activation: str, w13_bias: Optional[torch.Tensor],
                 w2_bias: Optional[torch.Tensor], expert_map: Optional[torch.Tensor],
                 out: Optional[torch.Tensor]) -> None:
    """Shapes, dtypes and names (ValueError naming the bad one); values are not read (no sync)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (num_tokens, hidden_size), got shape {tuple(hidden.shape)}")
    if hidden.dtype not in _DTYPES:
        raise ValueError(f"hidden dtype must be one of {_DTYPES}, got {hidden.dtype}")
    num_tokens, hidden_size = hidden.shape
    if w13.dim() != 3 or w13.shape[2] != hidden_size or w13.shape[1] % 2:
        raise ValueError(f"w13 must be (num_experts, 2 * intermediate, {hidden_size}), got shape {tuple(w13.shape)}")
    num_experts, n = w13.shape[0], w13.shape[1] // 2
    if w2.shape != (num_experts, hidden_size, n):
        raise ValueError(f"w2 must be ({num_experts}, {hidden_size}, {n}), got shape {tuple(w2.shape)}")
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(f"w13 and w2 must have hidden's dtype {hidden.dtype}, got {w13.dtype} and {w2.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids must be ({num_tokens}, top_k), got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    if w13_bias is not None and w13_bias.shape != (num_experts, 2 * n):
        raise ValueError(f"w13_bias must be ({num_experts}, {2 * n}), got shape {tuple(w13_bias.shape)}")
    if w2_bias is not None and w2_bias.shape != (num_experts, hidden_size):
        raise ValueError(f"w2_bias must be ({num_experts}, {hidden_size}), got shape {tuple(w2_bias.shape)}")
    if expert_map is not None and (expert_map.dim() != 1 or expert_map.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"expert_map must be a 1-D int32 tensor (global id -> local index or -1), got "
                         f"shape {tuple(expert_map.shape)} {expert_map.dtype}")
    if out is not None and (out.shape != hidden.shape or out.dtype != hidden.dtype):
        raise ValueError(f"out must be a {tuple(hidden.shape)} {hidden.dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
