"""A GGUF file's tensor index (name, type, shape and place of every tensor) and scalar metadata,
cached on disk, so that loading the weights does not parse the whole metadata again.

Why: `gguf.GGUFReader` parses every metadata field before it lists a tensor, and a chat model's
metadata holds its whole vocabulary and merge table: for SmolLM2-135M some 100,000 strings, each
read as numpy views of the memory map, 5-10 s on a 2-core CPU, where dequantizing all the weights
takes about 2 s. The weight loader needs only the tensor index and a few short fields, so the
first load saves those (as JSON, in `gguf_cache`, keyed by the file's path, size and mtime) and
later loads memory-map the file and build each tensor's view from the saved offsets, exactly as
`GGUFReader` builds it.

    index = read_gguf_index(file)
    index.metadata["general.architecture"]          # all but the long arrays (vocabulary, merges)
    for tensor in index.tensors: ...                 # gguf.ReaderTensor, data memory-mapped, nothing read
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .gguf_cache import cached

_INDEX_FILE = "index.json"
_INDEX_VERSION = 1
# Arrays longer than this (the vocabulary, merges, scores) are left out; per-layer values are kept.
_MAX_ARRAY_LEN = 4096


@dataclass(frozen=True)
class GGUFIndex:
    """metadata: every metadata field but the long arrays, as `ReaderField.contents()` gives it.
    tensors: `gguf.ReaderTensor`s in file order (their `field` is None: the header is not kept)."""
    metadata: dict[str, Any]
    tensors: list[Any]


def read_gguf_index(file: Path) -> GGUFIndex:
    entries = cached(file, "tensor-index", load_saved=lambda directory: _load_saved(directory, file),
                     build=lambda: _build(file), save=_save)
    return _to_index(file, entries)


def _build(file: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(file)
    metadata = {name: field.contents() for name, field in reader.fields.items()
                if field.types and (field.types[0] != gguf.GGUFValueType.ARRAY or len(field.data) <= _MAX_ARRAY_LEN)}
    tensors = [{"name": t.name, "tensor_type": int(t.tensor_type), "shape": [int(d) for d in t.shape],
                "n_elements": int(t.n_elements), "n_bytes": int(t.n_bytes), "data_offset": int(t.data_offset),
                "data_shape": list(t.data.shape), "data_dtype": t.data.dtype.str} for t in reader.tensors]
    return {"version": _INDEX_VERSION, "file_size": file.stat().st_size, "metadata": metadata, "tensors": tensors}


def _save(entries: dict[str, Any], directory: Path) -> None:
    (directory / _INDEX_FILE).write_text(json.dumps(entries))


def _load_saved(directory: Path, file: Path) -> dict[str, Any]:
    """The saved entries; raises on a stale or damaged one (then `cached` rebuilds it)."""
    entries = json.loads((directory / _INDEX_FILE).read_text())
    if entries.get("version") != _INDEX_VERSION or entries["file_size"] != file.stat().st_size:
        raise ValueError(f"the tensor index of {str(file)!r} is stale")
    for entry in entries["tensors"]:
        end = entry["data_offset"] + int(np.prod(entry["data_shape"])) * np.dtype(entry["data_dtype"]).itemsize
        if end > entries["file_size"]:
            raise ValueError(f"the tensor index of {str(file)!r} places {entry['name']!r} past the file's end")
    return entries


def _to_index(file: Path, entries: dict[str, Any]) -> GGUFIndex:
    import gguf

    data = np.memmap(file, mode="r")
    tensors = []
    for entry in entries["tensors"]:
        start, dtype = entry["data_offset"], np.dtype(entry["data_dtype"])
        view = data[start:start + int(np.prod(entry["data_shape"])) * dtype.itemsize].view(dtype)
        tensors.append(gguf.ReaderTensor(
            name=entry["name"], tensor_type=gguf.GGMLQuantizationType(entry["tensor_type"]),
            shape=np.array(entry["shape"], dtype=np.uint64), n_elements=entry["n_elements"],
            n_bytes=entry["n_bytes"], data_offset=start, data=view.reshape(entry["data_shape"]), field=None))
    return GGUFIndex(metadata=entries["metadata"], tensors=tensors)
