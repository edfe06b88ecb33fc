"""iterate_weights / LazyWeight: safetensors (single, sharded, index-less), GGUF (names, q/k
un-permutation, dequantization equal to transformers'), slicing, and every error path."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from model_factory import TinyModelSpec, read_state_dict

from pagoda.engine.model_loader.model_source import ModelSource, resolve_model
from pagoda.engine.model_loader.weights import LazyWeight, gguf_to_hf_name, iterate_weights

HF_SPECS = [
    TinyModelSpec(),
    TinyModelSpec(head_dim=128, tie_word_embeddings=True),
    TinyModelSpec(family="mistral"),
    TinyModelSpec(family="qwen2", tie_word_embeddings=True),
    TinyModelSpec(family="qwen3", head_dim=128),
]


def load_all(source: ModelSource) -> dict[str, torch.Tensor]:
    weights = {}
    for name, weight in iterate_weights(source):
        assert name == weight.name and name not in weights
        weights[name] = weight.load()
        assert tuple(weights[name].shape) == weight.shape
    return weights


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def transformers_gguf_state_dict(gguf_file: Path) -> dict[str, torch.Tensor]:
    """What transformers itself loads from the GGUF, in float32."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32, local_files_only=True
    )
    return model.state_dict()


# -------------------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("spec", HF_SPECS, ids=lambda spec: spec.slug)
def test_hf_directory_yields_the_checkpoint(tiny_checkpoint, spec):
    directory = tiny_checkpoint(spec)
    weights = load_all(resolve_model(str(directory)))
    assert_same_tensors(weights, read_state_dict(directory))
    assert ("lm_head.weight" in weights) is not spec.tie_word_embeddings
    if spec.family == "qwen2":
        assert "model.layers.1.self_attn.q_proj.bias" in weights
    if spec.family == "qwen3":
        assert weights["model.layers.1.self_attn.q_norm.weight"].shape == (128,)


def test_sharded_equals_unsharded(tiny_checkpoint):
    single = tiny_checkpoint(TinyModelSpec())
    sharded = tiny_checkpoint(TinyModelSpec(max_shard_size="100KB"))
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    assert_same_tensors(load_all(resolve_model(str(sharded))), load_all(resolve_model(str(single))))


def test_shards_without_index_and_extra_files(tiny_checkpoint, tmp_path):
    sharded = tiny_checkpoint(TinyModelSpec(max_shard_size="100KB"))
    directory = tmp_path / "no-index"
    shutil.copytree(sharded, directory, ignore=shutil.ignore_patterns("*.index.json"))
    (directory / "training_args.bin").write_bytes(b"not weights")
    assert_same_tensors(load_all(resolve_model(str(directory))), load_all(resolve_model(str(sharded))))


def test_index_with_a_missing_shard(tiny_checkpoint, tmp_path):
    directory = tmp_path / "missing-shard"
    shutil.copytree(tiny_checkpoint(TinyModelSpec(max_shard_size="100KB")), directory)
    victim = sorted(directory.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=rf"missing from .*{victim.name}"):
        list(iterate_weights(resolve_model(str(directory))))


def test_index_that_is_not_an_index(tiny_checkpoint, tmp_path):
    directory = tmp_path / "bad-index"
    shutil.copytree(tiny_checkpoint(TinyModelSpec(max_shard_size="100KB")), directory)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json' is not a safetensors index"):
        list(iterate_weights(resolve_model(str(directory))))


def test_tensor_in_two_shards_is_ambiguous(tiny_checkpoint, tmp_path):
    directory = tmp_path / "duplicate"
    directory.mkdir()
    source_dir = tiny_checkpoint()
    shutil.copy(source_dir / "config.json", directory)
    shutil.copy(source_dir / "model.safetensors", directory / "model-00001-of-00002.safetensors")
    shutil.copy(source_dir / "model.safetensors", directory / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"appears in both .*00001-of-00002.*00002-of-00002"):
        list(iterate_weights(resolve_model(str(directory))))


