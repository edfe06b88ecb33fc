"""Rotary position embedding (GPT-NeoX / Hugging Face Llama "rotate half" layout).

cos_sin_cache (max_position, rotary_dim) holds [cos | sin] for every position, built once by the
layer from its inverse frequencies (so llama3 / linear / longrope scaling, and an attention factor
multiplied into cos and sin, live in the layer, not the kernel).
Shapes: positions (num_tokens,); query (num_tokens, num_heads, head_dim);
key (num_tokens, num_kv_heads, head_dim). Returns new (query, key).

Partial rotary (rotary_dim < head_dim, e.g. Phi-4-mini's partial_rotary_factor 0.75): the first
rotary_dim features of each head are rotated (rotate-half within them), the rest pass unchanged, as
Hugging Face's `apply_rotary_pos_emb` does when cos/sin are narrower than the head.
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
    rotary_dim = cos_sin.shape[-1]
    cos, sin = cos_sin.float().chunk(2, dim=-1)           # (T, rotary_dim / 2) each
    cos = torch.cat((cos, cos), dim=-1)[:, None, :]       # (T, 1, rotary_dim)
    sin = torch.cat((sin, sin), dim=-1)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rotated = _rotate(x[..., :rotary_dim].float(), cos, sin).to(x.dtype)
        return rotated if rotary_dim == x.shape[-1] else torch.cat((rotated, x[..., rotary_dim:]), dim=-1)

    return rotate(query), rotate(key)
