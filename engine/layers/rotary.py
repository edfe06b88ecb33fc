"""Rotary position embedding with the rope scalings of Llama-, Gemma- and Phi-family checkpoints.

The layer turns the config's rope parameters into inverse frequencies once, precomputes a
[cos | sin] table for every position up to max_position, and the kernel only indexes it. Supported
rope types: default, linear, llama3, longrope, yarn (others fail at load with the list of supported
ones).

- Partial rotary (`partial_rotary_factor` < 1, Phi-4-mini): only the first
  int(head_dim * factor) features of each head rotate; the table is that narrow and the kernel passes
  the rest through.
- longrope (Phi-3 / Phi-3.5 / Phi-4-mini long-context): frequencies divided per dimension by
  `short_factor` or `long_factor`, and cos / sin multiplied by an attention factor (the config's
  `attention_factor`, else sqrt(1 + ln(factor) / ln(original_max_position_embeddings)) with factor =
  max_position_embeddings / original_max_position_embeddings). Hugging Face picks the factors per
  forward call from the sequence length (long once it exceeds original_max_position_embeddings);
  pagoda picks them once per engine from max_model_len, so every sequence, and every cached key,
  uses one rotation: short factors when max_model_len <= original_max_position_embeddings (the same
  as Hugging Face for every sequence), long factors otherwise (the same as Hugging Face for
  sequences longer than original_max_position_embeddings).
- yarn (gpt-oss, Qwen long-context configs): frequencies blended per dimension between the
  original and the `factor`-interpolated ones, cos / sin times an attention factor (`_yarn`); static,
  the same for every position, as in Hugging Face.

Layers with equal parameters share one table (`RotaryEmbedding.shared`): a 128k-token table of a
256-wide head is 128 MiB in float32, which a model would otherwise hold once per layer.
"""
from __future__ import annotations

import json
import math
import weakref
from typing import Any, Optional

import torch
import torch.nn as nn

from pagoda.kernels.rotary import apply_rotary

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")


def rope_parameters(hf_config: Any) -> tuple[float, dict]:
    """(theta, scaling dict) from either transformers 5 `rope_parameters` or older `rope_scaling`.

    The dict also carries what a scaling reads from the config's top level: `partial_rotary_factor`,
    `original_max_position_embeddings` and (as `max_position_embeddings`) the model's context length,
    which longrope's default attention factor derives from."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = getattr(hf_config, "rope_scaling", None)
    if legacy:
        params = {**dict(legacy), **params}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    for key in ("partial_rotary_factor", "original_max_position_embeddings", "max_position_embeddings"):
        value = getattr(hf_config, key, None)
        if value is not None:
            params.setdefault(key, value)
    return float(theta), params


def rope_type_of(scaling: dict) -> str:
    return scaling.get("rope_type", scaling.get("type", "default")) or "default"


def rotary_dim_of(head_dim: int, scaling: dict) -> int:
    """The features of each head that rotate: all, or int(head_dim * partial_rotary_factor)."""
    factor = scaling.get("partial_rotary_factor")
    factor = 1.0 if factor is None else float(factor)
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {factor}")
    rotary_dim = int(head_dim * factor)
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"partial_rotary_factor={factor} of head_dim={head_dim} gives {rotary_dim} rotary "
                         "features; rotate-half rotary needs an even number of at least 2")
    return rotary_dim


def _longrope(rotary_dim: int, theta: float, scaling: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, attention factor) of longrope for an engine of max_position tokens."""
    original = scaling.get("original_max_position_embeddings")
    if not original:
        raise ValueError("rope_type 'longrope' needs original_max_position_embeddings in the config")
    original = int(original)
    which = "long_factor" if max_position > original else "short_factor"
    factors = torch.tensor(scaling[which], dtype=torch.float32)
    if factors.numel() != rotary_dim // 2:
        raise ValueError(f"longrope {which} has {factors.numel()} entries, expected {rotary_dim // 2} "
                         "(rotary_dim / 2)")
    # NOTE: 1 / (factor * theta^(2i/d)) in this order, as Hugging Face computes it (the tables match exactly)
    inv_freq = 1.0 / (factors * theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        factor = scaling.get("factor")
        if factor is None:
            factor = float(scaling.get("max_position_embeddings", original)) / original
        factor = float(factor)
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return inv_freq, float(attention_factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(rotary_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (gpt-oss, Qwen long-context configs): per frequency a blend of the original
    (extrapolated) frequency and the one divided by `factor` (interpolated), by a linear ramp over the
    dimensions between the corrections of `beta_fast` and `beta_slow` rotations within
    original_max_position_embeddings (floored / ceiled unless `truncate` is false); cos / sin scaled by
    `attention_factor`, else 0.1 ln(factor) + 1 (with DeepSeek's `mscale` / `mscale_all_dim`, their ratio)."""
    original = scaling.get("original_max_position_embeddings")
    if not original:
        raise ValueError("rope_type 'yarn' needs original_max_position_embeddings in the config")
    factor = scaling.get("factor")
    if factor is None:
        factor = float(scaling.get("max_position_embeddings", original)) / float(original)
    factor = float(factor)
    if factor <= 0:
        raise ValueError(f"rope_type 'yarn' needs factor > 0, got {factor}")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:       # the dimension that turns `rotations` times
        return rotary_dim * math.log(float(original) / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001                                     # a step, not a division by zero
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp                              # 1: keep the original frequency
    # NOTE: 1 / (factor * theta^(2i/d)) rather than inv_freq / factor, as Hugging Face computes it
    # (the tables then match exactly)
    pos_freqs = theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim)
    interpolated = 1.0 / (factor * pos_freqs)
    return interpolated * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation, float(attention_factor)


def _inverse_frequencies(rotary_dim: int, theta: float, scaling: dict,
                         max_position: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (rotary_dim / 2,), attention factor multiplied into cos and sin)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    rope_type = rope_type_of(scaling)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "longrope":
        return _longrope(rotary_dim, theta, scaling, max_position)
    if rope_type == "yarn":
        return _yarn(rotary_dim, theta, scaling)
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
        return torch.where(is_medium, blended, scaled), 1.0
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


# (head_dim, max_position, theta, scaling, device) -> the layer, while some model holds it
_SHARED: "weakref.WeakValueDictionary[tuple, RotaryEmbedding]" = weakref.WeakValueDictionary()


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: Optional[dict] = None) -> None:
        super().__init__()
        scaling = scaling or {}
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim_of(head_dim, scaling)
        inv_freq, attention_factor = _inverse_frequencies(self.rotary_dim, theta, scaling, max_position)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)                        # (max_position, rotary_dim / 2)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)           # (max_position, rotary_dim)
        if attention_factor != 1.0:
            cache = cache * attention_factor
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    @classmethod
    def shared(cls, head_dim: int, max_position: int, theta: float,
               scaling: Optional[dict] = None) -> "RotaryEmbedding":
        """The layer for these parameters on the current default device, built once and shared by every
        attention layer (of any model) that asks for the same: the table is read-only."""
        key = (head_dim, max_position, float(theta), json.dumps(scaling or {}, sort_keys=True, default=str),
               str(torch.get_default_device()))
        layer = _SHARED.get(key)
        if layer is None:
            layer = cls(head_dim, max_position, theta, scaling)
            _SHARED[key] = layer
        return layer

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # query (T, H, D), key (T, Hkv, D)
        return apply_rotary(positions, query, key, self.cos_sin_cache)