def test_pytorch_bin_only_needs_safetensors(tiny_checkpoint, tmp_path):
    directory = tmp_path / "bin-only"
    directory.mkdir()
    shutil.copy(tiny_checkpoint() / "config.json", directory)
    (directory / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"found \['pytorch_model\.bin'\].*requires safetensors"):
        list(iterate_weights(resolve_model(str(directory))))


def test_directory_without_weights(tiny_checkpoint, tmp_path):
    directory = tmp_path / "config-only"
    directory.mkdir()
    shutil.copy(tiny_checkpoint() / "config.json", directory)
    with pytest.raises(ValueError, match=r"contains no weight files"):
        list(iterate_weights(resolve_model(str(directory))))


# ------------------------------------------------------------------------------------------ slicing


def _slices(weight: LazyWeight):
    """A few slices along every dim: head, middle, tail, and one element."""
    for dim, size in enumerate(weight.shape):
        yield dim, 0, size // 2
        yield dim, size // 3, size // 3 + 1
        yield dim, size - 1, 1
        yield dim, size // 2, None


@pytest.mark.parametrize("kind", ["safetensors", "gguf-F32", "gguf-Q8_0", "gguf-qwen3-F16"])
def test_slices_equal_narrowed_full_tensors(tiny_checkpoint, tiny_gguf, kind):
    if kind == "safetensors":
        source = resolve_model(str(tiny_checkpoint(TinyModelSpec(max_shard_size="100KB"))))
    elif kind == "gguf-qwen3-F16":
        source = resolve_model(str(tiny_gguf(TinyModelSpec(family="qwen3"), "F16")))
    else:
        source = resolve_model(str(tiny_gguf(TinyModelSpec(), kind.split("-")[1])))
    for name, weight in iterate_weights(source):
        full = weight.load()
        for dim, start, length in _slices(weight):
            part = weight.load(dim=dim, start=start, length=length)
            expected = full.narrow(dim, start, full.shape[dim] - start if length is None else length)
            assert part.is_contiguous(), (name, dim, start, length)
            assert torch.equal(part, expected), (name, dim, start, length)


def test_slice_of_permuted_rows_reads_only_the_rows_it_needs(tiny_gguf):
    # Q8_0 q_proj: a dim-0 slice gathers permuted raw rows; it must still equal the full tensor's rows.
    weights = dict(iterate_weights(resolve_model(str(tiny_gguf(TinyModelSpec(), "Q8_0")))))
    q_proj = weights["model.layers.0.self_attn.q_proj.weight"]
    full = q_proj.load()
    head_dim = 64
    for head in range(2):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        assert torch.equal(q_proj.load(dim=0, start=rows.start, length=head_dim), full[rows])


def test_load_casts_to_dtype(tiny_checkpoint, tiny_gguf):
    for source in (resolve_model(str(tiny_checkpoint())), resolve_model(str(tiny_gguf()))):
        weight = dict(iterate_weights(source))["model.layers.0.mlp.up_proj.weight"]
        assert weight.load().dtype == torch.float32
        half = weight.load(dim=1, start=0, length=64, dtype=torch.bfloat16)
        assert half.dtype == torch.bfloat16 and half.shape == (256, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dim": 2}, r"dim=2 is not in \[0, 2\)"),
        ({"dim": -1}, r"dim=-1 is not in \[0, 2\)"),
        ({"dim": 0, "start": 256}, r"start=256, length=0 along dim 0 is outside \[0, 256\)"),
        ({"dim": 0, "start": -1, "length": 2}, r"start=-1, length=2"),
        ({"dim": 1, "start": 100, "length": 29}, r"start=100, length=29 along dim 1 is outside \[0, 128\)"),
        ({"dim": 1, "start": 0, "length": 0}, r"length=0"),
        ({"start": 4}, r"need a dim to slice along"),
        ({"length": 4}, r"need a dim to slice along"),
    ],
)
@pytest.mark.parametrize("format", ["safetensors", "gguf"])
def test_bad_slices_name_the_weight(tiny_checkpoint, tiny_gguf, format, kwargs, message):
    source = resolve_model(str(tiny_checkpoint() if format == "safetensors" else tiny_gguf()))
    weight = dict(iterate_weights(source))["model.layers.0.mlp.gate_proj.weight"]
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight'.*" + message):
        weight.load(**kwargs)


