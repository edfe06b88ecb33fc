"""Rotary position embedding (GPT-NeoX / Hugging Face Llama "rotate half" layout).

cos_sin_cache (max_position, rotary_dim) holds [cos | sin] for every position, built once by the
layer from its inverse frequencies (so llama3 / linear scaling live in the layer, not the kernel).
Shapes: positions (num_tokens,); query (num_tokens, num_heads, head_dim);
key (num_tokens, num_kv_heads, head_dim). Returns new (query, key); rotary_dim == head_dim.
"""
from __future__ import annotations

import torch

from .backend import use_triton


def apply_rotary(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(query):
        from . import rotary_triton

        return rotary_triton.apply_rotary(positions, query, key, cos_sin_cache)
    return apply_rotary_ref(positions, query, key, cos_sin_cache)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def apply_rotary_ref(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos_sin = cos_sin_cache[positions]                    # (T, rotary_dim)
    cos, sin = cos_sin.chunk(2, dim=-1)                   # (T, rotary_dim / 2) each
    cos = torch.cat((cos, cos), dim=-1)[:, None, :]       # (T, 1, rotary_dim)
    sin = torch.cat((sin, sin), dim=-1)[:, None, :]
    return _rotate(query.float(), cos, sin).to(query.dtype), _rotate(key.float(), cos, sin).to(key.dtype)
