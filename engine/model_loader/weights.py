"""Checkpoint weights as lazy, sliceable tensors under Hugging Face parameter names.

`iterate_weights(source)` yields `(hf_name, LazyWeight)` pairs for a Hugging Face safetensors directory
(single file or shards, with or without `model.safetensors.index.json`) or a llama.cpp GGUF file. Nothing
is read until `LazyWeight.load(...)`, which can read just one slice along one dim: with tensor parallelism
each rank loads only its shard (`load(dim=0, start=rank * n, length=n)` for a column-parallel weight).

GGUF tensors come back exactly as transformers' GGUF loader builds them (`modeling_gguf_pytorch_utils`,
the path transformers 5.x still uses for llama/qwen2/qwen3): dequantized to float32 with
`gguf.quants.dequantize`, renamed from llama.cpp names (`blk.N.attn_q.weight`) to HF names, and, for
`general.architecture == "llama"`, with the q/k row permutation of llama.cpp's converter undone.
`GGUFWeight.load_blocks` instead hands out the raw quantization blocks (rows and/or a block range along
the input dim, the same row permutation applied) for a scheme that keeps them quantized
(`engine/quantization/gguf.py`).
"""
from __future__ import annotations

import functools
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from pagoda.engine.model_loader.model_source import ModelSource


