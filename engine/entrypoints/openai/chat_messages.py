"""The chat request: its messages (text, the assistant's tool calls, tool results), the tools it
declares, how its chat template is rendered, and the fields OpenAI has that pagoda cannot honour.

Messages are validated as OpenAI does (a tool result names the call it answers; only assistant
messages carry tool calls; only text content parts), then turned into the dicts Hugging Face chat
templates expect (`ChatMessage.to_template_dict`): tool-call arguments as a dict where they are JSON
(templates such as Qwen's and Llama's iterate over them), the `developer` role as `system`, and an
assistant's `reasoning_content` (sent back by clients of reasoning models) left out.

Cross-field checks (tool_choice against tools, add_generation_prompt against continue_final_message)
are field validators on the later field, so the 400 names that field. See protocol.py's docstring
for what happens to every OpenAI field.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union, get_args

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ...processing.tokenizer import RESERVED_TEMPLATE_KWARGS
from .errors import short_repr
from .protocol import MAX_LOGPROBS, _Request, _SamplingFields
from .tool_protocol import ChatTool, NamedToolChoice

# OpenAI's reasoning_effort values (passed to the chat template, see ChatCompletionRequest).
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
REASONING_EFFORTS = get_args(ReasoningEffort)

# Fields OpenAI has and pagoda cannot honour: any non-null value is a 400 with this reason.
_REFUSED = {
    "audio": "audio output is not supported; pagoda generates text only",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "functions": "functions (deprecated by OpenAI) is not supported; declare them as tools: "
                 "[{'type': 'function', 'function': {...}}]",
    "function_call": "function_call (deprecated by OpenAI) is not supported; use tool_choice with tools",
    "verbosity": "verbosity is not supported; the model's chat template has no such control",
}


class ContentPart(_Request):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: Optional[str] = None


class MessageFunctionCall(_Request):
    name: str
    arguments: str                                     # JSON text, as OpenAI sends it back


class MessageToolCall(_Request):
    """A tool call of an earlier assistant turn, as the client sends the conversation back."""

    id: str
    type: Literal["function"]
    function: MessageFunctionCall


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[MessageToolCall]] = None     # assistant only
    tool_call_id: Optional[str] = None                     # tool only: the call this result answers
    # what a reasoning model thought before this assistant turn; templates are not shown it (as vLLM)
    reasoning_content: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: Optional[Union[str, list[ContentPart]]]) -> Any:
        if isinstance(value, list):
            for part in value:
                if part.type != "text":
                    raise ValueError(f"only text content parts are supported, got a {short_repr(part.type)} part")
                if part.text is None:
                    raise ValueError("a text content part needs its 'text'")
        return value

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls is only allowed in assistant messages, got role {self.role!r}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self, position: int) -> str:
        """The content as one string ('' for none). Parts are validated as text when parsed."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.type != "text" or part.text is None:      # a model built without validation
                raise ValueError(f"messages[{position}].content has a {short_repr(part.type)} part; only text parts "
                                 "are supported")
            pieces.append(part.text)
        return "".join(pieces)

    def to_template_dict(self, position: int) -> dict[str, Any]:
        """The message as Hugging Face chat templates expect it."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text(position)}
        if self.name is not None:
            message["name"] = self.name
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": template_arguments(call.function.arguments)}}
                for call in self.tool_calls]
        return message


def template_arguments(arguments: str) -> Union[dict[str, Any], str]:
    """A tool call's JSON arguments as a dict (what templates iterate over); text that is not a JSON
    object stays text, so the template shows what the model wrote."""
    if not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    # tools (the calls are parsed from the output by the server's tool-call parser)
    tools: Optional[list[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = True
    # the chat template (vLLM's fields)
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # NOTE: passed to the chat template as `reasoning_effort`, as vLLM does (gpt-oss's template reads
    # it); a template that does not read it renders as without it. Use chat_template_kwargs for
    # template-specific switches such as Qwen3's enable_thinking.
    reasoning_effort: Optional[ReasoningEffort] = None
    modalities: Optional[list[str]] = None
    # refused when set (see _REFUSED)
    audio: Optional[Any] = None
    prediction: Optional[Any] = None
    web_search_options: Optional[Any] = None
    functions: Optional[Any] = None
    function_call: Optional[Any] = None
    verbosity: Optional[Any] = None
    # advisory (OpenAI's bookkeeping and hints): accepted and ignored
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[str] = None
    safety_identifier: Optional[str] = None

    @field_validator(*_REFUSED)
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError(_REFUSED[info.field_name])
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None and value != ["text"]:
            raise ValueError(f"only the 'text' modality is supported, got {short_repr(value)}")
        return value

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, value: Optional[list[ChatTool]]) -> Optional[list[ChatTool]]:
        seen: set[str] = set()
        for tool in value or []:
            if tool.function.name in seen:
                raise ValueError(f"two tools are named {short_repr(tool.function.name)}; names must be distinct")
            seen.add(tool.function.name)
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, value: Any, info: ValidationInfo) -> Any:
        # NOTE: as vLLM: "none" asks for nothing, so it needs no tools; tools=[] counts as no tools.
        if value is None or value == "none":
            return value
        tools = info.data.get("tools") or []
        shown = repr(value) if isinstance(value, str) else f"function {value.function.name!r}"
        if not tools:
            raise ValueError(f"tool_choice {shown} needs tools; the request declares none")
        if isinstance(value, NamedToolChoice):
            names = [tool.function.name for tool in tools]
            if value.function.name not in names:
                raise ValueError(f"tool_choice names function {short_repr(value.function.name)}, which is not among "
                                 f"the tools {short_repr(names)}")
        return value

    @field_validator("chat_template")
    @classmethod
    def _template_not_empty(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            raise ValueError("chat_template must not be empty (leave it out for the model's template)")
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _not_reserved(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        reserved = sorted(set(value or {}) & RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {reserved}: they are request fields or the "
                             "renderer's own arguments")
        return value

    @field_validator("continue_final_message")
    @classmethod
    def _not_with_generation_prompt(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("add_generation_prompt", True):
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true; send "
                             "add_generation_prompt=false to continue the final message")
        return value

    # -- what the chat template is given --------------------------------------------------------------
    def template_messages(self) -> list[dict[str, Any]]:
        return [message.to_template_dict(position) for position, message in enumerate(self.messages)]

    def template_tools(self) -> Optional[list[dict[str, Any]]]:
        """The tools as the dicts chat templates iterate over ({"type": "function", "function": {...}})."""
        if not self.tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def template_kwargs(self) -> dict[str, Any]:
        """Extra template variables: reasoning_effort, then chat_template_kwargs (which win, as in vLLM)."""
        kwargs: dict[str, Any] = {}
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.reasoning_effort
        kwargs.update(self.chat_template_kwargs or {})
        return kwargs


class TokenizeRequest(_Request):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
