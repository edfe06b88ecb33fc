"""Tool-call parsers: a model's raw output -> OpenAI `content` + `tool_calls`, whole or streamed.

Each model family writes tool calls its own way; `--tool-call-parser NAME` (vLLM's names) picks one,
and `default_tool_parser(chat_template)` guesses it from the chat template when that is unambiguous:

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>       Qwen2.5, Qwen3, Hermes
    llama3_json  <|python_tag|>{"name": ..., "parameters": {...}}; {...}         Llama 3.1 / 3.2 / 3.3
    mistral      [TOOL_CALLS][{...}]  or  [TOOL_CALLS]name[ARGS]{...}            Mistral, Mixtral

    parser = get_tool_parser("hermes")(request.tools)
    parser.extract(text)                       # -> ExtractedToolCalls(content, tool_calls)
    stream = parser.stream(); stream.feed(delta) ...; stream.finish()   # -> [str | DeltaToolCall]

See base.py for the rules all of them follow.
"""
from __future__ import annotations

from typing import Optional

from .base import DeltaItem, ExtractedToolCalls, ToolCallStream, ToolParser
from .hermes import HermesToolParser
from .llama3_json import Llama3JsonToolParser
from .mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}

# What a chat template says about the format its model was trained to call tools in.
_TEMPLATE_MARKERS: dict[str, tuple[str, ...]] = {
    "hermes": ("<tool_call>",),
    "mistral": ("[TOOL_CALLS]",),
    # "Environment: ipython" contains "ipython"; the last one is the Llama 3.1 JSON tool instructions
    "llama3_json": ("<|python_tag|>", "ipython", "respond with a JSON for a function call"),
}


def get_tool_parser(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_PARSERS)}, got {name!r}") from None


def default_tool_parser(chat_template: Optional[str]) -> Optional[str]:
    """The parser a chat template's markers point to, or None when none or several families match."""
    if not chat_template:
        return None
    matches = [name for name, markers in _TEMPLATE_MARKERS.items()
               if any(marker in chat_template for marker in markers)]
    return matches[0] if len(matches) == 1 else None


__all__ = ["TOOL_PARSERS", "DeltaItem", "ExtractedToolCalls", "HermesToolParser", "Llama3JsonToolParser",
           "MistralToolParser", "ToolCallStream", "ToolParser", "default_tool_parser", "get_tool_parser"]