class LazyWeight(ABC):
    """One checkpoint tensor, read on demand.

    name: the Hugging Face parameter name (`model.layers.0.self_attn.q_proj.weight`).
    shape: its full shape in torch order (`(out_features, in_features)` for a linear weight).
    """

    def __init__(self, name: str, shape: tuple[int, ...]):
        self.name = name
        self.shape = shape

    def load(
        self,
        dim: int | None = None,
        start: int = 0,
        length: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The tensor, or only `[start, start + length)` along `dim` (to the end if `length` is None).

        The result is contiguous, owns its memory (it never keeps a larger buffer alive) and is cast to
        `dtype` if given; otherwise it keeps the checkpoint's dtype (float32 for every GGUF tensor).
        """
        dim, start, length = self._check_slice(dim, start, length)
        tensor = self._load(dim, start, length)
        assert tensor.shape == self._sliced_shape(dim, length), (self.name, tensor.shape)
        return tensor if dtype is None else tensor.to(dtype)

    @abstractmethod
    def _load(self, dim: int | None, start: int, length: int) -> torch.Tensor:
        """Read the (validated) slice; `dim is None` means the whole tensor."""

    def _check_slice(self, dim: int | None, start: int, length: int | None) -> tuple[int | None, int, int]:
        if dim is None:
            if start != 0 or length is not None:
                raise ValueError(
                    f"weight {self.name!r}: start={start} / length={length} need a dim to slice along (dim=None)"
                )
            return None, 0, 0
        if not isinstance(dim, int) or not 0 <= dim < len(self.shape):
            raise ValueError(
                f"weight {self.name!r} of shape {self.shape}: dim={dim!r} is not in [0, {len(self.shape)})"
            )
        size = self.shape[dim]
        if length is None:
            length = size - start
        if not 0 <= start < size or length < 1 or start + length > size:
            raise ValueError(
                f"weight {self.name!r} of shape {self.shape}: slice start={start}, length={length} along "
                f"dim {dim} is outside [0, {size})"
            )
        return dim, start, length

    def _sliced_shape(self, dim: int | None, length: int) -> tuple[int, ...]:
        if dim is None:
            return self.shape
        return self.shape[:dim] + (length,) + self.shape[dim + 1 :]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, shape={self.shape})"


def iterate_weights(source: ModelSource) -> Iterator[tuple[str, LazyWeight]]:
    """Every weight of `source` as `(hf_name, LazyWeight)`; only headers are read here."""
    if source.gguf_file is not None:
        yield from _iterate_gguf(source.gguf_file)
    else:
        yield from _iterate_safetensors(source.path)


# ----------------------------------------------------------------------------------------- safetensors


class SafetensorsWeight(LazyWeight):
    """A tensor in a `.safetensors` file; slices are read with `get_slice`, so only they touch memory."""

    def __init__(self, name: str, shape: tuple[int, ...], file: Path):
        super().__init__(name, shape)
        self.file = file

    def _load(self, dim: int | None, start: int, length: int) -> torch.Tensor:
        # NOTE: opening per load re-parses only the JSON header; holding handles open across the whole
        # iteration would tie file lifetimes to whoever keeps a LazyWeight.
        with safe_open(self.file, framework="pt") as f:
            if dim is None:
                return f.get_tensor(self.name)
            index = (slice(None),) * dim + (slice(start, start + length),)
            # get_slice along dim > 0 hands back a strided tensor; callers copy it into parameters whole.
            return f.get_slice(self.name)[index].contiguous()


def _iterate_safetensors(directory: Path) -> Iterator[tuple[str, LazyWeight]]:
    file_of_name: dict[str, Path] = {}
    for file in _safetensors_files(directory):
        with safe_open(file, framework="pt") as f:
            entries = [(name, tuple(f.get_slice(name).get_shape())) for name in sorted(f.keys())]
        for name, shape in entries:
            # NOTE: some checkpoints carry the rotary inverse-frequency buffer; it is derived from the config.
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name in file_of_name:
                raise ValueError(
                    f"tensor {name!r} appears in both {str(file_of_name[name])!r} and {str(file)!r}; "
                    f"the checkpoint in {str(directory)!r} is ambiguous"
                )
            file_of_name[name] = file
            yield name, SafetensorsWeight(name, shape, file)


def _safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, `model.safetensors`, or every shard found."""
    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{str(index_file)!r} is not a safetensors index with a 'weight_map': {error}"
            ) from error
        files = sorted({directory / shard for shard in weight_map.values()})
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise ValueError(f"{str(index_file)!r} lists shard(s) missing from {str(directory)!r}: {missing}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    # NOTE: Mistral repos ship `consolidated.safetensors` (Mistral's own tensor names) beside the HF shards.
    shards = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if shards:
        return shards
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    if others:
        raise ValueError(
            f"model directory {str(directory)!r} has no Hugging Face safetensors weights (found {others}); "
            f"pagoda requires safetensors: convert the checkpoint, e.g. load it with transformers and "
            f"`save_pretrained(dir)` (safetensors is the default)"
        )
    raise ValueError(f"model directory {str(directory)!r} contains no weight files (*.safetensors)")


# ------------------------------------------------------------------------------------------------ GGUF

# llama.cpp architectures whose tensors map onto the HF llama/qwen2/qwen3 layout below.
GGUF_SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# llama.cpp's converter permutes q/k rows (its rotary pairs are interleaved) only for these.
_GGUF_PERMUTED_ARCHITECTURES = ("llama",)

_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_BLOCK_PATTERN = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# NOTE: llama3-style GGUFs carry `rope_freqs.weight`, the rope-scaling factors llama.cpp precomputes. HF
# derives them from the config's rope parameters and transformers' GGUF loader drops this tensor too.
GGUF_SKIPPED_NAMES = ("rope_freqs.weight",)


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """The HF parameter name for a llama.cpp tensor name, or None if it has no HF counterpart we know."""
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    match = _GGUF_BLOCK_PATTERN.match(gguf_name)
    if match is None or match.group(2) not in _GGUF_BLOCK_NAMES:
        return None
    layer, part, suffix = match.groups()
    return f"model.layers.{layer}.{_GGUF_BLOCK_NAMES[part]}.{suffix}"


class GGUFWeight(LazyWeight):
    """A GGUF tensor, dequantized to float32 on load, or read as raw blocks (`load_blocks`).

    row_order: for llama q/k tensors, `hf_rows = gguf_rows[row_order]`, which undoes llama.cpp's permutation.
    """

    def __init__(self, name: str, gguf_name: str, file: Path, tensor, row_order: np.ndarray | None):
        # GGUF lists dims fastest-first (`ne`); torch order is the reverse.
        super().__init__(name, tuple(int(d) for d in reversed(tensor.shape.tolist())))
        self.gguf_name = gguf_name
        self.file = file
        self._tensor = tensor  # gguf.ReaderTensor: a view into the file's memory map, nothing read yet
        self._row_order = row_order

    def _load(self, dim: int | None, start: int, length: int) -> torch.Tensor:
        import gguf

        raw = self._tensor.data  # (rows, bytes_per_row) for block types, values for F32/F16
        qtype = self._tensor.tensor_type
        # Quantization blocks never cross a row, so rows of the raw data dequantize on their own (and
        # bit-identically); for a dim-0 slice we gather just those rows, permutation included.
        plain_values = qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        gather_rows = dim == 0 and (len(self.shape) >= 2 or plain_values)
        if gather_rows:
            if self._row_order is None:
                raw = raw[start : start + length]
            else:
                raw = raw[self._row_order[start : start + length]]
        values = self._dequantize(raw)
        if self._row_order is not None and not gather_rows:
            values = values[self._row_order]
        # Own the memory: F32 dequantization returns a read-only view of the memory map.
        tensor = torch.from_numpy(np.require(values, requirements=["C", "W", "O"]))
        if dim is not None and not gather_rows and length != self.shape[dim]:
            # NOTE: slicing along dims other than 0 dequantizes the whole tensor and then narrows; clone so
            # the full tensor is freed.
            tensor = tensor.narrow(dim, start, length).clone(memory_format=torch.contiguous_format)
        return tensor

    @property
    def tensor_type(self) -> str:
        """The block type's name: "Q4_1", "Q8_0", "F32", ..."""
        return self._tensor.tensor_type.name

    def load_blocks(
        self,
        row_start: int = 0,
        row_count: int | None = None,
        block_start: int = 0,
        block_count: int | None = None,
    ) -> torch.Tensor:
        """The raw bytes of a 2-D tensor, nothing dequantized: uint8 `(rows, blocks * type_size)`.

        Rows `[row_start, row_start + row_count)` in Hugging Face order (the q/k permutation undone: it
        moves whole rows, and a block never crosses a row), and of each row the quantization blocks
        `[block_start, block_start + block_count)` along the input dim. F32/F16/BF16 count as blocks of
        one value. Only these bytes are read from the memory map; the result owns its memory.
        """
        import gguf

        if len(self.shape) != 2:
            raise ValueError(f"GGUF tensor {self.gguf_name!r} has shape {self.shape}; raw blocks are read from "
                             f"2-D weights only")
        block_size, type_size = gguf.GGML_QUANT_SIZES[self._tensor.tensor_type]
        num_rows, num_blocks = self.shape[0], self.shape[1] // block_size
        row_count = num_rows - row_start if row_count is None else row_count
        block_count = num_blocks - block_start if block_count is None else block_count
        for what, start, count, size in (("rows", row_start, row_count, num_rows),
                                         ("blocks", block_start, block_count, num_blocks)):
            if not 0 <= start < size or count < 1 or start + count > size:
                raise ValueError(f"GGUF tensor {self.gguf_name!r} ({self.name!r}): {what} start={start}, "
                                 f"count={count} is outside [0, {size})")
        raw = self._tensor.data
        if self._row_order is None:
            raw = raw[row_start : row_start + row_count]
        else:
            raw = raw[self._row_order[row_start : row_start + row_count]]
        raw = raw.view(np.uint8)                  # F32/F16: values -> their bytes, row by row
        raw = raw[:, block_start * type_size : (block_start + block_count) * type_size]
        return torch.from_numpy(np.require(raw, requirements=["C", "W", "O"]))

    def _dequantize(self, raw: np.ndarray) -> np.ndarray:
        import gguf

        try:
            return gguf.quants.dequantize(raw, self._tensor.tensor_type)
        except NotImplementedError as error:
            raise ValueError(
                f"GGUF tensor {self.gguf_name!r} in {str(self.file)!r} has quantization type "
                f"{self._tensor.tensor_type.name}, which gguf cannot dequantize"
            ) from error


def _iterate_gguf(file: Path) -> Iterator[tuple[str, LazyWeight]]:
    from .gguf_index import read_gguf_index

    index = read_gguf_index(file)       # NOTE: not gguf.GGUFReader, which parses the whole vocabulary first
    architecture = _gguf_field(index, "general.architecture", file)
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF file {str(file)!r} has architecture {architecture!r}; "
            f"supported: {list(GGUF_SUPPORTED_ARCHITECTURES)}"
        )
    num_heads = num_kv_heads = None
    if architecture in _GGUF_PERMUTED_ARCHITECTURES:
        num_heads = _gguf_int_field(index, f"{architecture}.attention.head_count", file)
        # llama.cpp's default when the key is absent: no grouped-query attention.
        num_kv_heads = _gguf_int_field(index, f"{architecture}.attention.head_count_kv", file, default=num_heads)

    for tensor in index.tensors:
        if tensor.name in GGUF_SKIPPED_NAMES:
            continue
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} in {str(file)!r} (architecture {architecture!r}) has no known "
                f"Hugging Face name; this model layout is not supported"
            )
        if not _can_dequantize(tensor.tensor_type):
            raise ValueError(
                f"GGUF tensor {tensor.name!r} in {str(file)!r} has quantization type {tensor.tensor_type.name}, "
                f"which gguf cannot dequantize"
            )
        row_order = None
        if num_heads is not None and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            # Same head counts as transformers' LlamaTensorProcessor: q uses num_heads, k num_kv_heads.
            heads = num_heads if ".attn_q." in tensor.name else num_kv_heads
            row_order = _unpermute_row_order(int(tensor.shape[-1]), heads, tensor.name, file)
        yield hf_name, GGUFWeight(hf_name, tensor.name, file, tensor, row_order)


