"""The model's own sampling defaults (its `generation_config.json`), and the one place they meet a request.

Model creators state the sampling they recommend next to the weights (Qwen3: temperature 0.6, top_p
0.95, top_k 20). As in vLLM, `--generation-config` (EngineArgs.generation_config) says where pagoda
takes its defaults from:

    auto   (the default) the model's generation_config.json: in the checkpoint folder, or for a GGUF
           file the folder it is in; no file = pagoda's own defaults
    vllm   pagoda's own defaults (OpenAI's: temperature 1, top_p 1, no top_k / min_p / penalty)
    PATH   a folder holding a generation_config.json (or that file)

Read from the file: temperature, top_p, top_k, min_p, repetition_penalty, and max_new_tokens, which
bounds the output of requests that leave max_tokens unset (as vLLM's default max_tokens). A value of
the wrong type or out of range is refused at start-up, naming the key and the file.
NOTE: do_sample is not read (vLLM ignores it too): a file that states a temperature means it.

Requests: `GenerationDefaults.merge` is the one merge. A sampling field the request set keeps its
value; one it left unset (None) takes the model's default; one neither sets is left to
`SamplingParams`' own default. Who calls it:
- the OpenAI completions and chat routes (entrypoints/openai/request_to_params.py), with the engine
  client's `generation_defaults`, so the cluster ingress, which serves the same routes, merges the
  replicas' defaults the same way;
- the offline `LLM` when `generate` / `chat` get no SamplingParams (`LLM.get_default_sampling_params`).
  A SamplingParams object the caller passes is used as given: all its fields hold values, and a
  field left at its default cannot be told from one set to it (start from
  `llm.get_default_sampling_params()` to change a few fields of the model's defaults).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"
GENERATION_CONFIG_MODES = ("auto", "vllm")
# The request fields a model default can fill (SamplingParams names).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return _number(value) and float(value).is_integer()


# file key -> (GenerationDefaults field, type check, range check, the rule in words)
_RULES: dict[str, tuple[str, Callable[[Any], bool], Callable[[float], bool], str]] = {
    "temperature": ("temperature", _number, lambda v: v >= 0.0, "a number >= 0"),
    "top_p": ("top_p", _number, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    "top_k": ("top_k", _integer, lambda v: v >= -1, "an integer >= -1 (0 or -1: all tokens)"),
    "min_p": ("min_p", _number, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "repetition_penalty": ("repetition_penalty", _number, lambda v: v > 0.0, "a number > 0"),
    "max_new_tokens": ("max_tokens", _integer, lambda v: v >= 1, "an integer >= 1"),
}


@dataclass(frozen=True)
class GenerationDefaults:
    """The model's defaults (None = not stated: pagoda's own applies). `source` is the file they came from."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    max_tokens: Optional[int] = None          # the file's max_new_tokens
    source: Optional[str] = None

    def values(self) -> dict[str, Any]:
        """The defaults stated, by SamplingParams name, in a fixed order."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "source" and getattr(self, f.name) is not None}

    def __bool__(self) -> bool:
        return bool(self.values())

    def describe(self) -> str:
        """'temperature=0.6, top_p=0.95, max_new_tokens=2048' (the file's names)."""
        return ", ".join(f"{'max_new_tokens' if name == 'max_tokens' else name}={value}"
                         for name, value in self.values().items())

    def merge(self, requested: Mapping[str, Any]) -> dict[str, Any]:
        """The sampling fields a request runs with: `requested` maps SAMPLING_FIELDS names to the
        request's values (None = unset). A value the request set wins; an unset one takes the model's
        default; a field neither sets is left out, so SamplingParams' own default applies."""
        unknown = sorted(set(requested) - set(SAMPLING_FIELDS))
        if unknown:
            raise ValueError(f"merge takes the sampling fields {list(SAMPLING_FIELDS)}, got {unknown}")
        merged: dict[str, Any] = {}
        for name in SAMPLING_FIELDS:
            value = requested.get(name)
            if value is None:
                value = getattr(self, name)
            if value is not None:
                merged[name] = value
        return merged

    def output_budget(self, room: int) -> int:
        """The most tokens a request that left max_tokens unset may generate, given the `room` its
        prompt leaves in max_model_len: the model's max_new_tokens where it states one and it fits."""
        return room if self.max_tokens is None else min(room, self.max_tokens)

    def sampling_params(self) -> SamplingParams:
        """The SamplingParams of a request that sets nothing itself (the offline LLM without params).

        NOTE: with a max_new_tokens, max_tokens is None, which the engine bounds with `output_budget`
        (the model's max_new_tokens, or less where the prompt leaves less room), so a long prompt never
        fails for a limit its caller did not set; without one, SamplingParams' own 16 stays."""
        fields_set: dict[str, Any] = self.merge({})
        if self.max_tokens is not None:
            fields_set["max_tokens"] = None
        return SamplingParams(**fields_set)


def load_generation_defaults(generation_config: str, model_dir: Path) -> GenerationDefaults:
    """The defaults `generation_config` ('auto', 'vllm' or a path) selects for the model in `model_dir`.

    ValueError for a mode that is none of these, a PATH without the file, a file that is not a JSON
    object, or a value of the wrong type or out of range (named with its key and the file).
    """
    if not isinstance(generation_config, str) or not generation_config.strip():
        raise ValueError(f"generation_config must be 'auto', 'vllm' or a folder holding {GENERATION_CONFIG_FILE}, "
                         f"got {generation_config!r}")
    if generation_config == "vllm":
        return GenerationDefaults()
    if generation_config == "auto":
        file = Path(model_dir) / GENERATION_CONFIG_FILE
        if not file.is_file():
            return GenerationDefaults()
    else:
        path = Path(generation_config).expanduser()
        file = path / GENERATION_CONFIG_FILE if path.is_dir() else path
        if not file.is_file():
            raise ValueError(
                f"generation_config must be 'auto', 'vllm' or a folder holding {GENERATION_CONFIG_FILE}, got "
                f"{generation_config!r}" + (f", which has no {GENERATION_CONFIG_FILE}" if path.is_dir()
                                            else ", which does not exist"))
    return _read(file.resolve())


def _read(file: Path) -> GenerationDefaults:
    ignore = "fix the file, or pass --generation-config vllm to ignore it"
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"generation config {str(file)!r} cannot be read as JSON ({error}); {ignore}") from None
    if not isinstance(content, dict):
        raise ValueError(f"generation config {str(file)!r} must hold a JSON object, got {type(content).__name__}; "
                         f"{ignore}")
    values: dict[str, Any] = {}
    for key, (name, type_ok, range_ok, rule) in _RULES.items():
        value = content.get(key)
        if value is None:                    # absent, or null as transformers writes unset values
            continue
        if not type_ok(value) or not range_ok(value):
            raise ValueError(f"generation config {str(file)!r}: {key} must be {rule}, got {value!r}; {ignore}")
        values[name] = int(value) if name in ("top_k", "max_tokens") else float(value)
    return GenerationDefaults(**values, source=str(file))


def log_generation_defaults(defaults: GenerationDefaults, generation_config: str) -> None:
    """The start-up line saying the model's defaults apply (nothing when it states none)."""
    if not defaults:
        return
    whose = "the model's generation defaults" if generation_config == "auto" else \
        f"the generation defaults of {defaults.source}"
    # NOTE: a warning, as in vLLM: sampling then differs from pagoda's (and OpenAI's) usual defaults
    logger.warning("using %s: %s (--generation-config vllm to ignore)", whose, defaults.describe())
