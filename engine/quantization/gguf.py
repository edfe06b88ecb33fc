"""GGUF files kept quantized: each linear layer (and the token embedding / LM head) holds the file's own
blocks, converted exactly (no re-quantization) into the one weight-only format the kernels take,
`kernels.weight_only.GroupQuantWeight`, whose `dequantize` equals `gguf.quants.dequantize` bit for bit.

    block type   GroupQuantWeight                                            bits/weight (file / held)
    Q4_0         bits 4, group 32, fp16 scales, zero 8                        4.5  / 4.5
    Q4_1         bits 4, group 32, fp16 scales, fp16 mins                     5.0  / 5.0
    Q8_0         bits 8 (int8 + 128), group 32, fp16 scales, zero 128         8.5  / 8.5
    Q4_K         bits 4, group 32, uint8 6-bit sub-scales and sub-mins,       4.5  / 4.625
                 fp16 super_scales = d and super_mins = -dmin per 256
    Q6_K         bits 6 (a 4-bit and a 2-bit plane, as the file's ql / qh),   6.56 / 6.56
                 group 16, zero 32, int8 sub-scales, fp16 super_scales = d per 256
    Q5_0         bits 6 (5 used), group 32, fp16 scales, zero 16              5.5  / 6.5
    Q5_1         bits 6 (5 used), group 32, fp16 scales, fp16 mins            6.0  / 7.0
    Q5_K         bits 6 (5 used), group 32, as Q4_K's scales and mins          5.5  / 6.625
    F32/F16/BF16 (norms, biases and the odd float weight) load as before, in the model dtype

The 5-bit types (Q5_K_M files, and the Q5_0 / Q5_1 that llama.cpp writes where a tensor's rows are
not whole 256-blocks) ride on the 6-bit planes: one bit a value more than the file, still ~2.5x
smaller than bf16. Other block types (Q2_K, Q3_K, IQ*) are refused by name.

Loading: a layer's parameter `weight` is a flat uint8 buffer of this rank's raw blocks, one region per
fused shard (q/k/v, gate/up): a column-parallel layer reads its rows, a row-parallel one its blocks
along the input dim (a tensor-parallel size that splits a block is an error naming the layer). After
loading, `process_weights_after_loading` unpacks each region into a GroupQuantWeight; consecutive
shards of one block type are concatenated into one (one GEMM), while a fused layer whose shards differ
(Q4_K_M files mix Q4_K and Q6_K inside q/k/v) multiplies per run of equal types and concatenates the
outputs. The raw buffer is then dropped: the converted tensors, registered as buffers, are what stays.

Where: on CUDA a GGUF file stays quantized by default (the Triton GEMM dequantizes in registers). On
CPU it is dequantized to the compute dtype at load unless `--quantization gguf` is passed: the CPU path
dequantizes the whole weight on every call, which costs far more than the matmul itself; keeping it
quantized there saves memory, not time.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from pagoda.kernels.weight_only import GroupQuantWeight, dequantize, pack_int4, pack_int6, weight_only_linear

from ..layers.embedding import EmbeddingMethod
from ..model_loader.gguf_index import read_gguf_index
from ..model_loader.weights import GGUF_SKIPPED_NAMES, gguf_to_hf_name
from .base import (LinearMethod, ParamLayout, QuantizationConfig, UnquantizedLinearMethod, checkpoint_modules,
                   new_param)

# block type -> (values per block, bytes per block), as gguf.GGML_QUANT_SIZES
BLOCK_SIZES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q6_K": (256, 210),
               "Q5_0": (32, 22), "Q5_1": (32, 24), "Q5_K": (256, 176), "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2)}
SUPPORTED_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K")
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# bytes one block takes once converted (qweight + scales + mins + super-scales): see the table above
HELD_BYTES_PER_BLOCK = {"Q4_0": 16 + 2, "Q4_1": 16 + 2 + 2, "Q8_0": 32 + 2, "Q4_K": 128 + 8 + 8 + 2 + 2,
                        "Q6_K": 128 + 64 + 16 + 2, "Q5_0": 16 + 8 + 2, "Q5_1": 16 + 8 + 2 + 2,
                        "Q5_K": 128 + 64 + 8 + 8 + 2 + 2}
# fp16 fields of a block (byte offsets) that `init_dummy` sets to a small scale: random bytes elsewhere
_SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,), "Q5_0": (0,),
                  "Q5_1": (0, 2), "Q5_K": (0, 2)}


class GGUFConfig(QuantizationConfig):
    """The block type and shape of every 2-D weight of a GGUF file, under Hugging Face names (from the
    cached tensor index: the vocabulary is not parsed). Picklable: names, types and shapes only."""

    name = "gguf"

    def __init__(self, file: str, tensors: dict[str, tuple[str, tuple[int, int]]]) -> None:
        self.file = file
        self.tensors = tensors          # hf weight name -> (block type, (rows, input features))

    @classmethod
    def from_file(cls, file: Path) -> "GGUFConfig":
        """Raises ValueError naming the tensor for a block type that cannot stay quantized."""
        index = read_gguf_index(file)
        tensors: dict[str, tuple[str, tuple[int, int]]] = {}
        for tensor in index.tensors:
            hf_name = gguf_to_hf_name(tensor.name)
            if tensor.name in GGUF_SKIPPED_NAMES or hf_name is None or len(tensor.shape) != 2:
                continue        # 1-D norms/biases load as before; unknown names are the loader's error
            kind = tensor.tensor_type.name
            if kind not in SUPPORTED_TYPES and kind not in FLOAT_TYPES:
                raise ValueError(f"GGUF tensor {tensor.name!r} in {str(file)!r} has block type {kind}, which "
                                 f"cannot be kept quantized; supported: {list(SUPPORTED_TYPES)} (and "
                                 f"{list(FLOAT_TYPES)}, loaded as floats)")
            columns, rows = (int(d) for d in tensor.shape)          # GGUF lists dims fastest-first
            tensors[hf_name] = (kind, (rows, columns))
        return cls(str(file), tensors)

    def _method(self, names: list[str], prefix: str) -> Optional["GGUFLinearMethod"]:
        entries = [self.tensors.get(name) for name in names]
        if any(entry is None for entry in entries) or all(entry[0] in FLOAT_TYPES for entry in entries):
            return None
        return GGUFLinearMethod(prefix, names, [entry[0] for entry in entries])

    def linear_method(self, prefix: str) -> LinearMethod:
        """Float weights (and a layer the file lacks, which loading then reports) stay unquantized."""
        names = [f"{module}.weight" for module in checkpoint_modules(prefix)]
        return self._method(names, prefix) or UnquantizedLinearMethod()

    def embedding_method(self, prefix: str) -> Optional["GGUFLinearMethod"]:
        """The token embedding's / LM head's method (`model.embed_tokens`, `lm_head`); None if float."""
        return self._method([f"{prefix}.weight"], prefix)

    def held_bytes(self) -> int:
        """What the kept-quantized weights take once converted (all ranks together)."""
        total = 0
        for kind, (rows, columns) in self.tensors.values():
            if kind in SUPPORTED_TYPES:
                total += rows * columns // BLOCK_SIZES[kind][0] * HELD_BYTES_PER_BLOCK[kind]
        return total

    def describe(self) -> str:
        """e.g. "GGUF Q4_1 (210 tensors), Q8_0 (1) kept quantized, 96 MB"."""
        counts = Counter(kind for kind, _ in self.tensors.values() if kind in SUPPORTED_TYPES)
        parts = [f"{kind} ({count}{' tensors' if i == 0 else ''})" for i, (kind, count) in enumerate(
            sorted(counts.items(), key=lambda item: (-item[1], item[0])))]
        if not parts:
            return "GGUF float weights only (nothing kept quantized)"
        return f"GGUF {', '.join(parts)} kept quantized, {self.held_bytes() / 1e6:.0f} MB"


@dataclass(frozen=True)
class _RawShard:
    """One fused shard's region of the raw `weight` buffer: `rows` rows of `width` bytes at `offset`."""
    kind: str
    rows: int
    width: int
    offset: int

    def view(self, raw: torch.Tensor) -> torch.Tensor:
        return raw[self.offset : self.offset + self.rows * self.width].view(self.rows, self.width)


