"""Paged attention layer: writes this step's K/V into its layer's cache, then attends.

The layer's cache tensor (2, num_blocks, block_size, num_kv_heads, head_dim) is bound by the model
runner after the cache is allocated; the metadata comes in through forward, explicitly.

FP8 cache (`--kv-cache-dtype fp8`): the cache holds K / k_scale and V / v_scale in e4m3, and the
kernels multiply by the scales when they read it. The scales are per layer, float32 (1,) buffers
(tensors, so a captured CUDA graph reads their current values), 1.0 unless set by:
  - the checkpoint: llm-compressor / compressed-tensors write `...self_attn.k_scale` / `v_scale`,
    older FP8 checkpoints `...self_attn.k_proj.output_scale` / `v_proj.output_scale`
    (`PagedAttention.checkpoint_kv_scale` names the target, `load_kv_scale` takes the value),
    optional tensors;
  - calibration (`--calculate-kv-scales`): the first forward pass with real tokens sets them from
    amax(K) / 448 and amax(V) / 448 (`calculate_kv_scales`, switched on for that one step by the
    model runner), after which they stay fixed.
With a cache in the model dtype the scales are never read: a checkpoint's scales are ignored.

Per-layer attention features (`kernels/attention.py` defines them exactly), constructor constants so
that a captured CUDA graph stays valid:
  - `sliding_window`: a query at position i sees keys at i - sliding_window < j <= i (Mistral, Gemma,
    Phi, gpt-oss), as transformers' sliding-window causal mask;
  - `logit_softcap`: scores = cap * tanh(scores / cap) after the scale (Gemma 2);
  - `use_sinks`: a learned logit per head in the softmax denominator (gpt-oss). The layer owns the
    float32 parameter `sinks` (this rank's heads), filled from the checkpoint's `<...>.self_attn.sinks`
    (`PagedAttention.checkpoint_sinks` names our parameter) by its `weight_loader`, which reads
    only this rank's slice of the heads.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch
import torch.nn as nn

from pagoda.kernels.attention import paged_attention
from pagoda.kernels.attention_ref import check_window_and_softcap
from pagoda.kernels.cache import reshape_and_cache
from pagoda.kernels.kv_quant import FP8_DTYPE, FP8_MAX
from pagoda.kernels.metadata import AttentionMetadata

from ..distributed.parallel_state import get_tp_rank, get_tp_size

# NOTE: a calibrated scale never goes below this, so a layer whose first K or V are all zero still
# divides by a positive number (its later values then saturate rather than turn into inf / NaN).
KV_SCALE_FLOOR = 1e-6

# `<attention module>.k_scale`, `.v_scale` (compressed-tensors), `.k_proj.output_scale`,
# `.v_proj.output_scale` (older FP8 checkpoints), `.q_scale` (a query scale for FP8 attention math,
# which pagoda does not do: ignored)
_KV_SCALE_NAME = re.compile(r"^(?P<module>.+\.self_attn)\.(?:(?P<kv>[kv])_scale|(?P<proj>[kv])_proj\.output_scale"
                            r"|(?P<query>q)_scale)$")
# gpt-oss: `<attention module>.sinks`, one logit per attention head (all heads, every rank's)
_SINKS_NAME = re.compile(r"^(?P<module>.+\.self_attn)\.sinks$")


class PagedAttention(nn.Module):
    """num_heads / num_kv_heads: this rank's; sliding_window, logit_softcap, use_sinks: the module docstring."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: Optional[int] = None, logit_softcap: Optional[float] = None,
                 use_sinks: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        check_window_and_softcap(sliding_window, logit_softcap)
        if not isinstance(use_sinks, bool):
            raise ValueError(f"use_sinks must be a bool, got {use_sinks!r}")
        self.sliding_window = sliding_window
        self.logit_softcap = None if logit_softcap is None else float(logit_softcap)
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        if use_sinks:
            # float32 whatever the model dtype: the kernels add it to their fp32 softmax
            self.sinks = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32), requires_grad=False)
            self.sinks.weight_loader = self.load_sinks  # type: ignore[attr-defined]
        else:
            self.register_parameter("sinks", None)
        self.kv_cache: torch.Tensor = torch.empty(0)
        # buffers, not parameters: never random-initialised (dummy weights) nor expected in a checkpoint
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.kv_scales_from_checkpoint = False
        # set for one step by the model runner: derive the scales from this step's K / V first
        self.calculate_kv_scales = False

    @staticmethod
    def checkpoint_kv_scale(name: str) -> Optional[tuple[str, Optional[str]]]:
        """(the checkpoint's attention module prefix, 'k_scale' / 'v_scale') when `name` is a KV-cache
        scale; (prefix, None) for a tensor that is recognised but unused (q_scale); None otherwise."""
        match = _KV_SCALE_NAME.match(name)
        if match is None:
            return None
        which = match.group("kv") or match.group("proj")
        return match.group("module"), (f"{which}_scale" if which else None)

    @staticmethod
    def checkpoint_sinks(name: str) -> Optional[str]:
        """Our parameter's name (`<...>.self_attn.attn.sinks`) for a checkpoint's sinks tensor
        (`<...>.self_attn.sinks`, gpt-oss); None for any other name."""
        match = _SINKS_NAME.match(name)
        return None if match is None else f"{match.group('module')}.attn.sinks"

    def load_sinks(self, param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        """This rank's heads of the checkpoint's (num_heads * tp_size,) sinks (a lazy checkpoint tensor
        with `.name`, `.shape` and `.load(dim, start, length, dtype)`), as float32."""
        total = self.num_heads * self.tp_size
        if tuple(weight.shape) != (total,):
            raise ValueError(f"checkpoint tensor {weight.name!r} has shape {tuple(weight.shape)}, expected "
                             f"({total},): one sink logit per attention head")
        value = weight.load(dim=0, start=self.tp_rank * self.num_heads, length=self.num_heads, dtype=torch.float32)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"checkpoint tensor {weight.name!r} holds non-finite sink logits")
        param.data.copy_(value)

    def load_kv_scale(self, which: str, value: torch.Tensor, name: str) -> None:
        """A checkpoint's scale (`name`, for errors). A per-head scale collapses to its maximum: one
        scale for the layer that keeps every head's values in range (the kernels take one per layer)."""
        if which not in ("k_scale", "v_scale"):
            raise ValueError(f"which must be 'k_scale' or 'v_scale', got {which!r}")
        value = value.detach().float().reshape(-1)
        if value.numel() == 0 or not bool(torch.isfinite(value).all()) or bool((value <= 0).any()):
            raise ValueError(f"checkpoint tensor {name!r} must hold positive finite KV-cache scales, "
                             f"got {value.tolist()[:8]}")
        getattr(self, which).copy_(value.max().reshape(1))
        self.kv_scales_from_checkpoint = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        # query (T, H, D); key, value (T, Hkv, D) -> (T, H, D)
        key_cache, value_cache = self.kv_cache[0], self.kv_cache[1]
        features = dict(sliding_window=self.sliding_window, logit_softcap=self.logit_softcap, sinks=self.sinks)
        if key_cache.dtype != FP8_DTYPE:
            reshape_and_cache(key, value, key_cache, value_cache, metadata.slot_mapping)
            return paged_attention(query, key_cache, value_cache, metadata, self.scale, key, value, **features)
        if self.calculate_kv_scales and key.numel() > 0:
            self._set_scales_from(key, value)
        reshape_and_cache(key, value, key_cache, value_cache, metadata.slot_mapping, self.k_scale, self.v_scale)
        return paged_attention(query, key_cache, value_cache, metadata, self.scale, key, value,
                               self.k_scale, self.v_scale, **features)

    def _set_scales_from(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """amax / 448 of this step's K and V, in place and on the device (no host sync)."""
        for scale, x in ((self.k_scale, key), (self.v_scale, value)):
            scale.copy_((x.abs().amax().float() / FP8_MAX).clamp(min=KV_SCALE_FLOOR).reshape(1))
