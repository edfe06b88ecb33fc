"""A model's paged KV cache: one allocation of shape

    (layers, 2 [K, V], num_blocks, block_size, num_kv_heads, head_dim)

and a view of it per attention layer (`layer.kv_cache`, (2, num_blocks, block_size, kv_heads, head_dim)).
The target model owns one; a draft model of speculative decoding owns another with the same
num_blocks and block_size, so that one block id of the scheduler addresses both."""
from __future__ import annotations

import torch
import torch.nn as nn


def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all of `model`'s attention layers (K and V), in `dtype`."""
    layers = model.attention_layers()
    first = layers[0]
    return len(layers) * 2 * block_size * first.num_kv_heads * first.head_dim * dtype.itemsize


def allocate_kv_cache(model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """Zeroed cache of `num_blocks` blocks; every attention layer of `model` gets its view."""
    layers = model.attention_layers()
    first = layers[0]
    cache = torch.zeros(len(layers), 2, num_blocks, block_size, first.num_kv_heads, first.head_dim,
                        dtype=dtype, device=device)
    for i, layer in enumerate(layers):
        layer.kv_cache = cache[i]
    return cache


def release_kv_cache(model: nn.Module) -> None:
    """Drops every layer's view (the caller drops the cache itself), so its memory can be freed."""
    for layer in model.attention_layers():
        layer.kv_cache = torch.empty(0)


def cache_bytes(cache: torch.Tensor | None) -> int:
    return 0 if cache is None else cache.numel() * cache.element_size()
