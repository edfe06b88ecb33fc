"""Writing the step's new keys and values into their paged-cache slots.

slot = block_id * block_size + offset_in_block; a slot of -1 marks a padding token (CUDA-graph
padding) and is skipped. Shapes: key/value (num_tokens, num_kv_heads, head_dim); caches
(num_blocks, block_size, num_kv_heads, head_dim); slot_mapping (num_tokens,) int64.
"""
from __future__ import annotations

import torch

from .backend import use_triton


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if use_triton(key):
        from . import cache_triton

        cache_triton.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
        return
    reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping)


def reshape_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    flat_k = key_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_v = value_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_k[slots] = key[valid].to(key_cache.dtype)
    flat_v[slots] = value[valid].to(value_cache.dtype)
