"""GPTQ checkpoints (quant_method "gptq": AutoGPTQ / GPTQModel / Optimum), int4 or int8 weights with
group-wise fp16 scales and zero points, kept quantized (`weight_only.py` converts them to the GEMM's
format at load).

    qweight  int32 (K / pack, N)    pack = 32 / bits values of consecutive input features, lowest bits
                                    first (the transpose of the format's byte order: a transpose at load)
    qzeros   int32 (K / g, N / pack)  zero points packed along the output features; format "gptq"
                                    (v1) stores z - 1 (its kernels add 1 back), "gptq_v2" stores z
    scales   fp16 (K / g, N)        w = (q - z) * scale
    g_idx    int32 (K,)             each input feature's group (act-order, desc_act: see weight_only.py)

group_size -1 = one group over all input features (per output channel).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from .base import LinearMethod, ParamLayout, QuantizationConfig, UnquantizedLinearMethod, new_param
from .weight_only import (WeightOnlyLinearMethod, quantized_module, random_bytes_, small_scales_, unpack_int32,
                          zeros_or_constant)

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _int(config: dict[str, Any], key: str, default: Any) -> Any:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"GPTQ quantization_config {key}={value!r} must be an integer")
    return value


@dataclass(frozen=True)
class GPTQConfig(QuantizationConfig):
    """The checkpoint's `quantization_config` (quant_method "gptq"); unsupported options are a
    ValueError naming them."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    # checkpoint modules left unquantized (substrings of their names, as in vLLM)
    modules_to_not_convert: tuple[str, ...] = field(default=())
    # when given, only these modules (suffixes such as "self_attn.q_proj") are quantized
    modules_to_quantize: Optional[tuple[str, ...]] = None
    name: str = "gptq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQConfig":
        bits = _int(config, "bits", 4)
        if bits not in (4, 8):
            raise ValueError(f"GPTQ bits={bits} is not supported; supported: 4, 8")
        group_size = _int(config, "group_size", 128)
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"GPTQ group_size={group_size} must be positive or -1 (per channel)")
        checkpoint_format = str(config.get("checkpoint_format") or "gptq").lower()
        if checkpoint_format not in CHECKPOINT_FORMATS or config.get("is_marlin_format"):
            raise ValueError(f"GPTQ checkpoint_format={checkpoint_format!r} is not supported; supported: "
                             f"{list(CHECKPOINT_FORMATS)} (the marlin repacking is a different layout)")
        if config.get("dynamic"):
            raise ValueError("GPTQ 'dynamic' (per-module bits/group overrides) is not supported")
        if config.get("lm_head"):
            raise ValueError("GPTQ lm_head=True (a quantized LM head) is not supported")
        block = config.get("modules_in_block_to_quantize")
        quantize = None if not block else tuple(
            name for group in block for name in (group if isinstance(group, list) else [group]))
        return cls(bits=bits, group_size=group_size, sym=bool(config.get("sym", True)),
                   desc_act=bool(config.get("desc_act", False)), checkpoint_format=checkpoint_format,
                   modules_to_not_convert=tuple(config.get("modules_to_not_convert") or ()),
                   modules_to_quantize=quantize)

    def linear_method(self, prefix: str) -> LinearMethod:
        if not quantized_module(prefix, self.modules_to_not_convert, self.modules_to_quantize):
            return UnquantizedLinearMethod()
        return GPTQLinearMethod(self, prefix)

    def describe(self) -> str:
        group = f"group {self.group_size}" if self.group_size > 0 else "per channel"
        order = ", act-order" if self.desc_act else ""
        return f"gptq ({self.bits}-bit, {group}, {'symmetric' if self.sym else 'asymmetric'}{order})"


class GPTQLinearMethod(WeightOnlyLinearMethod):
    g_idx_name = "g_idx"

    def __init__(self, config: GPTQConfig, prefix: str) -> None:
        super().__init__(config.bits, config.group_size, prefix)
        self.config = config
        self.output_pack = self.pack                      # qzeros pack output features
        self.zero_offset = 1 if config.checkpoint_format == "gptq" else 0
        self.name = f"gptq w{config.bits}a16 " + (f"g{config.group_size}" if config.group_size > 0 else "per-channel")

    def create_checkpoint_params(self, layer: nn.Module, in_features: int, out_features: int,
                                 dtype: torch.dtype) -> None:
        groups, group = self.checkpoint_groups, self.checkpoint_group
        layer.qweight = new_param((in_features // self.pack, out_features), torch.int32,
                                  ParamLayout(output_dim=1, input_dim=0, input_pack=self.pack))
        layer.qzeros = new_param((groups, out_features // self.pack), torch.int32,
                                 ParamLayout(output_dim=1, output_pack=self.pack, input_dim=self.group_dim(0),
                                             input_pack=group))
        layer.scales = new_param((groups, out_features), torch.float16,
                                 ParamLayout(output_dim=1, input_dim=self.group_dim(0), input_pack=group))

    def checkpoint_params(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales")

    def convert(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
        qweight = layer.qweight.data
        rows, n = qweight.shape
        # word (r, n) holds k = pack*r .. pack*r + pack-1, lowest bits first, so its byte b holds the
        # values of the format's byte 4r + b of row n (k = 8r + 2b, 8r + 2b + 1 for int4; k = 4r + b for
        # int8): a transpose of bytes is the whole repacking
        converted = qweight.contiguous().view(torch.uint8).view(rows, n, 4).permute(1, 0, 2).reshape(n, rows * 4)
        zeros = unpack_int32(layer.qzeros.data, self.bits).to(torch.int16) + self.zero_offset    # (groups, N)
        stored, zero = zeros_or_constant(zeros.t(), self.bits)
        return converted.contiguous(), layer.scales.data.t(), stored, zero

    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        random_bytes_(layer.qweight, generator)
        small_scales_(layer.scales, self.bits, generator)
        if self.config.sym:          # the symmetric midpoint as the checkpoint stores it
            stored = (1 << (self.bits - 1)) - self.zero_offset
            byte = stored | (stored << 4) if self.bits == 4 else stored
            layer.qzeros.data.view(torch.uint8).fill_(byte)
        else:
            random_bytes_(layer.qzeros, generator)
        self.init_dummy_g_idx(layer)
