"""RMSNorm layer; with a residual it fuses the residual add (see pagoda.kernels.norm), and after a
row-parallel layer also the tensor-parallel all-reduce (`reduce_add`)."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from pagoda.kernels.norm import fused_add_rms_norm, rms_norm

from ..distributed.parallel_state import tp_all_reduce_add_rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)

    def reduce_add(self, partial: torch.Tensor, residual: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, new residual) where new residual = residual + partial summed over TP ranks
        (`partial`: a RowParallelLinear(reduce_results=False) output of that `slot`)."""
        return tp_all_reduce_add_rms_norm(partial, residual, self.weight, self.eps, slot)
