"""Gated MLP activations on the merged gate/up projection: out = act(x[:, :I]) * x[:, I:].

- silu_and_mul: SiLU (Llama, Mistral, Qwen, Phi-3).
- gelu_tanh_and_mul: GeLU with the tanh approximation (Hugging Face `gelu_pytorch_tanh`: Gemma 2 / 3).

Shapes: x (num_tokens, 2 * intermediate) from the merged gate/up projection; out (num_tokens, intermediate).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import use_triton


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        from . import activation_triton

        return activation_triton.silu_and_mul(x)
    return silu_and_mul_ref(x)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        from . import activation_triton

        return activation_triton.gelu_tanh_and_mul(x)
    return gelu_tanh_and_mul_ref(x)


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
