"""Writing the step's new keys and values into their paged-cache slots.

slot = block_id * block_size + offset_in_block; a slot of -1 marks a padding token (CUDA-graph
padding) and is skipped. Shapes: key/value (num_tokens, num_kv_heads, head_dim); caches
(num_blocks, block_size, num_kv_heads, head_dim); slot_mapping (num_tokens,) int64.

An FP8 cache (torch.float8_e4m3fn) stores K / k_scale and V / v_scale, saturated and rounded
(`kv_quant.quantize`); the scales are one-element float32 tensors, required with an FP8 cache.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backend import use_triton
from .kv_quant import check_scales, is_fp8, quantize


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    """k_scale / v_scale: read only when the cache is FP8 (then required)."""
    if use_triton(key):
        from . import cache_triton

        cache_triton.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
        return
    reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def reshape_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    flat_k = key_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_v = value_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    if is_fp8(key_cache):
        check_scales(key_cache, k_scale, v_scale)
        flat_k[slots] = quantize(key[valid], k_scale)
        flat_v[slots] = quantize(value[valid], v_scale)
        return
    flat_k[slots] = key[valid].to(key_cache.dtype)
    flat_v[slots] = value[valid].to(value_cache.dtype)
