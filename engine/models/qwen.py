"""Qwen2 (bias on the q/k/v projections) and Qwen3 (per-head RMSNorm on q and k): Llama decoders
with one switch each."""
from __future__ import annotations

from .llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
