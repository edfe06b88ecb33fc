"""Triton rotary position embedding (GPT-NeoX "rotate half"). Same contract as `rotary.apply_rotary_ref`.

For a head vector x = [x1 | x2] (two halves of head_dim / 2) at position p, with
cos_sin_cache[p] = [cos | sin]:
    out = [x1 * cos - x2 * sin | x2 * cos + x1 * sin]          (fp32 math, cast back)
One program per token rotates all its query and key heads, reading the cache row once. The kernel
only indexes the cache, so any positions (and any scaling baked into the cache, e.g. llama3) work.
Query/key may be strided views of a fused qkv projection; the outputs are new contiguous tensors.
Partial rotary: with a cache narrower than the head (rotary_dim < head_dim), x1 / x2 are the two
halves of the first rotary_dim features and the remaining head_dim - rotary_dim are copied as they are.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rotate_heads(
    out_ptr,        # (num_heads, head_dim) row of this token, contiguous
    x_ptr,          # (num_heads, head_dim) row of this token, head stride stride_head
    stride_head,
    cos,            # (1, HALF_PAD) fp32
    sin,            # (1, HALF_PAD) fp32
    half,           # (HALF_PAD,) int32: 0 .. HALF_PAD-1
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,            # rotary_dim // 2
    HEAD_DIM: tl.constexpr,
    PASS_PAD: tl.constexpr,        # next power of 2 of head_dim - rotary_dim (1 when there is none)
):
    heads = tl.arange(0, HEADS_PAD)
    mask = (heads < NUM_HEADS)[:, None] & (half < HALF)[None, :]      # (HEADS_PAD, HALF_PAD)
    offs = heads[:, None] * stride_head + half[None, :]
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    out_offs = heads[:, None] * HEAD_DIM + half[None, :]
    tl.store(out_ptr + out_offs, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + out_offs + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    if HEAD_DIM > 2 * HALF:        # partial rotary: the features past rotary_dim pass through
        tail = 2 * HALF + tl.arange(0, PASS_PAD)
        tail_mask = (heads < NUM_HEADS)[:, None] & (tail < HEAD_DIM)[None, :]
        passed = tl.load(x_ptr + heads[:, None] * stride_head + tail[None, :], mask=tail_mask, other=0.0)
        tl.store(out_ptr + heads[:, None] * HEAD_DIM + tail[None, :], passed, mask=tail_mask)


@triton.jit
def _rotary_kernel(
    query_out_ptr,      # (num_tokens, num_heads, head_dim) contiguous
    key_out_ptr,        # (num_tokens, num_kv_heads, head_dim) contiguous
    query_ptr,          # (num_tokens, num_heads, head_dim)
    key_ptr,            # (num_tokens, num_kv_heads, head_dim)
    positions_ptr,      # (num_tokens,) int32/int64
    cos_sin_ptr,        # (max_position, rotary_dim): [cos | sin], row stride stride_cs
    stride_q_tok, stride_q_head,
    stride_k_tok, stride_k_head,
    stride_cs,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,       # next power of 2 of NUM_HEADS
    KV_HEADS_PAD: tl.constexpr,    # next power of 2 of NUM_KV_HEADS
    HALF: tl.constexpr,            # rotary_dim // 2
    HALF_PAD: tl.constexpr,        # next power of 2 of HALF
    HEAD_DIM: tl.constexpr,
    PASS_PAD: tl.constexpr,        # next power of 2 of head_dim - rotary_dim (1 when there is none)
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    half = tl.arange(0, HALF_PAD)
    cs_mask = half < HALF
    cos = tl.load(cos_sin_ptr + position * stride_cs + half, mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + position * stride_cs + HALF + half, mask=cs_mask, other=0.0).to(tl.float32)
    cos = cos[None, :]                                               # (1, HALF_PAD)
    sin = sin[None, :]
    _rotate_heads(query_out_ptr + token * (NUM_HEADS * HEAD_DIM), query_ptr + token * stride_q_tok,
                  stride_q_head, cos, sin, half, NUM_HEADS, HEADS_PAD, HALF, HEAD_DIM, PASS_PAD)
    _rotate_heads(key_out_ptr + token * (NUM_KV_HEADS * HEAD_DIM), key_ptr + token * stride_k_tok,
                  stride_k_head, cos, sin, half, NUM_KV_HEADS, KV_HEADS_PAD, HALF, HEAD_DIM, PASS_PAD)


def apply_rotary(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query (num_tokens, num_heads, head_dim) and key (num_tokens, num_kv_heads, head_dim)."""
    _check_inputs(positions, query, key, cos_sin_cache)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    query_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    key_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if num_tokens == 0:
        return query_out, key_out
    half = cos_sin_cache.shape[1] // 2
    heads_pad = triton.next_power_of_2(num_heads)
    _rotary_kernel[(num_tokens,)](
        query_out, key_out, query, key, positions, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_sin_cache.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=heads_pad, KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        HEAD_DIM=head_dim, PASS_PAD=triton.next_power_of_2(max(1, head_dim - 2 * half)),
        num_warps=max(1, min(8, heads_pad * triton.next_power_of_2(half) // 256)),
    )
    return query_out, key_out


def _check_inputs(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError("query/key must be (num_tokens, heads, head_dim), "
                         f"got {tuple(query.shape)} / {tuple(key.shape)}")
    num_tokens, _, head_dim = query.shape
    if key.shape[0] != num_tokens or key.shape[2] != head_dim:
        raise ValueError(f"key shape {tuple(key.shape)} does not match query {tuple(query.shape)}")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions must have shape ({num_tokens},), got {tuple(positions.shape)}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32 or int64, got {positions.dtype}")
    if (cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] > head_dim or cos_sin_cache.shape[1] % 2
            or cos_sin_cache.shape[1] == 0):
        raise ValueError(f"cos_sin_cache must be (max_position, rotary_dim) with rotary_dim even and at most "
                         f"head_dim={head_dim}, got {tuple(cos_sin_cache.shape)}")
    for name, tensor in (("query", query), ("key", key), ("cos_sin_cache", cos_sin_cache)):
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be one of {_DTYPES}, got {tensor.dtype}")
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {tensor.stride()}")
    for name, tensor in (("positions", positions), ("key", key), ("cos_sin_cache", cos_sin_cache)):
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device}, query on {query.device}")
