"""RMSNorm layer; with a residual it fuses the residual add (see pagoda.kernels.norm), and after a
row-parallel layer also the tensor-parallel all-reduce (`reduce_add`). GemmaRMSNorm: Gemma's
x * (1 + w) variant on the same kernels."""
from __future__ import annotations

from typing import Any, Optional, Union

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


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w), the checkpoint holding w (zero-centred).

    The parameter holds 1 + w, in float32, from the moment it is loaded (its weight loader adds the 1),
    so the RMSNorm kernels (`rms_norm`, `fused_add_rms_norm`, the tensor-parallel `reduce_add`), which
    multiply by their weight, compute Gemma's norm unchanged, at no cost per step.
    NOTE: float32 because Hugging Face adds the 1 in float32: 1 + w rounded to bf16 would lose most of
    a small w's bits (1 + 0.01 -> 1.0078). The kernels then return float32 (the promoted dtype), cast
    back to the input dtype here. They round the normalised x to the input dtype before multiplying,
    as for Llama; Hugging Face's Gemma rounds once, after: in bf16 results may differ in the last bit.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(hidden_size, eps, torch.float32)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    @staticmethod
    def weight_loader(param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        """Loads checkpoint tensor `weight` (w, a lazy tensor) as 1 + w in float32."""
        value = weight.load(dtype=torch.float32)
        if value.shape != param.shape:
            raise ValueError(f"checkpoint tensor {weight.name} has shape {tuple(value.shape)}, expected "
                             f"{tuple(param.shape)}")
        param.data.copy_(value + 1.0)

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if residual is None:
            return rms_norm(x, self.weight, self.eps).to(x.dtype)
        normed, summed = fused_add_rms_norm(x, residual, self.weight, self.eps)
        return normed.to(x.dtype), summed

    def reduce_add(self, partial: torch.Tensor, residual: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        normed, summed = super().reduce_add(partial, residual, slot)
        return normed.to(residual.dtype), summed
