"""Tokenizer loading, chat prompts, end-of-sequence ids, and where tokenizer work runs.

The tokenizer comes from local files only: a Hugging Face directory's tokenizer files, or the vocabulary,
merges and chat template that a GGUF file embeds (transformers rebuilds a fast tokenizer from them).
`eos_token_ids` gathers every id that ends generation, because checkpoints disagree on where they put
them (tokenizer, config.json, generation_config.json) and stopping on only one of them runs on forever.

Text work on a request must never hold up a server's event loop (tokenizing 15 MB takes seconds):

    prompt_chars_limit   a prompt with more characters than this cannot fit max_model_len tokens:
                         refuse it before tokenizing (O(1), `check_text_fits` raises the
                         `ContextLengthExceededError`); None when the tokenizer gives no bound
    TokenizerThread      runs encode / chat template / decode inline when small, else on one worker
                         thread (the Rust tokenizer releases the GIL, so the loop keeps answering)
    encode_text, apply_chat_template
                         a failure on the client's text (or chat template, or template variables)
                         is a ValueError (a 400), never a 500
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import json
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import jinja2
import transformers

from pagoda.engine.model_loader.model_source import ModelSource

# Roles a chat message may have (OpenAI's, which the common chat templates understand).
CHAT_ROLES = ("system", "user", "assistant", "tool")


def load_tokenizer(source: ModelSource) -> transformers.PreTrainedTokenizerBase:
    """The fast tokenizer for `source`, read from local files only."""
    tokenizer = _read_tokenizer(source)
    # NOTE: transformers switches the Rust tokenizer's truncation and padding off on its first encode:
    # a write that fails ("Already borrowed") while another thread encodes or decodes. Done here, before
    # the tokenizer is shared by the event loop and the `TokenizerThread`, no later call writes.
    tokenizer.encode("warm up")
    return tokenizer


def _read_tokenizer(source: ModelSource) -> transformers.PreTrainedTokenizerBase:
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


class ContextLengthExceededError(ValueError):
    """A prompt, or a prompt plus max_tokens, that cannot fit max_model_len (a 400 with OpenAI's
    code `context_length_exceeded`)."""

    code = "context_length_exceeded"


def check_text_fits(what: str, num_chars: int, max_chars: Optional[int], max_model_len: int) -> None:
    """Refuses a text that has more characters than max_model_len tokens can hold (`prompt_chars_limit`;
    None: no bound known), before anything tokenizes it."""
    if max_chars is not None and num_chars > max_chars:
        raise ContextLengthExceededError(
            f"{what} ({num_chars} characters) cannot fit: max_model_len={max_model_len} tokens hold at most "
            f"{max_chars} characters with this tokenizer. Please reduce the length of the {what}.")


def _renderer_arguments() -> frozenset[str]:
    """The names transformers' `apply_chat_template` takes itself (plus `messages`, the variable the
    templates read): template variables of these names would change how it renders, not what."""
    parameters = inspect.signature(transformers.PreTrainedTokenizerBase.apply_chat_template).parameters
    return frozenset(name for name, parameter in parameters.items()
                     if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD) | {"messages"}


# Names that extra template variables (a request's chat_template_kwargs) may not take.
RESERVED_TEMPLATE_KWARGS = _renderer_arguments()


def apply_chat_template(tokenizer: transformers.PreTrainedTokenizerBase, messages: list[dict],
                        max_model_len: Optional[int] = None, *, tools: Optional[list[dict]] = None,
                        chat_template: Optional[str] = None, template_kwargs: Optional[dict[str, Any]] = None,
                        add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
    """Token ids of `messages` rendered with the chat template, by default ending with the assistant prompt.

    tools: the {"type": "function", "function": {...}} dicts the template may list; chat_template:
    a Jinja template (or the name of one of the tokenizer's templates) instead of the tokenizer's;
    template_kwargs: extra template variables (e.g. {"enable_thinking": False});
    continue_final_message: leave the last (assistant) message open for the model to continue,
    instead of adding a generation prompt (the two exclude each other).

    The template already writes any special tokens it wants (e.g. `<|im_start|>`), so the rendered text
    is encoded without adding more (no second BOS). With max_model_len, a rendering that cannot fit
    is refused before it is tokenized (the rendering, not the messages: a template may drop some).
    A template or variables that fail to render are a ValueError naming them.
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; use a plain prompt instead of messages"
        )
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
    _check_messages(messages)
    reserved = sorted(set(template_kwargs or {}) & RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise ValueError(f"chat template variables may not be named {reserved}: those are renderer arguments")
    try:
        prompt = tokenizer.apply_chat_template(
            messages, tools=tools or None, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=False, **(template_kwargs or {}))
    except Exception as error:  # noqa: BLE001 - jinja's TemplateError, or the template's raise_exception()
        # NOTE: templates refuse what they cannot render (e.g. roles that do not alternate): the
        # client's messages, template or variables are at fault, not the server.
        raise ValueError(_render_error(error, chat_template, template_kwargs)) from None
    if max_model_len is not None:
        check_text_fits("messages", len(prompt), prompt_chars_limit(tokenizer, max_model_len), max_model_len)
    return encode_text(tokenizer, prompt, add_special_tokens=False, what="messages")


def _render_error(error: Exception, chat_template: Optional[str], template_kwargs: Optional[dict[str, Any]]) -> str:
    reason = f"{type(error).__name__}: {error}" if isinstance(error, jinja2.TemplateError) else str(error)
    line = getattr(error, "lineno", None)
    where = f" (template line {line})" if isinstance(error, jinja2.TemplateSyntaxError) and line else ""
    if chat_template is not None:
        return f"the chat_template given cannot render these messages: {reason}{where}"
    if template_kwargs:
        return (f"the model's chat template cannot render these messages with the template variables "
                f"{sorted(template_kwargs)} (chat_template_kwargs): {reason}")
    return f"the model's chat template cannot render these messages: {reason}"


def encode_text(tokenizer: transformers.PreTrainedTokenizerBase, text: str, add_special_tokens: bool = True,
                what: str = "prompt") -> list[int]:
    """`tokenizer.encode(text)`; ValueError names `what` when the text cannot be tokenized (e.g. it
    holds an unpaired UTF-16 surrogate, which the Rust tokenizer refuses with a TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} holds an unpaired UTF-16 surrogate {text[error.start]!r} at character "
                         f"{error.start}; text must be valid Unicode") from None
    try:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    except Exception as error:  # noqa: BLE001 - whatever the tokenizer refuses is the input's fault
        raise ValueError(f"{what} could not be tokenized: {type(error).__name__}: {error}") from None


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


# -- how long a prompt can be, and where tokenizer work runs -----------------------------------------
# Calls on inputs up to this many characters (or token ids) run inline on the event loop: ~1 ms,
# cheaper than a hop to the worker thread, and never queued behind a large input.
INLINE_TOKENIZER_SIZE = 4096

# Normalizers that never shorten text, and those that may compose up to 4 code points into 1 (the
# longest canonical decomposition is 4 code points, e.g. U+1FAF).
_NON_SHRINKING_NORMALIZERS = frozenset({"NFD", "NFKD", "Lowercase", "Prepend", "ByteLevel"})
_COMPOSING_NORMALIZERS = frozenset({"NFC", "NFKC"})
_MAX_COMPOSITION = 4
# Pre-tokenizers that split text without dropping any of it.
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"})

_chars_per_token_cache: "weakref.WeakKeyDictionary[Any, Optional[int]]" = weakref.WeakKeyDictionary()


def prompt_chars_limit(tokenizer: Any, max_model_len: int) -> Optional[int]:
    """The most characters a text can have and still encode to fewer than max_model_len tokens, or
    None when the tokenizer's structure gives no such bound (then only tokenizing tells).

    Every token covers at most `max_chars_per_token` characters of the original text, so a text of
    more than max_model_len * that many characters cannot fit; the bound is generous (real text
    averages ~4 characters a token), never wrong.
    """
    if tokenizer is None:
        return None
    try:
        chars = _chars_per_token_cache[tokenizer]
    except (KeyError, TypeError):
        chars = max_chars_per_token(tokenizer)
        try:
            _chars_per_token_cache[tokenizer] = chars
        except TypeError:       # not weak-referenceable: computed again next time
            pass
    return None if chars is None else max_model_len * chars


def max_chars_per_token(tokenizer: Any) -> Optional[int]:
    """An upper bound on the characters of input text one token stands for (None: unbounded or unknown).

    Holds for a fast tokenizer whose BPE model maps each token to a vocabulary string at least as long
    as the text it covers (byte-level keys are one character per byte; byte-fallback keys like
    `<0xE2>` are longer than their byte), whose normalizer and pre-tokenizer drop no text, and with
    no added token that swallows the whitespace around it. A WordPiece/Unigram model, a fused
    unknown token, a whitespace-dropping pre-tokenizer or a collapsing normalizer (sentencepiece's
    `Precompiled`, `Strip`, BERT's) can turn unboundedly many characters into one token: no bound.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    model = backend.model
    if type(model).__name__ != "BPE":
        return None
    if model.unk_token is not None and model.fuse_unk and not model.byte_fallback:
        return None
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    if any(getattr(token, "lstrip", False) or getattr(token, "rstrip", False) for token in added.values()):
        return None
    factor = _normalizer_shrink_factor(_component_json(backend.normalizer))
    if factor is None or not _keeps_all_text(_component_json(backend.pre_tokenizer)):
        return None
    longest = max((len(token) for token in tokenizer.get_vocab()), default=0)
    return max(1, longest) * factor


def _component_json(component: Any) -> Optional[dict]:
    return None if component is None else json.loads(component.__getstate__())


def _normalizer_shrink_factor(spec: Optional[dict]) -> Optional[int]:
    """How many input characters at most become one normalized character (None: unbounded)."""
    if spec is None or spec["type"] in _NON_SHRINKING_NORMALIZERS:
        return 1
    if spec["type"] in _COMPOSING_NORMALIZERS:
        return _MAX_COMPOSITION
    if spec["type"] == "Replace":
        pattern = spec.get("pattern", {}).get("String")
        return 1 if pattern is not None and len(spec.get("content", "")) >= len(pattern) else None
    if spec["type"] == "Sequence":
        factor = 1
        for part in spec.get("normalizers", []):
            part_factor = _normalizer_shrink_factor(part)
            if part_factor is None:
                return None
            factor *= part_factor
        return factor
    return None


def _keeps_all_text(spec: Optional[dict]) -> bool:
    if spec is None:
        return True
    if spec["type"] == "Sequence":
        return all(_keeps_all_text(part) for part in spec.get("pretokenizers", []))
    return spec["type"] in _KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"


T = TypeVar("T")


class TokenizerThread:
    """Runs tokenizer calls for one event loop: inline when small, else on one worker thread.

    NOTE: one thread, not a pool. Hugging Face fast tokenizers encode and decode safely from several
    threads (but for the truncation/padding write of a first encode, which `load_tokenizer` makes up
    front), and the Rust side releases the GIL while it works, so one thread already keeps the event
    loop free. A pool would only let a burst of large prompts take more cores from the engine's step
    loop; with one worker they queue, at most one core is spent on them, and small inputs (inline)
    never wait behind them.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor: Optional[ThreadPoolExecutor] = None

    async def run(self, function: Callable[..., T], *args: Any, size: int) -> T:
        """`function(*args)`; size: characters (or token ids) it handles, which decides where it runs."""
        if size <= INLINE_TOKENIZER_SIZE:
            return function(*args)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(function, *args))
