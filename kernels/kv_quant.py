"""The FP8 KV cache's numerics, shared by the cache writers (`cache*.py`) and the attention readers
(`attention*.py`), below both of them.

An FP8 cache (torch.float8_e4m3fn) stores K / k_scale and V / v_scale, saturated to the e4m3 range
[-448, 448] (a cast alone is not guaranteed to saturate: the format has no inf, and out-of-range
values may become NaN) and rounded to nearest even; readers take stored * scale. The scales are
per-layer float32 tensors of one element (tensors, not floats, so that a captured CUDA graph reads
their current values).
"""
from __future__ import annotations

from typing import Optional

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)         # 448


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_DTYPE


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated and rounded to nearest-even e4m3: what an FP8 cache stores for x."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The real values of FP8 cache contents: stored * scale, in `dtype`."""
    return (x.float() * scale).to(dtype)


def check_cache_pair(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """A layer's K and V caches are read with one set of offsets: same dtype, shape and strides."""
    if value_cache.dtype != key_cache.dtype:
        raise ValueError(f"value_cache dtype {value_cache.dtype} != key_cache dtype {key_cache.dtype}")
    if value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        raise ValueError(f"value_cache shape/strides {tuple(value_cache.shape)}/{value_cache.stride()} must match "
                         f"key_cache {tuple(key_cache.shape)}/{key_cache.stride()}")


def check_scales(cache: torch.Tensor, k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor]) -> None:
    """An FP8 cache needs both scales, one float32 element each, on the cache's device; other
    caches ignore them."""
    if not is_fp8(cache):
        return
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"{name} is required with an FP8 KV cache ({cache.dtype})")
        if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != cache.device:
            raise ValueError(f"{name} must be a one-element float32 tensor on {cache.device}, got "
                             f"shape {tuple(scale.shape)} {scale.dtype} on {scale.device}")
