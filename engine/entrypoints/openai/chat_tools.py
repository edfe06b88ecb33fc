"""How a chat request's tools shape what is generated, and how its output is read back as tool calls.

    tool_choice           generation                                     output
    "none" (or no tools)  free (the template still lists the tools)      content
    "auto" (the default   free                                           the server's tool-call parser splits
     when tools are sent)                                                calls out of the model's own syntax
    "required"            grammar: a JSON array of {"name", "parameters"} tool_calls (always valid calls)
                          objects, each a declared tool and its schema
    named function f      grammar: f's parameters schema                 one call to f; the output is its arguments

"required" and a named function never depend on the model knowing a tool syntax: structured output
makes every finished answer a valid call. "auto" needs a parser (`--tool-call-parser`, or the one
the chat template's markers point to) and `--enable-auto-tool-choice`, as in vLLM.
`parallel_tool_calls: false` allows one call ("required": maxItems 1; "auto": the first call only).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from .chat_messages import ChatCompletionRequest
from .errors import bad_request
from .tool_parsers import ToolParser, default_tool_parser, get_tool_parser
from .tool_parsers.base import ToolCallStream
from .tool_protocol import (ChatTool, DeltaFunctionCall, DeltaToolCall, FunctionCall, NamedToolChoice, ToolCall,
                            new_tool_call_id)
from ...structured_output.params import StructuredOutputsParams

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def server_tool_parser(tool_call_parser: Optional[str], enable_auto_tool_choice: bool,
                       chat_template: Optional[str]) -> Optional[type[ToolParser]]:
    """The parser "auto" uses: the one named, else the one the chat template points to. None when auto
    tool choice is off. ValueError when it is on and no parser can be told (the server cannot start)."""
    if not enable_auto_tool_choice:
        return None
    name = tool_call_parser or default_tool_parser(chat_template)
    if name is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME: this model's chat template does "
                         "not show how it writes tool calls (parsers: hermes, llama3_json, mistral)")
    return get_tool_parser(name)


@dataclass
class ToolPlan:
    """One request's tool mode: its constraint, and how each choice's text is read back."""

    mode: str                                   # "none", "auto", "required" or "named"
    tools: list[ChatTool] = field(default_factory=list)
    named: Optional[str] = None                 # the function of a named tool_choice
    parallel: bool = True                       # parallel_tool_calls
    parser_class: Optional[type[ToolParser]] = None

    @classmethod
    def of(cls, request: ChatCompletionRequest, parser_class: Optional[type[ToolParser]]) -> "ToolPlan":
        tools, choice = request.tools or [], request.tool_choice
        parallel = request.parallel_tool_calls is not False
        if not tools or choice == "none":
            return cls("none")
        if isinstance(choice, NamedToolChoice):
            return cls("named", tools, named=choice.function.name, parallel=parallel)
        if choice == "required":
            return cls("required", tools, parallel=parallel)
        # "auto", sent or implied by sending tools (OpenAI's default)
        if parser_class is None:
            raise bad_request('tool_choice "auto" (the default when tools are sent) needs a server started with '
                              "--enable-auto-tool-choice (and --tool-call-parser NAME where the chat template does "
                              'not show one); send tool_choice "required", a named function or "none" otherwise',
                              param="tool_choice")
        return cls("auto", tools, parallel=parallel, parser_class=parser_class)

    def constraint(self) -> Optional[StructuredOutputsParams]:
        """The grammar that makes "required" / named outputs valid calls (None for "none" / "auto")."""
        if self.mode == "named":
            return StructuredOutputsParams(json=self._parameters(self.named))
        if self.mode == "required":
            calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
                {"type": "object", "properties": {"name": {"enum": [tool.function.name]},
                                                  "parameters": tool.function.parameters or _ANY_OBJECT},
                 "required": ["name", "parameters"], "additionalProperties": False}
                for tool in self.tools]}}
            if not self.parallel:
                calls["maxItems"] = 1
            return StructuredOutputsParams(json=calls)
        return None

    def _parameters(self, name: Optional[str]) -> dict[str, Any]:
        tool = next(tool for tool in self.tools if tool.function.name == name)
        return tool.function.parameters or _ANY_OBJECT

    # -- reading the output ------------------------------------------------------------------------
    def read(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """A whole choice's text -> (content, tool calls)."""
        if self.mode == "named":
            return None, [ToolCall(function=FunctionCall(name=self.named, arguments=text))]
        if self.mode == "required":
            calls = _required_calls(text)
            return (None, calls) if calls is not None else (text, [])
        if self.mode == "auto":
            assert self.parser_class is not None
            extracted = self.parser_class(self.tools).extract(text)
            calls = extracted.tool_calls if self.parallel else extracted.tool_calls[:1]
            return extracted.content, calls
        return text, []

    def stream(self) -> "ChoiceToolStream":
        return ChoiceToolStream(self)


def _required_calls(text: str) -> Optional[list[ToolCall]]:
    """The calls of a "required" output (a JSON array of {"name", "parameters"}); None when the text is
    not one (cut short by max_tokens)."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
        return None
    return [ToolCall(function=FunctionCall(name=item["name"], arguments=json.dumps(item.get("parameters", {}))))
            for item in items]


class ChoiceToolStream:
    """One streamed choice: text deltas in, (content delta, tool-call deltas) out.

    named: the call's header first, then the text as its arguments, piece by piece; required: the
    calls once the array is complete (at the end); auto: the parser's stream (partial markers held
    back). The assembled deltas equal what `ToolPlan.read` gives for the whole text.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.num_calls = 0
        self._text: list[str] = []
        self._call_id = new_tool_call_id()
        self._parser_stream: Optional[ToolCallStream] = (
            plan.parser_class(plan.tools).stream() if plan.mode == "auto" and plan.parser_class else None)

    def feed(self, delta: str) -> tuple[str, list[DeltaToolCall]]:
        mode = self.plan.mode
        if mode == "none":
            return delta, []
        if mode == "named":
            deltas = []
            if self.num_calls == 0:
                self.num_calls = 1
                deltas.append(DeltaToolCall(index=0, id=self._call_id, type="function",
                                            function=DeltaFunctionCall(name=self.plan.named, arguments="")))
            if delta:
                deltas.append(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta)))
            return "", deltas
        if mode == "required":
            self._text.append(delta)
            return "", []
        assert self._parser_stream is not None
        return self._split(self._parser_stream.feed(delta))

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        mode = self.plan.mode
        if mode == "named":
            return self.feed("") if self.num_calls == 0 else ("", [])
        if mode == "required":
            text = "".join(self._text)
            calls = _required_calls(text)
            if calls is None:
                return text, []
            self.num_calls = len(calls)
            return "", [DeltaToolCall(index=i, id=call.id, type="function",
                                      function=DeltaFunctionCall(name=call.function.name,
                                                                 arguments=call.function.arguments))
                        for i, call in enumerate(calls)]
        if mode == "auto":
            assert self._parser_stream is not None
            return self._split(self._parser_stream.finish())
        return "", []

    def _split(self, items: list) -> tuple[str, list[DeltaToolCall]]:
        content, deltas = [], []
        for item in items:
            if isinstance(item, str):
                content.append(item)
            elif self.plan.parallel or item.index == 0:
                deltas.append(item)
        self.num_calls = max([self.num_calls] + [d.index + 1 for d in deltas])
        return "".join(content), deltas
