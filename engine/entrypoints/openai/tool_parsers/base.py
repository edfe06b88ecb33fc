"""The tool-parser interface, and the streaming machinery every model family shares.

A tool parser turns a model's raw chat output into OpenAI's `message.content` + `message.tool_calls`:

    parser = HermesToolParser(request.tools)
    parser.extract(text)          -> ExtractedToolCalls(content, tool_calls)       (whole output)
    stream = parser.stream()      (one per choice)
    stream.feed(delta_text)       -> [content str | DeltaToolCall, ...]            (per detokenized delta)
    stream.finish()               -> the same, for what was held back            (once, at the end)

Each family is one state machine over text (a `ToolCallStream` subclass); `extract` is that machine fed
the whole output at once, so a streamed and a non-streamed response agree by construction, and the
tests check that every chunking of an output assembles to the same result.

Rules every family follows:
- A call names a tool the request declared, and its arguments are a JSON object; anything else inside
  a call marker (malformed JSON, an undeclared name, a truncated call) is kept verbatim as content.
- `arguments` is `json.dumps` of the parsed object (OpenAI's separators), whatever spacing the model used.
- Whitespace between text and a call is a separator, not content: "A\\n\\n<call>\\n\\nB" gives content
  "A\\n\\nB", "Sure!\\n<call>" gives "Sure!", and a response that is only calls has content None.
- Streaming never shows a partial marker as content: text that could be the start of one is held back
  until it is complete or cannot be one.

NOTE: a call is streamed as one delta (id, type, name and the complete arguments) once it is complete
and valid, not argument by argument. Until a call has closed it may still turn out malformed (or be
cut by max_tokens) and so become content, and a delta that was sent cannot be taken back.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Optional, Sequence, Union

from ..tool_protocol import ChatTool, DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall, new_tool_call_id

# A stream's output: content text, or (part of) a tool call, in the order they occur in the output.
DeltaItem = Union[str, DeltaToolCall]


@dataclass
class ExtractedToolCalls:
    content: Optional[str]                        # None when there is no text besides the calls
    tool_calls: list[ToolCall] = field(default_factory=list)

    @classmethod
    def from_items(cls, items: Iterable[DeltaItem]) -> ExtractedToolCalls:
        """Assembles stream items as the openai SDK does: content by concatenation, calls by `index`
        (id, type and name from the delta that carries them, `arguments` concatenated)."""
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        for item in items:
            if isinstance(item, str):
                content.append(item)
                continue
            call = calls.setdefault(item.index, {"id": None, "name": "", "arguments": ""})
            if item.id is not None:
                call["id"] = item.id
            if item.function is not None:
                call["name"] += item.function.name or ""
                call["arguments"] += item.function.arguments or ""
        tool_calls = [ToolCall(id=call["id"] or new_tool_call_id(),
                               function=FunctionCall(name=call["name"], arguments=call["arguments"]))
                      for _, call in sorted(calls.items())]
        return cls(content="".join(content) or None, tool_calls=tool_calls)


# -- text helpers ----------------------------------------------------------------------------------
def partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`: the part a stream
    must hold back because the next delta may complete the marker."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_json(text: str) -> Any:
    """Strict JSON (no NaN/Infinity, which `json.dumps` would write back as invalid JSON).
    Raises ValueError."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


class JsonValueEnd:
    """Where the JSON object or array that starts at `text[start]` ends, found incrementally.

    Tracks bracket depth outside strings (escapes included), so feeding a growing text costs
    O(new characters). It only finds the end; `loads_json` decides whether the value is valid.
    NOTE: the text before `start` must not change between calls (streams keep their buffer until
    the value is resolved).
    """

    _STRING_STOP = re.compile(r'["\\]')
    _VALUE_STOP = re.compile(r'["\[\]{}]')

    def __init__(self, start: int) -> None:
        self.start = start
        self._pos = start
        self._depth = 0
        self._in_string = False

    def find(self, text: str) -> Optional[int]:
        """The index just past the value's closing bracket, or None while it is still open."""
        pos = self._pos
        while True:
            if self._in_string:
                match = self._STRING_STOP.search(text, pos)
                if match is None:
                    self._pos = len(text)
                    return None
                if match.group() == "\\":
                    if match.end() >= len(text):           # the escaped character has not arrived yet
                        self._pos = match.start()
                        return None
                    pos = match.end() + 1
                    continue
                self._in_string = False
                pos = match.end()
                continue
            match = self._VALUE_STOP.search(text, pos)
            if match is None:
                self._pos = len(text)
                return None
            char, pos = match.group(), match.end()
            if char == '"':
                self._in_string = True
            elif char in "[{":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth <= 0:
                    self._pos = pos
                    return pos


