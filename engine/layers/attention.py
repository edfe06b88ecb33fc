"""Paged attention layer: writes this step's K/V into its layer's cache, then attends.

The layer's cache tensor (2, num_blocks, block_size, num_kv_heads, head_dim) is bound by the model
runner after the cache is allocated; the metadata comes in through forward, explicitly.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pagoda.kernels.attention import paged_attention
from pagoda.kernels.cache import reshape_and_cache
from pagoda.kernels.metadata import AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.kv_cache: torch.Tensor = torch.empty(0)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        # query (T, H, D); key, value (T, Hkv, D) -> (T, H, D)
        key_cache, value_cache = self.kv_cache[0], self.kv_cache[1]
        reshape_and_cache(key, value, key_cache, value_cache, metadata.slot_mapping)
        return paged_attention(query, key_cache, value_cache, metadata, self.scale, key, value)
