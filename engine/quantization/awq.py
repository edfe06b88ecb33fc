"""AWQ checkpoints (quant_method "awq", AutoAWQ's GEMM layout): int4 weights with group-wise fp16
scales and zero points, kept quantized (`weight_only.py` converts them to the GEMM's format at load).

    qweight  int32 (K, N / 8)       8 output features per int32, nibble i holding feature
                                    8j + ORDER[i], ORDER = 0 2 4 6 1 3 5 7 (AutoAWQ's interleave)
    qzeros   int32 (K / g, N / 8)   zero points, packed the same way; w = (q - z) * scale
    scales   fp16 (K / g, N)

Other AWQ layouts (GEMV, GEMV-fast, Marlin, llm-awq's) pack differently and are refused, as is
zero_point=False (no GEMM-layout producer writes it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from pagoda.kernels.weight_only import pack_int4

from .base import LinearMethod, ParamLayout, QuantizationConfig, UnquantizedLinearMethod, new_param
from .weight_only import (WeightOnlyLinearMethod, quantized_module, random_bytes_, small_scales_, unpack_int32,
                          zeros_or_constant)

# output feature 8j + c sits in nibble UNDO_ORDER[c] of word j (the inverse of ORDER above)
UNDO_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
GEMM_VERSIONS = ("gemm", "exllama")            # both store the GEMM layout


@dataclass(frozen=True)
class AWQConfig(QuantizationConfig):
    """The checkpoint's `quantization_config` (quant_method "awq"; transformers' or AutoAWQ's key names)."""

    bits: int = 4
    group_size: int = 128
    modules_to_not_convert: tuple[str, ...] = field(default=())
    name: str = "awq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AWQConfig":
        bits = config.get("bits", config.get("w_bit", 4))
        if bits != 4:
            raise ValueError(f"AWQ bits={bits!r} is not supported; supported: 4")
        group_size = config.get("group_size", config.get("q_group_size", 128))
        if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
            raise ValueError(f"AWQ group_size={group_size!r} must be a positive integer or -1 (per channel)")
        if not config.get("zero_point", True):
            raise ValueError("AWQ zero_point=False is not supported (only the GEMM layout with zero points)")
        version = str(config.get("version") or "gemm").lower()
        if version not in GEMM_VERSIONS:
            raise ValueError(f"AWQ version={version!r} is not supported; supported: {list(GEMM_VERSIONS)} "
                             f"(the GEMM layout)")
        backend = str(config.get("backend") or "autoawq").lower()
        if backend not in ("autoawq", "auto"):
            raise ValueError(f"AWQ backend={backend!r} is not supported; supported: 'autoawq' (the GEMM layout)")
        return cls(bits=4, group_size=group_size,
                   modules_to_not_convert=tuple(config.get("modules_to_not_convert") or ()))

    def linear_method(self, prefix: str) -> LinearMethod:
        if not quantized_module(prefix, self.modules_to_not_convert, None):
            return UnquantizedLinearMethod()
        return AWQLinearMethod(self, prefix)

    def describe(self) -> str:
        group = f"group {self.group_size}" if self.group_size > 0 else "per channel"
        return f"awq ({self.bits}-bit, {group}, zero points)"


def _unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 (R, C) in AWQ's interleaved order -> uint8 (R, 8C) in output-feature order."""
    nibbles = unpack_int32(words, 4).view(words.shape[0], -1, 8)          # (R, C, 8), nibble order
    undo = torch.tensor(UNDO_ORDER, device=words.device)
    return nibbles.index_select(2, undo).reshape(words.shape[0], -1)


class AWQLinearMethod(WeightOnlyLinearMethod):
    output_pack = 8                       # qweight and qzeros pack 8 output features per int32

    def __init__(self, config: AWQConfig, prefix: str) -> None:
        super().__init__(4, config.group_size, prefix)
        self.name = "awq w4a16 " + (f"g{config.group_size}" if config.group_size > 0 else "per-channel")

    def create_checkpoint_params(self, layer: nn.Module, in_features: int, out_features: int,
                                 dtype: torch.dtype) -> None:
        groups, group = self.checkpoint_groups, self.checkpoint_group
        layer.qweight = new_param((in_features, out_features // 8), torch.int32,
                                  ParamLayout(output_dim=1, output_pack=8, input_dim=0))
        layer.qzeros = new_param((groups, out_features // 8), torch.int32,
                                 ParamLayout(output_dim=1, output_pack=8, input_dim=self.group_dim(0), input_pack=group))
        layer.scales = new_param((groups, out_features), torch.float16,
                                 ParamLayout(output_dim=1, input_dim=self.group_dim(0), input_pack=group))

    def checkpoint_params(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales")

    def convert(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
        qweight = pack_int4(_unpack_awq(layer.qweight.data).t())               # (N, K/2)
        stored, zero = zeros_or_constant(_unpack_awq(layer.qzeros.data).t(), 4)
        return qweight, layer.scales.data.t(), stored, zero

    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        random_bytes_(layer.qweight, generator)
        random_bytes_(layer.qzeros, generator)
        small_scales_(layer.scales, 4, generator)
