"""Paged attention: new tokens attend (causally) to their context in the paged KV cache.

The caller has already written the step's new K/V into the cache (`kernels.cache.reshape_and_cache`),
so one code path serves a whole prompt, a chunk of a prompt that continues earlier chunks or a
prefix-cache hit, and a decode token: every query reads all of its context through the block table.

Shapes: query (num_tokens, num_heads, head_dim); key_cache / value_cache
(num_blocks, block_size, num_kv_heads, head_dim); output like query. GQA: query head h reads KV head
h // (num_heads // num_kv_heads).

FP8 caches (torch.float8_e4m3fn) hold K / k_scale and V / v_scale (`kv_quant.py`); every path
reads them back as stored * scale, the scales being one-element float32 tensors (a CUDA graph
captures their storage, so a value changed in place is seen by every replay).

Per-layer features (Python constants of a layer, so a captured CUDA graph stays valid; every path
implements all three, alone or together, with any cache dtype):

    sliding_window  (Mistral, Gemma 2/3, Phi, gpt-oss) the query at position i sees the keys at
                    positions j with i - sliding_window < j <= i: itself and the sliding_window - 1
                    before it, as transformers' `sliding_window_causal_mask_function`. The kernels
                    never read the cache blocks wholly before a query tile's window (the speed of a
                    windowed layer), and decode splits cover only the window.
    logit_softcap   (Gemma 2) score = logit_softcap * tanh(score / logit_softcap), after the scale
                    and before the mask and the softmax.
    sinks           (gpt-oss) (num_heads,) float32, one learned logit per query head that joins the
                    softmax denominator only: p_j = exp(s_j) / (exp(sinks[h]) + sum_k exp(s_k)). It
                    carries no value, so the rows sum to less than one. Not soft-capped.

    attention.py         paged_attention, the dispatch: the module callers import
    attention_ref.py     paged_attention_ref: the torch reference, the oracle of the other two
    attention_cpu.py     the grouped CPU path: the reference's contract with less padding
    attention_triton.py  the Triton kernels (imported on first CUDA call: Triton is slow to import)
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention_cpu import paged_attention_cpu
from .attention_ref import paged_attention_ref
from .backend import use_triton
from .metadata import AttentionMetadata

# paged_attention_ref is re-exported: benchmarks and tests compare against it from here
__all__ = ["paged_attention", "paged_attention_ref"]


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    key: Optional[torch.Tensor] = None,
    value: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    *,
    sliding_window: Optional[int] = None,
    logit_softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the grouped CPU path on the CPU, the torch reference elsewhere.

    key, value: optionally this step's new K/V (T, Hkv, D), already in the cache; the CPU path reads
    a fresh prompt's context from them instead of gathering it back out of the cache.
    k_scale, v_scale: (1,) float32, required for (and read only with) an FP8 cache.
    sliding_window (int >= 1), logit_softcap (float > 0), sinks ((num_heads,) float32): the layer's
    features (module docstring); None = off.
    """
    features = dict(sliding_window=sliding_window, logit_softcap=logit_softcap, sinks=sinks)
    if use_triton(query):
        from . import attention_triton

        return attention_triton.paged_attention(query, key_cache, value_cache, metadata, scale, k_scale, v_scale,
                                                **features)
    if query.device.type == "cpu":
        return paged_attention_cpu(query, key_cache, value_cache, metadata, scale, key, value, k_scale, v_scale,
                                   **features)
    return paged_attention_ref(query, key_cache, value_cache, metadata, scale, k_scale, v_scale, **features)
