"""Gated MLP activations on the merged gate/up projection: act(gate) * up.

SiluAndMul (SiLU: Llama, Mistral, Qwen, Phi-3) and GeluTanhAndMul (GeLU with the tanh approximation,
Hugging Face's `gelu_pytorch_tanh`: Gemma 2 / 3)."""
from __future__ import annotations

import torch
import torch.nn as nn

from pagoda.kernels.activation import gelu_tanh_and_mul, silu_and_mul


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (T, 2I) -> (T, I)
        return silu_and_mul(x)


class GeluTanhAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (T, 2I) -> (T, I)
        return gelu_tanh_and_mul(x)
