"""engine/model_loader/gguf_index.py: the cached tensor index gives exactly the tensors and metadata
`gguf.GGUFReader` gives, is read without parsing the file's metadata again, and a damaged or stale
entry is rebuilt."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from model_factory import TinyModelSpec

from pagoda.engine.model_loader import gguf_index
from pagoda.engine.model_loader.gguf_cache import _entry_dir
from pagoda.engine.model_loader.gguf_index import read_gguf_index


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(directory))
    return directory


def assert_same_as_reader(index: gguf_index.GGUFIndex, file, max_array_len: int = 4096) -> None:
    reader = gguf.GGUFReader(file)
    assert [t.name for t in index.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(index.tensors, reader.tensors):
        assert ours.tensor_type == theirs.tensor_type and list(ours.shape) == list(theirs.shape)
        assert (ours.n_elements, ours.n_bytes, ours.data_offset) == (theirs.n_elements, theirs.n_bytes,
                                                                     theirs.data_offset)
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape
        assert np.array_equal(ours.data, theirs.data)
    short = {name: field.contents() for name, field in reader.fields.items()
             if field.types[0] != gguf.GGUFValueType.ARRAY or len(field.data) <= max_array_len}
    assert index.metadata == short and "general.architecture" in index.metadata


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "Q8_0", "Q4_1"])
def test_index_matches_the_reader_then_loads_without_parsing(tiny_gguf, cache_dir, monkeypatch, tensor_type):
    file = tiny_gguf(TinyModelSpec(), tensor_type)
    assert_same_as_reader(read_gguf_index(file), file)            # built, and saved
    assert (_entry_dir(file, "tensor-index") / "index.json").is_file()

    def no_parsing(*args, **kwargs):
        raise AssertionError("the saved index should be read, not the GGUF metadata")

    with monkeypatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", no_parsing)
        index = read_gguf_index(file)
    assert_same_as_reader(index, file)


def test_long_arrays_are_left_out(tiny_gguf, cache_dir, monkeypatch):
    monkeypatch.setattr(gguf_index, "_MAX_ARRAY_LEN", 8)
    file = tiny_gguf(TinyModelSpec(), "F32")
    index = read_gguf_index(file)
    assert_same_as_reader(index, file, max_array_len=8)
    assert "tokenizer.ggml.tokens" not in index.metadata and "llama.attention.head_count" in index.metadata


@pytest.mark.parametrize("damage", ["not json", "offset past the end", "other version"])
def test_a_damaged_or_stale_entry_is_rebuilt(tiny_gguf, cache_dir, damage):
    file = tiny_gguf(TinyModelSpec(), "Q8_0")
    read_gguf_index(file)
    saved = _entry_dir(file, "tensor-index") / "index.json"
    if damage == "not json":
        saved.write_text("{")
    else:
        entries = json.loads(saved.read_text())
        if damage == "offset past the end":
            entries["tensors"][-1]["data_offset"] = entries["file_size"]
        else:
            entries["version"] = 0
        saved.write_text(json.dumps(entries))
    assert_same_as_reader(read_gguf_index(file), file)
    assert json.loads(saved.read_text())["version"] == gguf_index._INDEX_VERSION      # saved again, whole