# -- parser and stream base classes ------------------------------------------------------------------
class ToolParser:
    """One model family's tool-call format. Construct one per request with the request's `tools`."""

    name: ClassVar[str] = ""

    def __init__(self, tools: Optional[Sequence[ChatTool]]) -> None:
        self.tool_names = frozenset(tool.function.name for tool in tools or ())

    def stream(self) -> ToolCallStream:
        """A fresh stream: one per choice of a streamed response."""
        raise NotImplementedError

    def extract(self, text: str) -> ExtractedToolCalls:
        """Content and tool calls of a whole output (what `stream` assembles to)."""
        stream = self.stream()
        return ExtractedToolCalls.from_items(stream.feed(text) + stream.finish())

    def new_call_id(self) -> str:
        return new_tool_call_id()

    def call_arguments(self, name: Any, arguments: Any) -> Optional[str]:
        """The `arguments` JSON text of a call to `name`, or None if it is not a valid call: the name
        must be a declared tool and the arguments an object (or JSON text of one; absent means {})."""
        if not isinstance(name, str) or name not in self.tool_names:
            return None
        if arguments is None:
            arguments = {}
        elif isinstance(arguments, str):
            # some models write the arguments object as a JSON string
            try:
                arguments = loads_json(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return json.dumps(arguments)

    def call_from_object(self, obj: Any) -> Optional[tuple[str, str]]:
        """(name, arguments JSON) of a `{"name": ..., "arguments" | "parameters": {...}}` object, or None."""
        if not isinstance(obj, dict) or ("arguments" in obj and "parameters" in obj):
            return None
        arguments = self.call_arguments(obj.get("name"), obj.get("arguments", obj.get("parameters")))
        return None if arguments is None else (obj["name"], arguments)

    def call_from_json(self, text: str) -> Optional[tuple[str, str]]:
        """`call_from_object` of JSON text (surrounding whitespace allowed), None if it is not JSON."""
        try:
            return self.call_from_object(loads_json(text))
        except ValueError:
            return None


class ToolCallStream:
    """Feeds a choice's output deltas through one family's state machine.

    `feed` and `finish` return items in output order: content strings and `DeltaToolCall`s (each call
    in one delta with its `index`, id, type, name and arguments). Joining the content and assembling
    the calls by index gives exactly `parser.extract(whole_output)`.
    """

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self._buf = ""                  # text received but not yet resolved
        self._out: list[DeltaItem] = []
        self._pending_ws = ""           # trailing whitespace of the content: kept only if text follows
        self._after_call = False        # a call came after the last content text
        self._has_content = False       # some non-whitespace content was emitted
        self._num_calls = 0
        self._finished = False

    @property
    def num_calls(self) -> int:
        """Tool calls emitted so far (the next call's `index`)."""
        return self._num_calls

    def feed(self, delta_text: str) -> list[DeltaItem]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta_text
        self._advance(final=False)
        return self._drain()

    def finish(self) -> list[DeltaItem]:
        """Resolves what was held back (an unclosed call is content unless it is complete and valid)."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        self._advance(final=True)
        assert not self._buf, f"{type(self).__name__} left text unresolved at the end"
        if self._pending_ws and not self._after_call:
            self._out.append(self._pending_ws)
        self._pending_ws = ""
        return self._drain()

    def _advance(self, final: bool) -> None:
        """Consumes `self._buf` as far as it can be resolved (all of it when `final`)."""
        raise NotImplementedError

    # -- helpers for subclasses ----------------------------------------------------------------------
    def _take(self, size: int) -> str:
        taken, self._buf = self._buf[:size], self._buf[size:]
        return taken

    def _content(self, text: str) -> None:
        if self._after_call:
            # whitespace after a call separates; the whitespace before the calls (pending) stands in
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        text = self._pending_ws + text
        body = text.rstrip()
        if body:
            self._out.append(body)
            self._has_content = True
        self._pending_ws = text[len(body):]

    def _call(self, name: str, arguments: str, call_id: Optional[str] = None) -> None:
        self._out.append(DeltaToolCall(index=self._num_calls, id=call_id or self.parser.new_call_id(),
                                       type="function",
                                       function=DeltaFunctionCall(name=name, arguments=arguments)))
        self._num_calls += 1
        self._after_call = True
        if not self._has_content:       # leading whitespace separates nothing
            self._pending_ws = ""

    def _drain(self) -> list[DeltaItem]:
        merged: list[DeltaItem] = []
        for item in self._out:
            if isinstance(item, str) and merged and isinstance(merged[-1], str):
                merged[-1] += item
            else:
                merged.append(item)
        self._out = []
        return merged
