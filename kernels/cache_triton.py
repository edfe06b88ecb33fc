"""Triton `reshape_and_cache`: scatter the step's new keys/values into their paged-cache slots.

One program per token copies that token's (num_kv_heads, head_dim) key and value tile to slot
`slot_mapping[t]`, i.e. block `slot // block_size`, offset `slot % block_size`; slot -1 (CUDA-graph
padding) is skipped. Keys/values may be strided views (e.g. slices of a fused qkv projection) as long
as head_dim is contiguous; values are cast to the cache dtype. Same contract as `cache.reshape_and_cache_ref`.

An FP8 cache (`FP8` constexpr, so the other dtypes compile the plain copy) stores
value / scale saturated to +-448 and rounded to nearest even: IEEE division (`div_rn`, as torch
divides) and the hardware's rounding cast on the GPU. The Triton interpreter's float -> fp8 cast
rounds ties up and drops the carry into the exponent (125.5 -> 64), so under the interpreter the
value is first rounded onto the e4m3 grid in fp32 (`e4m3_triton.round_to_e4m3`), which makes the cast exact.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .e4m3_triton import round_to_e4m3
from .kv_quant import check_cache_pair, check_scales, is_fp8

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CACHE_DTYPES = _DTYPES + (torch.float8_e4m3fn,)


@triton.jit
def _to_cache(x, scale, cache_ptr, FP8: tl.constexpr, FP8_SOFT_ROUND: tl.constexpr):
    """x in the cache's element type: x / scale saturated to e4m3 for an FP8 cache, else a cast."""
    if FP8:
        x = tl.math.div_rn(x.to(tl.float32), scale)
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)                       # kv_quant.FP8_MAX
        if FP8_SOFT_ROUND:
            x = round_to_e4m3(x)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,            # (num_tokens, num_kv_heads, head_dim)
    value_ptr,          # (num_tokens, num_kv_heads, head_dim)
    key_cache_ptr,      # (num_blocks, block_size, num_kv_heads, head_dim)
    value_cache_ptr,    # (num_blocks, block_size, num_kv_heads, head_dim), same strides as key_cache
    slot_mapping_ptr,   # (num_tokens,) int64; -1 = skip
    k_scale_ptr,        # (1,) fp32: stored key = key / k_scale (read only when FP8)
    v_scale_ptr,        # (1,) fp32
    stride_k_tok, stride_k_head,
    stride_v_tok, stride_v_head,
    stride_c_block, stride_c_slot, stride_c_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,      # next power of 2 of NUM_KV_HEADS
    HEAD_DIM_PAD: tl.constexpr,   # next power of 2 of HEAD_DIM
    BLOCK_SIZE: tl.constexpr,     # tokens per cache block
    FP8: tl.constexpr,            # the cache is float8_e4m3fn: quantize with the scales
    FP8_SOFT_ROUND: tl.constexpr,  # round onto the e4m3 grid in fp32 first (the interpreter)
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
    k_scale = 1.0
    v_scale = 1.0
    if FP8:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    key = tl.load(key_ptr + src_tok * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :], mask=mask)
    tl.store(key_cache_ptr + cache_offs, _to_cache(key, k_scale, key_cache_ptr, FP8, FP8_SOFT_ROUND), mask=mask)
    value = tl.load(value_ptr + src_tok * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :], mask=mask)
    tl.store(value_cache_ptr + cache_offs, _to_cache(value, v_scale, value_cache_ptr, FP8, FP8_SOFT_ROUND),
             mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    """Write key[t] / value[t] into the caches at slot_mapping[t] (in place); slots of -1 are skipped.

    k_scale / v_scale: (1,) float32, required for (and read only with) an FP8 cache."""
    _check_inputs(key, value, key_cache, value_cache, slot_mapping)
    check_scales(key_cache, k_scale, v_scale)
    fp8 = is_fp8(key_cache)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    heads_pad, head_dim_pad = triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(head_dim)
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        k_scale if fp8 else slot_mapping, v_scale if fp8 else slot_mapping,     # unread unless FP8
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_PAD=heads_pad, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=key_cache.shape[1],
        FP8=fp8, FP8_SOFT_ROUND=fp8 and os.environ.get("TRITON_INTERPRET") == "1",
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
    check_cache_pair(key_cache, value_cache)
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must have shape ({key.shape[0]},), got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    for name, tensor in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        allowed = _DTYPES if name in ("key", "value") else _CACHE_DTYPES
        if tensor.dtype not in allowed:
            raise ValueError(f"{name} dtype must be one of {allowed}, got {tensor.dtype}")
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim, got strides {tensor.stride()}")
    for name, tensor in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                         ("slot_mapping", slot_mapping)):
        if tensor.device != key.device:
            raise ValueError(f"{name} is on {tensor.device}, key on {key.device}")
