"""The OpenAI-compatible wire format: pydantic models of requests and responses.

Requests validate strictly (a string is not an integer, `true` is not 1, 1e400 is not a float) and
check OpenAI's ranges, so a wrong type or an out-of-range value is a 400 naming the field, never a
silent coercion. Values the engine checks against the model (token ids against the vocabulary,
prompt + max_tokens against max_model_len) are left to it, so every entrypoint refuses them alike.
vLLM's extra sampling fields (top_k, min_p, repetition_penalty, ignore_eos, min_tokens, ...) are
accepted too: the openai client sends them through `extra_body`. The chat request and its messages
live in chat_messages.py.

No field of OpenAI's chat-completions or completions body is dropped silently. Each one is

    honoured   model, messages, prompt, n, temperature, top_p, presence_penalty, frequency_penalty,
               logit_bias, seed, stop, stream, stream_options.include_usage, max_tokens,
               max_completion_tokens, logprobs, top_logprobs, echo (with max_tokens=0: the prompt
               and its logprobs only), best_of (equal to n), response_format, tools, tool_choice,
               parallel_tool_calls, modalities (["text"]), reasoning_effort (passed to the chat
               template as the variable `reasoning_effort`, as vLLM does; a template that does not
               read it renders as without it)
    refused    (400 naming the field) audio, modalities other than ["text"], prediction,
               web_search_options, verbosity, functions and function_call (deprecated; declare them
               as `tools` instead), suffix, best_of other than n, max_tokens=0 without echo,
               stream_options without stream, content parts other than text (image_url,
               input_audio, file, refusal), tool_choice other than "none" without tools, a
               request's chat_template where the server does not trust request templates
    advisory   accepted and ignored, as OpenAI itself treats them as hints or bookkeeping: user,
               metadata, store, service_tier, prompt_cache_key, prompt_cache_retention,
               safety_identifier, stream_options.include_obfuscation

Structured output: `response_format` ({"type": "text" | "json_object" | "json_schema"}), vLLM's
`structured_outputs` object (json, json_object, regex, choice, grammar) and its older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` (`guided_decoding_backend` is accepted and ignored:
the server has one grammar backend). A request sets at most one of them; two are a 400 naming both.
Fields outside OpenAI's and vLLM's lists are ignored, as vLLM does.
"""
from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ...structured_output.params import StructuredOutputsParams
from .errors import short_repr

# OpenAI's documented limits (vLLM's where OpenAI has none).
MAX_LOGPROBS = 20
MAX_N = 128
# A seed is a 64-bit integer for every sampler (and for the gRPC API).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_TOKEN_ID_KEY = re.compile(r"-?[0-9]+")


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False
    # include_obfuscation (OpenAI pads streamed chunks against side channels) is advisory: ignored


# -- structured output --------------------------------------------------------------------------------
class JsonSchemaFormat(_Request):
    """response_format.json_schema: the output is one JSON value valid against `schema`."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, populate_by_name=True)
    name: str
    # NOTE: named schema_ because `schema` is a (deprecated) BaseModel method; the wire name is `schema`
    schema_: dict[str, Any] = Field(alias="schema")
    strict: Optional[bool] = None          # constrained decoding always follows the schema exactly
    description: Optional[str] = None      # a hint for the model in OpenAI's API; nothing to do here


class ResponseFormat(_Request):
    """OpenAI's response_format, discriminated by `type`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_goes_with_its_type(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object with a name and a schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema is only read with type 'json_schema', got type {self.type!r}")
        return self

    @property
    def constrains(self) -> bool:
        return self.type != "text"