# --------------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize(
    "spec",
    [
        TinyModelSpec(),
        TinyModelSpec(tie_word_embeddings=True, head_dim=128),
        TinyModelSpec(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
        TinyModelSpec(num_attention_heads=2, num_key_value_heads=2),
        TinyModelSpec(family="mistral"),
        TinyModelSpec(family="qwen2", tie_word_embeddings=True),
        TinyModelSpec(family="qwen3", head_dim=128),
    ],
    ids=lambda spec: f"{spec.slug}-h{spec.num_attention_heads}kv{spec.num_key_value_heads}",
)
def test_f32_gguf_round_trips_to_the_hf_state_dict(tiny_checkpoint, tiny_gguf, spec):
    # Exact equality: names mapped back, llama q/k rows un-permuted, nothing else touched.
    weights = load_all(resolve_model(str(tiny_gguf(spec, "F32"))))
    assert_same_tensors(weights, read_state_dict(tiny_checkpoint(spec)))


def test_f16_gguf_round_trips_up_to_f16_rounding(tiny_checkpoint, tiny_gguf):
    expected = {
        name: tensor.half().float() if tensor.ndim == 2 else tensor
        for name, tensor in read_state_dict(tiny_checkpoint()).items()
    }
    assert_same_tensors(load_all(resolve_model(str(tiny_gguf(TinyModelSpec(), "F16")))), expected)


@pytest.mark.parametrize("tensor_type", ["Q8_0", "Q4_1"])
def test_quantized_gguf_is_close_to_the_hf_state_dict(tiny_checkpoint, tiny_gguf, tensor_type):
    weights = load_all(resolve_model(str(tiny_gguf(TinyModelSpec(), tensor_type))))
    expected = read_state_dict(tiny_checkpoint())
    assert sorted(weights) == sorted(expected)
    # Worst-case rounding error as a fraction of max |w|: Q8_0 half a step of absmax/127, Q4_1 half a
    # step of (max - min)/15 within each 32-value block.
    tolerance = {"Q8_0": 0.5 / 127, "Q4_1": 0.5 * 2 / 15}[tensor_type] * 1.01
    for name, tensor in expected.items():
        # A wrong q/k permutation would move whole rows: far outside the quantization error.
        torch.testing.assert_close(weights[name], tensor, atol=tolerance * tensor.abs().max().item(), rtol=0)


@pytest.mark.parametrize(
    "spec, tensor_type",
    [
        (TinyModelSpec(), "Q8_0"),
        (TinyModelSpec(tie_word_embeddings=True), "Q4_1"),
        (TinyModelSpec(family="qwen2"), "F16"),
        (TinyModelSpec(family="qwen3", head_dim=128), "Q8_0"),
    ],
    ids=lambda value: value.slug if isinstance(value, TinyModelSpec) else value,
)
def test_tiny_gguf_equals_transformers_gguf_load(tiny_gguf, spec, tensor_type):
    gguf_file = tiny_gguf(spec, tensor_type)
    ours = load_all(resolve_model(str(gguf_file)))
    theirs = transformers_gguf_state_dict(gguf_file)
    if spec.tie_word_embeddings:
        assert torch.equal(theirs.pop("lm_head.weight"), ours["model.embed_tokens.weight"])
    assert_same_tensors(ours, theirs)


@pytest.mark.slow
def test_default_model_weights_equal_transformers_gguf_load():
    source = resolve_model("default")
    ours = dict(iterate_weights(source))
    theirs = transformers_gguf_state_dict(source.gguf_file)
    # SmolLM2 ties lm_head to the embeddings: the GGUF has no output.weight.
    assert "lm_head.weight" not in ours
    assert sorted(ours) == sorted(set(theirs) - {"lm_head.weight"})
    assert len(ours) == 2 + 30 * 9
    for name, weight in ours.items():
        tensor = weight.load()
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, theirs[name]), name
    # Row slices of permuted, Q4_1 tensors (what a tensor-parallel rank loads) match as well.
    for name in ("model.layers.7.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight"):
        rows = ours[name].shape[0] // 3
        assert torch.equal(ours[name].load(dim=0, start=rows, length=rows), theirs[name][rows : 2 * rows])


