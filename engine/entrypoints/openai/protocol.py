"""The OpenAI-compatible wire format: pydantic models of requests and responses.

Requests validate strictly (a string is not an integer, `true` is not 1, 1e400 is not a float) and
check OpenAI's ranges, so a wrong type or an out-of-range value is a 400 naming the field, never a
silent coercion. Values the engine checks against the model (token ids against the vocabulary,
prompt + max_tokens against max_model_len) are left to it, so every entrypoint refuses them alike.
Unknown fields are ignored, as OpenAI and vLLM do. vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, ...) are accepted too: the openai client sends them
through `extra_body`.
"""
from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    user: Optional[str] = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for key, bias in (value or {}).items():
            if not _TOKEN_ID_KEY.fullmatch(key) or len(key) > 20:
                raise ValueError(f"logit_bias keys must be token ids (decimal integers), got {short_repr(key)}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{key}] must be in [-100, 100], got {bias!r}")
        return value


class CompletionRequest(_SamplingFields):
    # str | list[str] | list[int] | list[list[int]]: checked by hand for a clear message
    prompt: Any
    max_tokens: Optional[int] = Field(16, ge=1)
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


class ContentPart(_Request):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None

    def text(self, position: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"messages[{position}].content has a {short_repr(part.type)} part; only text parts "
                                 "are supported")
            pieces.append(part.text)
        return "".join(pieces)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(_Request):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True


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


class ChatLogProbEntry(_Response):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogProbContent(ChatLogProbEntry):
    top_logprobs: list[ChatLogProbEntry] = Field(default_factory=list)


class ChatLogProbs(_Response):
    content: Optional[list[ChatLogProbContent]] = None


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(_Response):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatStreamChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagoda"
    max_model_len: Optional[int] = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