class StructuredOutputsRequest(_Request):
    """vLLM's `structured_outputs` request object: exactly one constraint."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, populate_by_name=True)
    # NOTE: named json_ because `json` is a (deprecated) BaseModel method; the wire name is `json`
    json_: Optional[Union[str, dict[str, Any]]] = Field(None, alias="json")
    json_object: Optional[bool] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    disable_any_whitespace: bool = False
    structural_tag: Optional[Any] = None

    @model_validator(mode="after")
    def _one_constraint(self) -> "StructuredOutputsRequest":
        if self.structural_tag is not None:
            raise ValueError("structural_tag is not supported; use json, json_object, regex, choice or grammar")
        self.to_params()
        return self

    def to_params(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(json=self.json_, json_object=self.json_object, regex=self.regex,
                                       choice=self.choice, grammar=self.grammar,
                                       disable_any_whitespace=self.disable_any_whitespace)


# vLLM's older per-constraint fields -> the StructuredOutputsParams field each one sets
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
# Every field that can constrain the output, in declaration order (at most one per request).
CONSTRAINT_FIELDS = ("response_format", "structured_outputs", *GUIDED_FIELDS)


def _constrains(value: Any) -> bool:
    if value is None:
        return False
    return value.constrains if isinstance(value, ResponseFormat) else True


def guided_params(field: str, value: Any) -> StructuredOutputsParams:
    """The constraint of one guided_* field; its ValueError speaks of that field."""
    kind = GUIDED_FIELDS[field]
    try:
        return StructuredOutputsParams(**{kind: value})
    except ValueError as error:
        raise ValueError(str(error).replace(f"structured_outputs.{kind}", field)) from None


class _SamplingFields(_Request):
    """Fields both /v1/completions and /v1/chat/completions take."""

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None             # advisory: OpenAI's end-user id for abuse monitoring
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    # structured output (see the module docstring); NOTE: CONSTRAINT_FIELDS relies on this order
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsRequest] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None      # accepted and ignored: the server has one backend

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for key, bias in (value or {}).items():
            if not _TOKEN_ID_KEY.fullmatch(key) or len(key) > 20:
                raise ValueError(f"logit_bias keys must be token ids (decimal integers), got {short_repr(key)}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{key}] must be in [-100, 100], got {bias!r}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: Optional[StreamOptions], info: ValidationInfo) -> Optional[StreamOptions]:
        if value is not None and not info.data.get("stream", False):
            raise ValueError("stream_options is only allowed with stream=true")
        return value

    @field_validator("structured_outputs", *GUIDED_FIELDS)
    @classmethod
    def _one_constraint(cls, value: Any, info: ValidationInfo) -> Any:
        # NOTE: fields validate in declaration order, so info.data holds the constraints declared
        # before this one: a second constraint is refused here, naming both.
        field = info.field_name
        if value is None:
            return value
        if field in GUIDED_FIELDS:
            guided_params(field, value)
        earlier = [name for name in CONSTRAINT_FIELDS[:CONSTRAINT_FIELDS.index(field)]
                   if _constrains(info.data.get(name))]
        if earlier:
            raise ValueError(f"{earlier[0]} and {field} both constrain the output; pass one of them")
        return value


class CompletionRequest(_SamplingFields):
    # str | list[str] | list[int] | list[list[int]]: checked by hand for a clear message
    prompt: Any
    # 0 only with echo: the prompt and its logprobs, nothing generated (scoring harnesses ask for it)
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        def is_ids(item: Any) -> bool:
            # NOTE: set(map(type, ...)) runs in C: a body may hold millions of ids (bool is not int here)
            return isinstance(item, list) and set(map(type, item)) <= {int}

        ok = (isinstance(value, str) or is_ids(value)
              or (isinstance(value, list) and value and all(isinstance(p, str) for p in value))
              or (isinstance(value, list) and value and all(is_ids(p) for p in value)))
        if not ok:
            raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of "
                             f"token-id lists, got {short_repr(value)}")
        return value

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts of this request, one per entry (a flat list of ints is one prompt)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        return [self.prompt]


class DetokenizeRequest(_Request):
    model: Optional[str] = None
    tokens: list[int]


# -- responses ----------------------------------------------------------------------------------------
class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorInfo(_Response):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[int, str]] = None


class ErrorResponse(_Response):
    error: ErrorInfo


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagoda"
    max_model_len: Optional[int] = None
    # what the server runs: the quantization scheme (None = unquantized), the weights' format in one
    # line, and the KV cache's element type
    quantization: Optional[str] = None
    weights: Optional[str] = None
    kv_cache_dtype: Optional[str] = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
