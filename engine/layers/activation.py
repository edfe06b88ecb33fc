"""Gated MLP activation: SiLU(gate) * up on the merged gate/up projection."""
from __future__ import annotations

import torch
import torch.nn as nn

from pagoda.kernels.activation import silu_and_mul


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (T, 2I) -> (T, I)
        return silu_and_mul(x)
