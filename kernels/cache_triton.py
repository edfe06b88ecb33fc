"""Triton `reshape_and_cache`: scatter the step's new keys/values into their paged-cache slots.

One program per token copies that token's (num_kv_heads, head_dim) key and value tile to slot
`slot_mapping[t]`, i.e. block `slot // block_size`, offset `slot % block_size`; slot -1 (CUDA-graph
padding) is skipped. Keys/values may be strided views (e.g. slices of a fused qkv projection) as long
as head_dim is contiguous; values are cast to the cache dtype. Same contract as `cache.reshape_and_cache_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,            # (num_tokens, num_kv_heads, head_dim)
    value_ptr,          # (num_tokens, num_kv_heads, head_dim)
    key_cache_ptr,      # (num_blocks, block_size, num_kv_heads, head_dim)
    value_cache_ptr,    # (num_blocks, block_size, num_kv_heads, head_dim), same strides as key_cache
    slot_mapping_ptr,   # (num_tokens,) int64; -1 = skip
    stride_k_tok, stride_k_head,
    stride_v_tok, stride_v_head,
    stride_c_block, stride_c_slot, stride_c_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,      # next power of 2 of NUM_KV_HEADS
    HEAD_DIM_PAD: tl.constexpr,   # next power of 2 of HEAD_DIM
    BLOCK_SIZE: tl.constexpr,     # tokens per cache block
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]   # (HEADS_PAD, HEAD_DIM_PAD)
    src_tok = token.to(tl.int64)
    cache_offs = ((slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot
                  + heads[:, None] * stride_c_head + dims[None, :])
    key = tl.load(key_ptr + src_tok * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :], mask=mask)
    tl.store(key_cache_ptr + cache_offs, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    value = tl.load(value_ptr + src_tok * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :], mask=mask)
    tl.store(value_cache_ptr + cache_offs, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key[t] / value[t] into the caches at slot_mapping[t] (in place); slots of -1 are skipped."""
    _check_inputs(key, value, key_cache, value_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    heads_pad, head_dim_pad = triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(head_dim)
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_PAD=heads_pad, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=key_cache.shape[1],
        num_warps=max(1, min(8, heads_pad * head_dim_pad // 256)),
    )


def _check_inputs(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if key.dim() != 3:
        raise ValueError(f"key must be (num_tokens, num_kv_heads, head_dim), got shape {tuple(key.shape)}")
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} != key shape {tuple(key.shape)}")
    if key_cache.dim() != 4 or key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"key_cache must be (num_blocks, block_size, {key.shape[1]}, {key.shape[2]}), "
                         f"got shape {tuple(key_cache.shape)}")
    if value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        raise ValueError(f"value_cache shape/strides {tuple(value_cache.shape)}/{value_cache.stride()} must match "
                         f"key_cache {tuple(key_cache.shape)}/{key_cache.stride()}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must have shape ({key.shape[0]},), got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    for name, tensor in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be one of {_DTYPES}, got {tensor.dtype}")
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim, got strides {tensor.stride()}")
    for name, tensor in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                         ("slot_mapping", slot_mapping)):
        if tensor.device != key.device:
            raise ValueError(f"{name} is on {tensor.device}, key on {key.device}")