def _unpermute_row_order(num_rows: int, num_heads: int, gguf_name: str, file: Path) -> np.ndarray:
    """Row indices that undo llama.cpp's q/k permutation (`convert_hf_to_gguf.py: LlamaModel.permute`).

    llama.cpp stores each head's rows as interleaved pairs (d0, d_half, d1, d_half+1, ...); HF keeps the
    two rotary halves contiguous. Per head the GGUF rows are `(head_dim/2, 2)`; HF's are the transpose:

        GGUF rows of one head: [a0 b0 a1 b1 a2 b2 ...]  ->  HF rows: [a0 a1 a2 ... b0 b1 b2 ...]

    This is transformers' `_reverse_permute_weights` (reshape (heads, dim, 2) -> swap -> flatten)
    applied to row indices, so `weights[row_order]` equals it exactly.
    """
    if num_rows % (2 * num_heads) != 0:
        raise ValueError(
            f"GGUF tensor {gguf_name!r} in {str(file)!r} has {num_rows} rows, "
            f"not a multiple of 2 * {num_heads} heads"
        )
    return np.arange(num_rows).reshape(num_heads, num_rows // num_heads // 2, 2).swapaxes(2, 1).reshape(-1)


@functools.cache
def _can_dequantize(qtype) -> bool:
    """Whether `gguf.quants.dequantize` implements `qtype`: gguf publishes no list, so ask it with one block."""
    import gguf

    if qtype not in gguf.GGML_QUANT_SIZES:
        return False
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


_MISSING = object()


def _gguf_field(index, key: str, file: Path, default=_MISSING):
    if key not in index.metadata:
        if default is _MISSING:
            raise ValueError(f"GGUF file {str(file)!r} lacks the metadata key {key!r}")
        return default
    return index.metadata[key]


def _gguf_int_field(index, key: str, file: Path, default=_MISSING) -> int:
    value = _gguf_field(index, key, file, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"GGUF file {str(file)!r}: metadata {key!r} must be one integer, got {value!r}")
    return value
