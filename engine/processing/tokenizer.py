"""Tokenizer loading, chat prompts and end-of-sequence ids for a `ModelSource`.

The tokenizer comes from local files only: a Hugging Face directory's tokenizer files, or the vocabulary,
merges and chat template that a GGUF file embeds (transformers rebuilds a fast tokenizer from them).
`eos_token_ids` gathers every id that ends generation, because checkpoints disagree on where they put
them (tokenizer, config.json, generation_config.json) and stopping on only one of them runs on forever.
"""
from __future__ import annotations

import json
from pathlib import Path

import transformers

from pagoda.engine.model_loader.model_source import ModelSource

# Roles a chat message may have (OpenAI's, which the common chat templates understand).
CHAT_ROLES = ("system", "user", "assistant", "tool")


def load_tokenizer(source: ModelSource) -> transformers.PreTrainedTokenizerBase:
    """The fast tokenizer for `source`, read from local files only."""
    try:
        if source.gguf_file is not None:
            from ..model_loader.gguf_cache import cached

            gguf_file = source.gguf_file
            return cached(
                gguf_file, "tokenizer",
                load_saved=lambda d: transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True),
                build=lambda: transformers.AutoTokenizer.from_pretrained(
                    str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True),
                save=lambda tokenizer, d: tokenizer.save_pretrained(str(d)))
        return transformers.AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
    except (OSError, ValueError) as error:
        where = source.gguf_file if source.gguf_file is not None else source.path
        raise ValueError(
            f"could not load a tokenizer for model {source.name!r} from {str(where)!r}: {error}"
        ) from error


def apply_chat_template(tokenizer: transformers.PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template, ending with the assistant prompt.

    The template already writes any special tokens it wants (e.g. `<|im_start|>`), so the rendered text
    is encoded without adding more (no second BOS).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; use a plain prompt instead of messages"
        )
    _check_messages(messages)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(prompt, add_special_tokens=False)


def eos_token_ids(
    tokenizer: transformers.PreTrainedTokenizerBase,
    hf_config: transformers.PretrainedConfig,
    source: ModelSource | None = None,
) -> set[int]:
    """Every token id that ends generation.

    The union of the tokenizer's eos, the config's `eos_token_id` (int or list) and, when present,
    `generation_config.json`'s `eos_token_id` in the model directory (`source.path`; without a source,
    the config's `_name_or_path` if that is a directory).
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids |= _as_id_set(getattr(hf_config, "eos_token_id", None), "config eos_token_id")

    model_dir = source.path if source is not None else _config_dir(hf_config)
    generation_config = model_dir / "generation_config.json" if model_dir is not None else None
    if generation_config is not None and generation_config.is_file():
        try:
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError) as error:
            raise ValueError(f"{str(generation_config)!r} is not a JSON object: {error}") from error
        ids |= _as_id_set(eos, f"eos_token_id in {str(generation_config)!r}")
    return ids


def _config_dir(hf_config: transformers.PretrainedConfig) -> Path | None:
    """The directory the config was read from, if `_name_or_path` names one (GGUF configs hold a model name)."""
    name = getattr(hf_config, "_name_or_path", "")
    return Path(name) if name and Path(name).is_dir() else None


def _as_id_set(value, what: str) -> set[int]:
    if value is None:
        return set()
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{what} must be a token id or a list of token ids, got {value!r}")
    return set(values)


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{position}] must be a dict with 'role' and 'content', got {message!r}")
        if message["role"] not in CHAT_ROLES:
            raise ValueError(
                f"messages[{position}] has unknown role {message['role']!r}; expected one of {list(CHAT_ROLES)}"
            )
