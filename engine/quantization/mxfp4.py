"""MXFP4 checkpoints (gpt-oss): the mixture-of-experts weights in OCP microscaling FP4, every other
tensor in the model dtype; pagoda dequantizes the experts to the model dtype at load.

The format, as the gpt-oss releases store it (`quantization_config: {"quant_method": "mxfp4"}`):

    <experts>.gate_up_proj_blocks  uint8 (E, 2N, H / 32, 16)   <experts>.gate_up_proj_scales  uint8 (E, 2N, H / 32)
    <experts>.down_proj_blocks     uint8 (E, H, N / 32, 16)    <experts>.down_proj_scales     uint8 (E, H, N / 32)

- rows: the projection's output features (torch.nn.Linear's orientation); gate_up's alternate gate,
  up, gate, up, ... (the same interleaving as the bf16 tensors);
- a block: 32 consecutive input features in 16 bytes, two e2m1 values per byte, element 2i in the
  low nibble and 2i + 1 in the high one; e2m1 = sign (bit 3), exponent (bits 2-1, bias 1), mantissa
  (bit 0): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives;
- a scale: one e8m0 byte per block, the power of two 2^(byte - 127) that multiplies all 32 values
  (255 is NaN in the format and is refused).

`dequantized_checkpoint` pairs each `_blocks` tensor with its `_scales` into one lazy tensor named
without the suffix (`<experts>.gate_up_proj`), presented in the input-major orientation of
transformers' in-memory gpt-oss experts ((E, H, 2N), (E, N, H)): the model loads it exactly as a
bf16 checkpoint's stacked tensor. A slice (tensor parallel: a run of output rows or of input
features; expert parallel: whole experts) reads only the blocks it covers, and the values are
decoded on the model's device.

NOTE: 4.25 bits per value on disk, 16 in bfloat16: dequantized, the experts take ~3.8x their
checkpoint size in memory (gpt-oss-20b: ~38 GB of bf16 experts, gpt-oss-120b: ~230 GB, to split over
GPUs); running MXFP4 blocks directly in the fused MoE kernel is what would keep the small footprint.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from ..model_loader.weights import LazyWeight
from .base import LinearMethod, QuantizationConfig, UnquantizedLinearMethod

BLOCK_SIZE = 32                 # values sharing one scale
BLOCK_BYTES = BLOCK_SIZE // 2   # two e2m1 values per byte
SCALE_BIAS = 127                # e8m0: 2^(byte - 127)
SCALE_NAN = 255
# e2m1 by its 4-bit code (sign in bit 3)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# values decoded per chunk: bounds the transient index / float32 tensors of one call
_CHUNK_VALUES = 1 << 24

_PACKED_NAME = re.compile(r"^(?P<base>.+)_(?P<part>blocks|scales)$")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 blocks (..., G, 16) and uint8 e8m0 scales (..., G) -> (..., G * 32) values in `dtype`, on
    the blocks' device (see the module docstring for the bit layout)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK_BYTES or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks of shape {tuple(blocks.shape)} need scales of shape "
                         f"{tuple(blocks.shape[:-1])} and a last dimension of {BLOCK_BYTES} bytes; got scales "
                         f"of shape {tuple(scales.shape)}")
    *prefix, groups, _ = blocks.shape
    flat_blocks = blocks.reshape(-1, BLOCK_BYTES)
    flat_scales = scales.reshape(-1)
    out = torch.empty(flat_blocks.shape[0], BLOCK_SIZE, dtype=dtype, device=blocks.device)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    step = max(1, _CHUNK_VALUES // BLOCK_SIZE)
    for first in range(0, flat_blocks.shape[0], step):
        chunk = flat_blocks[first:first + step]
        codes = torch.stack((chunk & 0x0F, chunk >> 4), dim=-1).reshape(chunk.shape[0], BLOCK_SIZE)
        exponents = flat_scales[first:first + step].to(torch.int32) - SCALE_BIAS
        values = torch.ldexp(lut[codes.long()], exponents[:, None].float())
        out[first:first + step] = values.to(dtype)
    return out.reshape(*prefix, groups * BLOCK_SIZE)


class Mxfp4Weight(LazyWeight):
    """One expert tensor from its MXFP4 `_blocks` (E, R, G, 16) and `_scales` (E, R, G), read as the
    (E, G * 32, R) input-major tensor of the model dtype; decoded on `device` when loaded."""

    def __init__(self, name: str, blocks: LazyWeight, scales: LazyWeight, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = tuple(blocks.shape)
        if len(shape) != 4 or shape[-1] != BLOCK_BYTES or tuple(scales.shape) != shape[:-1]:
            raise ValueError(f"checkpoint tensors {blocks.name!r} {shape} and {scales.name!r} "
                             f"{tuple(scales.shape)} are not MXFP4 expert blocks (E, rows, groups, {BLOCK_BYTES}) "
                             f"with scales (E, rows, groups)")
        experts, rows, groups, _ = shape
        super().__init__(name, (experts, groups * BLOCK_SIZE, rows))
        self.blocks, self.scales = blocks, scales
        self.dtype, self.device = dtype, device

    def _load(self, dim: Optional[int], start: int, length: int) -> torch.Tensor:
        trim: Optional[tuple[int, int]] = None
        if dim is None:
            packed = dict(dim=None)
        elif dim == 0:                                       # whole experts
            packed = dict(dim=0, start=start, length=length)
        elif dim == 2:                                       # output rows: the blocks' dim 1
            packed = dict(dim=1, start=start, length=length)
        else:                                                # input features: whole blocks, then trimmed
            first, last = start // BLOCK_SIZE, -(-(start + length) // BLOCK_SIZE)
            packed = dict(dim=2, start=first, length=last - first)
            trim = (start - first * BLOCK_SIZE, length)
        blocks = (self.blocks.load() if dim is None else self.blocks.load(**packed)).to(self.device)
        scales = (self.scales.load() if dim is None else self.scales.load(**packed)).to(self.device)
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise ValueError(f"checkpoint tensors {self.blocks.name!r} / {self.scales.name!r} must be uint8 "
                             f"(MXFP4 blocks and e8m0 scales), got {blocks.dtype} / {scales.dtype}")
        if bool((scales == SCALE_NAN).any()):
            raise ValueError(f"checkpoint tensor {self.scales.name!r} holds the e8m0 NaN scale {SCALE_NAN}")
        values = dequantize_mxfp4(blocks, scales, self.dtype)              # (E, R, G * 32)
        if trim is not None:
            values = values.narrow(2, *trim)
        return values.transpose(1, 2).contiguous()


def dequantized_checkpoint(weights: Iterable[tuple[str, LazyWeight]], dtype: torch.dtype,
                           device: torch.device) -> Iterator[tuple[str, LazyWeight]]:
    """The checkpoint's tensors with each `<name>_blocks` / `<name>_scales` pair replaced by one
    `Mxfp4Weight` named `<name>` (yielded once both have been seen: a checkpoint's shards may hold
    them apart); every other tensor as it is. A half pair left over is a ValueError naming it."""
    pending: dict[str, dict[str, LazyWeight]] = {}
    for name, weight in weights:
        match = _PACKED_NAME.match(name)
        if match is None:
            yield name, weight
            continue
        parts = pending.setdefault(match["base"], {})
        if match["part"] in parts:
            raise ValueError(f"checkpoint tensor {name!r} appears twice")
        parts[match["part"]] = weight
        if len(parts) == 2:
            del pending[match["base"]]
            yield match["base"], Mxfp4Weight(match["base"], parts["blocks"], parts["scales"], dtype, device)
    if pending:
        base, parts = next(iter(pending.items()))
        have, lacks = next(iter(parts)), ({"blocks", "scales"} - set(parts)).pop()
        raise ValueError(f"checkpoint tensor {base}_{have!s} has no matching {base}_{lacks} (MXFP4 tensors "
                         f"come in pairs)")


class _Mxfp4CheckpointConfig(BaseModel):
    """config.json's quantization_config of an MXFP4 checkpoint (gpt-oss, transformers)."""
    model_config = ConfigDict(extra="ignore")

    quant_method: Literal["mxfp4"]
    modules_to_not_convert: Optional[list[str]] = None


class Mxfp4Config(QuantizationConfig):
    """quant_method "mxfp4": only the experts are MXFP4 in such a checkpoint, and they are
    dequantized at load (`dequantized_checkpoint`, by the model family that has them); every linear
    layer runs unquantized."""

    name = "mxfp4"

    def __init__(self, modules_to_not_convert: tuple[str, ...] = ()) -> None:
        self.modules_to_not_convert = modules_to_not_convert

    @classmethod
    def from_checkpoint(cls, config: dict[str, Any]) -> "Mxfp4Config":
        try:
            parsed = _Mxfp4CheckpointConfig.model_validate(config)
        except ValidationError as error:
            raise ValueError(f"the checkpoint's MXFP4 quantization_config is invalid: {error}") from None
        return cls(tuple(parsed.modules_to_not_convert or ()))

    def linear_method(self, prefix: str) -> LinearMethod:
        return UnquantizedLinearMethod()

    def describe(self) -> str:
        return "mxfp4 experts dequantized at load (all weights in the model dtype)"