Piece = Union[GroupQuantWeight, torch.Tensor]     # a run of equal-type shards; a float one is a dense matrix


class GGUFLinearMethod(EmbeddingMethod):
    """One layer's GGUF weight (see the module docstring); also serves the embedding and the LM head."""

    def __init__(self, prefix: str, tensor_names: list[str], kinds: list[str]) -> None:
        self.prefix = prefix
        self.tensor_names = tensor_names
        self.kinds = kinds
        self.name = "gguf-" + "+".join(sorted(set(kinds)))
        self.shards: list[_RawShard] = []
        self.pieces: list[Piece] = []
        self.piece_sizes: list[int] = []
        self.dtype = torch.float32

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        self.dtype = dtype
        offset = 0
        for name, kind, rows in zip(self.tensor_names, self.kinds, output_sizes, strict=True):
            block_size, type_size = BLOCK_SIZES[kind]
            if in_features % block_size:
                raise ValueError(f"layer {self.prefix}: this rank's {in_features} input features are not whole "
                                 f"{kind} blocks of {block_size} values ({name}); this tensor_parallel_size "
                                 f"splits a quantization block")
            width = in_features // block_size * type_size
            self.shards.append(_RawShard(kind, rows, width, offset))
            offset += rows * width
        # NOTE: flat, because fused shards of different block types have rows of different byte widths
        layer.weight = new_param((offset,), torch.uint8, ParamLayout(output_dim=None, input_dim=None))
        # NOTE: zeroed: the padding rows of the last vocabulary shard are never loaded, and garbage there
        # could decode to inf/NaN scales that a masked embedding lookup (NaN * 0) would still spread
        layer.weight.data.zero_()
        layer.weight.weight_loader = functools.partial(self.weight_loader, layer)  # type: ignore[attr-defined]

    def weight_loader(self, layer: nn.Module, param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        """Copies this rank's raw blocks of checkpoint tensor `weight` (rows from `layer.shard_slice`)."""
        shard = layer.shard_slice(shard_id)
        region = self.shards[shard.index]
        if not hasattr(weight, "load_blocks"):
            raise ValueError(f"layer {self.prefix}: checkpoint tensor {weight.name} is not a GGUF tensor")
        if weight.tensor_type != region.kind or len(weight.shape) != 2:
            raise ValueError(f"layer {self.prefix}: checkpoint tensor {weight.name} is {weight.tensor_type} of "
                             f"shape {weight.shape}, expected a 2-D {region.kind} weight")
        if shard.out_len == 0:                       # a rank whose vocabulary shard is all padding
            return
        block_size, type_size = BLOCK_SIZES[region.kind]
        block_start, block_count = shard.in_start // block_size, shard.in_len // block_size
        if shard.in_start % block_size or shard.in_len % block_size or block_count * type_size != region.width:
            raise ValueError(f"layer {self.prefix}: input features [{shard.in_start}, "
                             f"{shard.in_start + shard.in_len}) of {weight.name} (shape {weight.shape}) are not "
                             f"whole {region.kind} blocks of this layer's {region.width // type_size}")
        if shard.out_len > region.rows:
            raise ValueError(f"layer {self.prefix}: checkpoint tensor {weight.name} gives {shard.out_len} rows, "
                             f"the layer holds {region.rows}")
        raw = weight.load_blocks(shard.out_start, shard.out_len, block_start, block_count)
        region.view(param.data)[: shard.out_len].copy_(raw)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        raw = layer.weight.data
        self.pieces, self.piece_sizes = [], []
        for shard in self.shards:
            piece = _convert(shard.view(raw), shard.kind, self.dtype)
            if self.pieces and _same_format(self.pieces[-1], piece):
                self.pieces[-1] = _concat(self.pieces[-1], piece)
                self.piece_sizes[-1] += shard.rows
            else:
                self.pieces.append(piece)
                self.piece_sizes.append(shard.rows)
        del layer.weight                             # the raw bytes: the converted pieces replace them
        for index, piece in enumerate(self.pieces):
            for field, tensor in _tensors(piece).items():
                layer.register_buffer(f"gguf{index}_{field}", tensor, persistent=False)

    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Random blocks whose fp16 scales are small and finite (random bytes there could be inf/NaN)."""
        raw = layer.weight.data
        small = torch.tensor([2.0 ** -16], dtype=torch.float16).view(torch.uint8).to(raw.device)
        for shard in self.shards:
            region = shard.view(raw)
            if shard.kind in FLOAT_TYPES:
                region.view(FLOAT_TYPES[shard.kind]).uniform_(-1e-3, 1e-3, generator=generator)
                continue
            region.copy_(torch.randint(0, 256, region.shape, generator=generator, dtype=torch.uint8,
                                       device=region.device))
            blocks = region.view(shard.rows, -1, BLOCK_SIZES[shard.kind][1])
            for offset in _SCALE_OFFSETS[shard.kind]:
                blocks[..., offset : offset + 2] = small

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor],
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if len(self.pieces) == 1:
            return _matmul(x, self.pieces[0], bias, out)
        # shards of different block types: one GEMM each, written side by side (into `out` when given)
        if out is None:
            out = torch.empty(x.shape[0], sum(self.piece_sizes), dtype=x.dtype, device=x.device)
        start = 0
        for piece, size in zip(self.pieces, self.piece_sizes):
            _matmul(x, piece, None if bias is None else bias[start : start + size], out[:, start : start + size])
            start += size
        return out

    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The rows of `ids` in the model dtype, only those rows dequantized."""
        (piece,) = self.pieces
        if isinstance(piece, torch.Tensor):
            return F.embedding(ids, piece)
        rows = {field: tensor[ids] for field, tensor in _tensors(piece).items()}
        return dequantize(replace(piece, **rows)).to(self.dtype)


# ------------------------------------------------------------------------------- blocks -> the format


def _fp16(fields: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian fp16 bytes -> (...) float16."""
    return fields.contiguous().view(torch.float16).squeeze(-1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) bytes -> (..., 2, n): low nibbles then high nibbles (gguf's order within a block)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-2)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., n, 8): bit j of byte b at [b, j], low bit first."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return (packed[..., None] >> shifts) & 1


def _convert(raw: torch.Tensor, kind: str, dtype: torch.dtype) -> Piece:
    """(rows, blocks * type_size) raw bytes of one block type -> the format (see the module docstring).
    GGUF orders the values of a block by nibble (all low nibbles, then all high ones); the format packs
    neighbours k = 2j, 2j+1 into byte j, so 4-bit values are unpacked and packed again."""
    if kind in FLOAT_TYPES:
        return raw.contiguous().view(FLOAT_TYPES[kind]).to(dtype)
    rows = raw.shape[0]
    blocks = raw.view(rows, -1, BLOCK_SIZES[kind][1])                # (N, blocks, type_size)
    if kind == "Q4_0":
        q = _nibbles(blocks[..., 2:]).reshape(rows, -1)
        return GroupQuantWeight(pack_int4(q), bits=4, group_size=32, scales=_fp16(blocks[..., 0:2]), zero=8)
    if kind == "Q4_1":
        q = _nibbles(blocks[..., 4:]).reshape(rows, -1)
        return GroupQuantWeight(pack_int4(q), bits=4, group_size=32, scales=_fp16(blocks[..., 0:2]),
                                mins=_fp16(blocks[..., 2:4]))
    if kind == "Q8_0":
        q = (blocks[..., 2:] ^ 0x80).reshape(rows, -1)              # int8 + 128 (flip the sign bit)
        return GroupQuantWeight(q.contiguous(), bits=8, group_size=32, scales=_fp16(blocks[..., 0:2]), zero=128)
    if kind in ("Q4_K", "Q5_K"):
        packed = blocks[..., 4:16].reshape(rows, -1, 3, 4)           # 8 six-bit scales and mins in 12 bytes
        low, high, rest = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
        scales = torch.cat([low & 0x3F, (rest & 0x0F) | ((low >> 2) & 0x30)], dim=-1).reshape(rows, -1)
        mins = torch.cat([high & 0x3F, (rest >> 4) | ((high >> 2) & 0x30)], dim=-1).reshape(rows, -1)
        fields = dict(group_size=32, scales=scales, mins=mins, super_scales=_fp16(blocks[..., 0:2]),
                      super_mins=-_fp16(blocks[..., 2:4]), super_group=256)
        if kind == "Q4_K":
            # 4 chunks of 32 bytes: a chunk's low nibbles are sub-block 2c, its high nibbles sub-block 2c + 1
            q = _nibbles(blocks[..., 16:].reshape(rows, -1, 4, 32)).reshape(rows, -1)
            return GroupQuantWeight(pack_int4(q), bits=4, **fields)
        # Q5_K: the low 4 bits as Q4_K's (after 32 bytes qh); bit s of qh[l] is value l of sub-block s's 5th bit
        low4 = _nibbles(blocks[..., 48:].reshape(rows, -1, 4, 32)).reshape(rows, -1, 8, 32)
        top = _bits(blocks[..., 16:48]).transpose(-1, -2)                       # (N, blocks, 8 sub-blocks, 32)
        qweight, qweight_high = pack_int6((low4 | (top << 4)).reshape(rows, -1))
        return GroupQuantWeight(qweight, bits=6, qweight_high=qweight_high, **fields)
    if kind in ("Q5_0", "Q5_1"):
        # d (, m), 4 bytes qh: bit j of the little-endian word is value j's 5th bit, 16 bytes of nibbles
        head = 2 if kind == "Q5_0" else 4
        low4 = _nibbles(blocks[..., head + 4:])                                # (N, blocks, 2, 16): values 0-15, 16-31
        top = _bits(blocks[..., head : head + 4]).reshape(rows, -1, 2, 16)      # bit j of byte b: value 8b + j
        qweight, qweight_high = pack_int6((low4 | (top << 4)).reshape(rows, -1))
        if kind == "Q5_0":
            return GroupQuantWeight(qweight, bits=6, group_size=32, scales=_fp16(blocks[..., 0:2]), zero=16,
                                    qweight_high=qweight_high)
        return GroupQuantWeight(qweight, bits=6, group_size=32, scales=_fp16(blocks[..., 0:2]),
                                mins=_fp16(blocks[..., 2:4]), qweight_high=qweight_high)
    if kind == "Q6_K":
        # each half of 128 values: the low 4 bits from 64 bytes (low nibbles: values 0-63, high: 64-127),
        # the top 2 bits from 32 bytes (bits 0-1: values 0-31, 2-3: 32-63, ...)
        low = _nibbles(blocks[..., :128].reshape(rows, -1, 2, 64)).reshape(rows, -1, 2, 128)
        qh = blocks[..., 128:192].reshape(rows, -1, 2, 1, 32)
        high = ((qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qh.device).view(4, 1)) & 3)
        q = (low | (high.reshape(rows, -1, 2, 128) << 4)).reshape(rows, -1)
        scales = blocks[..., 192:208].contiguous().view(torch.int8).reshape(rows, -1)
        qweight, qweight_high = pack_int6(q)
        return GroupQuantWeight(qweight, bits=6, group_size=16, scales=scales, zero=32,
                                super_scales=_fp16(blocks[..., 208:210]), super_group=256, qweight_high=qweight_high)
    raise ValueError(f"GGUF block type {kind!r} cannot be kept quantized; supported: {list(SUPPORTED_TYPES)}")


_FIELDS = ("qweight", "qweight_high", "scales", "zeros", "mins", "super_scales", "super_mins")


def _tensors(piece: Piece) -> dict[str, torch.Tensor]:
    if isinstance(piece, torch.Tensor):
        return {"weight": piece}
    return {field: getattr(piece, field) for field in _FIELDS if getattr(piece, field) is not None}


def _same_format(a: Piece, b: Piece) -> bool:
    """Whether two pieces stack along the output dim into one (one GEMM)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return ((a.bits, a.group_size, a.zero, a.super_group) == (b.bits, b.group_size, b.zero, b.super_group)
            and {f: t.dtype for f, t in _tensors(a).items()} == {f: t.dtype for f, t in _tensors(b).items()})


def _concat(a: Piece, b: Piece) -> Piece:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    b_fields = _tensors(b)
    return replace(a, **{field: torch.cat([tensor, b_fields[field]]) for field, tensor in _tensors(a).items()})


def _matmul(x: torch.Tensor, piece: Piece, bias: Optional[torch.Tensor],
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    if isinstance(piece, torch.Tensor):
        y = F.linear(x, piece, bias)
        return y if out is None else out.copy_(y)
    return weight_only_linear(x, piece, bias, out=out)
