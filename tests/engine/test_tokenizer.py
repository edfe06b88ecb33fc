"""load_tokenizer (HF directory and GGUF), apply_chat_template, eos_token_ids, and their errors."""
from __future__ import annotations

import json
import shutil

import pytest
import transformers
from model_factory import EOS_TOKEN_ID

from pagoda.engine.model_loader.model_source import load_hf_config, resolve_model
from pagoda.engine.processing.tokenizer import apply_chat_template, eos_token_ids, load_tokenizer

TEXT = "Hello world! The quick brown fox, 12345."
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello world"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "How are you?"},
]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_checkpoint) -> transformers.PreTrainedTokenizerBase:
    return load_tokenizer(resolve_model(str(tiny_checkpoint())))


# --------------------------------------------------------------------------------------- load_tokenizer


def test_hf_directory_tokenizer_round_trips(tiny_tokenizer):
    ids = tiny_tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) < len(TEXT)  # merges were learned, not just bytes
    assert tiny_tokenizer.decode(ids) == TEXT
    assert tiny_tokenizer.eos_token_id == EOS_TOKEN_ID


def test_gguf_tokenizer_matches_the_hf_one(tiny_tokenizer, tiny_gguf):
    gguf_tokenizer = load_tokenizer(resolve_model(str(tiny_gguf())))
    expected_ids = tiny_tokenizer.encode(TEXT, add_special_tokens=False)
    assert gguf_tokenizer.encode(TEXT, add_special_tokens=False) == expected_ids
    assert apply_chat_template(gguf_tokenizer, MESSAGES) == apply_chat_template(tiny_tokenizer, MESSAGES)
    assert gguf_tokenizer.eos_token_id == EOS_TOKEN_ID


def test_directory_without_tokenizer_files(tiny_checkpoint, tmp_path):
    shutil.copy(tiny_checkpoint() / "config.json", tmp_path)
    with pytest.raises(ValueError, match=rf"could not load a tokenizer for model '{tmp_path}'"):
        load_tokenizer(resolve_model(str(tmp_path)))


# ---------------------------------------------------------------------------------- apply_chat_template


def test_chat_template_ends_with_the_assistant_prompt(tiny_tokenizer):
    ids = apply_chat_template(tiny_tokenizer, MESSAGES)
    assert isinstance(ids, list) and all(isinstance(token_id, int) for token_id in ids)
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n")
    # Exactly what transformers produces when it tokenizes the template itself (no extra BOS).
    expected = tiny_tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids == list(expected)


def test_no_chat_template(tiny_checkpoint):
    tokenizer = load_tokenizer(resolve_model(str(tiny_checkpoint())))
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"tokenizer '.*' has no chat template"):
        apply_chat_template(tokenizer, MESSAGES)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], r"non-empty list"),
        ("hello", r"non-empty list"),
        ([{"content": "hi"}], r"messages\[0\] must be a dict with 'role' and 'content'"),
        ([{"role": "user"}], r"messages\[0\] must be a dict with 'role' and 'content'"),
        ([{"role": "user", "content": "hi"}, "hi"], r"messages\[1\] must be a dict"),
        (
            [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
            r"messages\[1\] has unknown role 'robot'",
        ),
    ],
)
def test_bad_messages(tiny_tokenizer, messages, message):
    with pytest.raises(ValueError, match=message):
        apply_chat_template(tiny_tokenizer, messages)


# ---------------------------------------------------------------------------------------- eos_token_ids


def test_eos_from_tokenizer_config_and_generation_config(tiny_checkpoint, tiny_tokenizer, tmp_path):
    source = resolve_model(str(tiny_checkpoint()))
    config = load_hf_config(source)
    assert eos_token_ids(tiny_tokenizer, config, source) == {EOS_TOKEN_ID}

    directory = tmp_path / "more-eos"
    shutil.copytree(tiny_checkpoint(), directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_TOKEN_ID, 7]}))
    source = resolve_model(str(directory))
    config = load_hf_config(source)
    config.eos_token_id = [EOS_TOKEN_ID, 5]
    assert eos_token_ids(tiny_tokenizer, config, source) == {EOS_TOKEN_ID, 5, 7}
    # Without a source the directory comes from the config's _name_or_path.
    assert eos_token_ids(tiny_tokenizer, config) == {EOS_TOKEN_ID, 5, 7}


def test_eos_without_any_config_eos(tiny_tokenizer):
    config = transformers.LlamaConfig(eos_token_id=None)
    assert eos_token_ids(tiny_tokenizer, config) == {EOS_TOKEN_ID}


@pytest.mark.parametrize("bad", ["2", [2, "x"], -1, True, 2.0])
def test_eos_that_is_not_a_token_id(tiny_checkpoint, tiny_tokenizer, tmp_path, bad):
    directory = tmp_path / "bad-eos"
    shutil.copytree(tiny_checkpoint(), directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
    source = resolve_model(str(directory))
    with pytest.raises(ValueError, match=r"eos_token_id in .*generation_config\.json' must be a token id"):
        eos_token_ids(tiny_tokenizer, load_hf_config(source), source)


def test_generation_config_that_is_not_an_object(tiny_checkpoint, tiny_tokenizer, tmp_path):
    directory = tmp_path / "list-generation-config"
    shutil.copytree(tiny_checkpoint(), directory)
    (directory / "generation_config.json").write_text("[1, 2]")
    source = resolve_model(str(directory))
    with pytest.raises(ValueError, match=r"generation_config\.json' is not a JSON object"):
        eos_token_ids(tiny_tokenizer, load_hf_config(source), source)


# --------------------------------------------------------------------------------------- default model


@pytest.mark.slow
def test_default_tokenizer_round_trips(default_tokenizer):
    assert len(default_tokenizer) == 49152
    ids = default_tokenizer.encode(TEXT, add_special_tokens=False)
    assert default_tokenizer.decode(ids) == TEXT
    assert default_tokenizer.encode("Hello world", add_special_tokens=False) == [19556, 905]


@pytest.mark.slow
def test_default_chat_template(default_tokenizer):
    ids = apply_chat_template(default_tokenizer, [{"role": "user", "content": "Hi there"}])
    assert default_tokenizer.decode(ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[0] == 1 and ids.count(1) == 3  # one <|im_start|> per turn, no extra BOS


@pytest.mark.slow
def test_default_eos(default_source, default_hf_config, default_tokenizer):
    assert eos_token_ids(default_tokenizer, default_hf_config, default_source) == {2}
    assert default_tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"


@pytest.mark.slow
def test_gguf_metadata_cache_round_trips(tmp_path, monkeypatch):
    """The cached config/tokenizer equal what transformers derives from the GGUF itself."""
    import transformers

    from pagoda.engine.model_loader.model_source import load_hf_config, resolve_model
    from pagoda.engine.processing.tokenizer import load_tokenizer

    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    source = resolve_model("default")
    fresh_config, fresh_tokenizer = load_hf_config(source), load_tokenizer(source)
    assert list((tmp_path / "gguf").iterdir()), "nothing was cached"
    cached_config, cached_tokenizer = load_hf_config(source), load_tokenizer(source)
    assert cached_config.to_dict() == fresh_config.to_dict()
    direct = transformers.AutoTokenizer.from_pretrained(str(source.path), gguf_file=source.gguf_file.name)
    texts = ["Hello world, é 😀 世界", "  leading spaces\nand\ttabs", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert cached_tokenizer.encode(text) == direct.encode(text) == fresh_tokenizer.encode(text)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert cached_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        direct.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert cached_tokenizer.eos_token_id == direct.eos_token_id