# --------------------------------------------------------------------------------------- GGUF errors


def _write_gguf(path: Path, architecture: str, tensors: dict[str, np.ndarray]) -> Path:
    """A minimal GGUF (2 heads, 1 KV head) holding `tensors` as given: for files no converter would write."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": np.zeros((8, 4), np.float32)})
    message = r"gpt2\.gguf' has architecture 'gpt2'; supported: \['llama', 'qwen2', 'qwen3'\]"
    with pytest.raises(ValueError, match=message):
        list(iterate_weights(resolve_model(str(path))))


def test_gguf_unknown_tensor_name(tmp_path):
    path = _write_gguf(tmp_path / "odd.gguf", "llama", {"blk.0.attn_qkv.weight": np.zeros((12, 4), np.float32)})
    message = r"GGUF tensor 'blk\.0\.attn_qkv\.weight' in .*odd\.gguf.*no known Hugging Face name"
    with pytest.raises(ValueError, match=message):
        list(iterate_weights(resolve_model(str(path))))


def test_gguf_quantization_type_gguf_cannot_dequantize(tmp_path):
    path = _write_gguf(tmp_path / "int.gguf", "llama", {"blk.0.ffn_up.weight": np.zeros((8, 4), np.int32)})
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight' in .*int\.gguf' has quantization type I32"):
        list(iterate_weights(resolve_model(str(path))))


def test_gguf_q_rows_not_divisible_by_heads(tmp_path):
    path = _write_gguf(tmp_path / "rows.gguf", "llama", {"blk.0.attn_q.weight": np.zeros((6, 4), np.float32)})
    message = r"'blk\.0\.attn_q\.weight' .* has 6 rows, not a multiple of 2 \* 2 heads"
    with pytest.raises(ValueError, match=message):
        list(iterate_weights(resolve_model(str(path))))


def test_gguf_without_head_count_is_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "nohead.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"nohead\.gguf' lacks the metadata key 'llama\.attention\.head_count'"):
        list(iterate_weights(resolve_model(str(tmp_path / "nohead.gguf"))))


def test_gguf_per_layer_head_counts_are_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "per-layer.gguf"), "llama")
    writer.add_head_count([2, 4])
    writer.add_tensor("output_norm.weight", np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'llama\.attention\.head_count' must be one integer, got \[2, 4\]"):
        list(iterate_weights(resolve_model(str(tmp_path / "per-layer.gguf"))))


def test_gguf_rope_freqs_is_skipped(tmp_path):
    path = _write_gguf(
        tmp_path / "llama3.gguf",
        "llama",
        {"rope_freqs.weight": np.ones(8, np.float32), "output_norm.weight": np.full(4, 2.0, np.float32)},
    )
    weights = load_all(resolve_model(str(path)))
    assert sorted(weights) == ["model.norm.weight"]
    assert torch.equal(weights["model.norm.weight"], torch.full((4,), 2.0))


@pytest.mark.parametrize(
    "gguf_name, hf_name",
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output.weight", "lm_head.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("blk.11.attn_q.bias", "model.layers.11.self_attn.q_proj.bias"),
        ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight"),
        ("blk.3.attn_k_norm.weight", "model.layers.3.self_attn.k_norm.weight"),
        ("blk.2.ffn_norm.weight", "model.layers.2.post_attention_layernorm.weight"),
        ("blk.2.attn_norm.weight", "model.layers.2.input_layernorm.weight"),
        ("blk.2.ffn_down.weight", "model.layers.2.mlp.down_proj.weight"),
        ("blk.2.ffn_gate_exps.weight", None),
        ("rope_freqs.weight", None),
    ],
)
def test_gguf_to_hf_name(gguf_name, hf_name):
    assert gguf_to_hf_name(gguf_name) == hf_name
