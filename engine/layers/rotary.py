"""Rotary position embedding with the rope scalings of Llama-family checkpoints.

The layer turns the config's rope parameters into inverse frequencies once, precomputes a
[cos | sin] table for every position up to max_position, and the kernel only indexes it. Supported
rope types: default, linear, llama3 (others fail at load with the list of supported ones).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn

from pagoda.kernels.rotary import apply_rotary

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf_config: Any) -> tuple[float, dict]:
    """(theta, scaling dict) from either transformers 5 `rope_parameters` or older `rope_scaling`."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = getattr(hf_config, "rope_scaling", None)
    if legacy:
        params = {**dict(legacy), **params}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return float(theta), params


def _inverse_frequencies(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are scaled down by `factor`, short ones kept, the band between blended
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, blended, scaled)
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: Optional[dict] = None) -> None:
        super().__init__()
        inv_freq = _inverse_frequencies(head_dim, theta, scaling or {})
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)                        # (max_position, head_dim / 2)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)           # (max_position, head_dim)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # query (T, H, D), key (T, Hkv, D)
        return apply_rotary(positions, query, key, self.cos_sin_cache)
