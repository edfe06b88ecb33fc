"""The chat completion response, whole and streamed: messages with content, reasoning and tool calls.

Apart from protocol.py because they carry the tool-call models (tool_protocol.py), which build on it.
"""
from __future__ import annotations

import time
from typing import Literal, Optional, Union

from pydantic import Field

from .protocol import UsageInfo, _Response
from .tool_protocol import DeltaToolCall, ToolCall


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
    reasoning_content: Optional[str] = None      # with a reasoning parser: what the model thought first
    tool_calls: list[ToolCall] = Field(default_factory=list)


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
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


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
