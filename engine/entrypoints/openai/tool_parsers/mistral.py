"""Mistral tool calls, in both forms Mistral's tokenizers produce:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ..., ...}]   (before v11)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}                 (v11 and later)

The newer form may carry the call's id (`name[CALL_ID]a1b2c3d4e[ARGS]{...}`), and `[ARGS]` may be
missing where a tokenizer drops it as a special token (`[TOOL_CALLS]get_weather{"city": "Paris"}`).
Text before a `[TOOL_CALLS]` is content. An array is calls only if every element is a valid call;
otherwise the marker and the array are content verbatim, like any other invalid call.

`[TOOL_CALLS]` is a special token: the request must keep special tokens in the text
(skip_special_tokens=False) for this parser to see it.

NOTE: Mistral's chat templates refuse tool-call ids that are not 9 alphanumerics when the calls come
back in the conversation, so this parser's ids have that shape (the model's own id when it wrote one).
"""
from __future__ import annotations

import secrets
import string
from typing import Any, Optional

from .base import JsonValueEnd, ToolCallStream, ToolParser, loads_json, partial_marker_len

TOOL_CALLS = "[TOOL_CALLS]"
CALL_ID = "[CALL_ID]"
ARGS = "[ARGS]"
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_-")
_ID_CHARS = frozenset(string.ascii_letters + string.digits)
_MAX_NAME = 64                          # OpenAI's limit on function names; ids get the same bound
_ID_ALPHABET = string.ascii_letters + string.digits


class MistralToolParser(ToolParser):
    name = "mistral"

    def stream(self) -> ToolCallStream:
        return _MistralStream(self)

    def new_call_id(self) -> str:
        return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))

    def call_id_of(self, value: Any) -> Optional[str]:
        """The model's own call id if it is a usable one."""
        return value if isinstance(value, str) and 0 < len(value) <= _MAX_NAME and value.isalnum() else None


def _run(text: str, pos: int, chars: frozenset[str]) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _proper_prefix(text: str, pos: int, *markers: str) -> bool:
    """Whether text[pos:] (which reaches the end of the text) may still grow into one of the markers."""
    rest = text[pos:]
    return any(marker.startswith(rest) and rest != marker for marker in markers)


def parse_head(text: str) -> tuple[str, Any]:
    """The head of a newer-form call, `name ([CALL_ID]id)? ([ARGS])? ws* {`, at the start of `text`:
    ("call", (name, call_id or None, index of "{")), or ("partial", None) while more text may complete
    it, or ("invalid", None)."""
    start = len(text) - len(text.lstrip())
    pos = _run(text, start, _NAME_CHARS)
    name = text[start:pos]
    if len(name) > _MAX_NAME:
        return "invalid", None
    if pos == len(text):
        return "partial", None
    if not name:
        return "invalid", None
    call_id = None
    if text.startswith(CALL_ID, pos):
        id_start = pos + len(CALL_ID)
        pos = _run(text, id_start, _ID_CHARS)
        call_id = text[id_start:pos]
        if len(call_id) > _MAX_NAME:
            return "invalid", None
        if pos == len(text):
            return "partial", None
        if not call_id:
            return "invalid", None
    elif _proper_prefix(text, pos, CALL_ID, ARGS):
        return "partial", None
    if text.startswith(ARGS, pos):
        pos += len(ARGS)
    elif _proper_prefix(text, pos, ARGS):
        return "partial", None
    pos = len(text) - len(text[pos:].lstrip())
    if pos == len(text):
        return "partial", None
    return ("call", (name, call_id, pos)) if text[pos] == "{" else ("invalid", None)


class _MistralStream(ToolCallStream):
    # states: "text", "marker" (after [TOOL_CALLS]: which form?), "value" (an array or object of the
    # older form), "head" (name[CALL_ID]id[ARGS] of the newer form), "args" (its arguments object)
    def __init__(self, parser: MistralToolParser) -> None:
        super().__init__(parser)
        self.parser: MistralToolParser = parser
        self._state = "text"
        self._value: Optional[JsonValueEnd] = None
        self._head: Optional[tuple[str, Optional[str], int]] = None

    def _advance(self, final: bool) -> None:
        while self._buf or (final and self._state != "text"):
            if self._state == "text":
                start = self._buf.find(TOOL_CALLS)
                if start < 0:
                    keep = 0 if final else partial_marker_len(self._buf, TOOL_CALLS)
                    self._content(self._take(len(self._buf) - keep))
                    return
                self._content(self._take(start))
                self._state = "marker"
            elif self._state == "marker":      # `_buf` still begins with the marker
                rest = self._buf[len(TOOL_CALLS):].lstrip()
                if not rest:
                    if not final:
                        return
                    self._invalid(len(self._buf))
                elif rest[0] in "[{":
                    self._value = JsonValueEnd(len(self._buf) - len(rest))
                    self._state = "value"
                elif rest[0] in _NAME_CHARS:
                    self._state = "head"
                else:
                    self._invalid(len(TOOL_CALLS))
            elif self._state == "head":
                status, head = parse_head(self._buf[len(TOOL_CALLS):])
                if status == "partial" and not final:
                    return
                if status != "call":
                    self._invalid(len(TOOL_CALLS))
                    continue
                name, call_id, brace = head
                self._head = (name, call_id, len(TOOL_CALLS) + brace)
                self._value = JsonValueEnd(len(TOOL_CALLS) + brace)
                self._state = "args"
            else:                               # "value" or "args": a JSON value that must close
                assert self._value is not None
                end = self._value.find(self._buf)
                if end is None:
                    if not final:
                        return
                    self._invalid(len(self._buf))
                    continue
                if not self._resolve(self._buf[self._value.start:end]):
                    self._invalid(end)
                    continue
                self._take(end)
                self._state, self._value, self._head = "text", None, None

    def _resolve(self, value_text: str) -> bool:
        """Emits the calls of a closed value; False (nothing emitted) if it is not all valid calls."""
        try:
            value = loads_json(value_text)
        except ValueError:
            return False
        if self._state == "args":
            assert self._head is not None
            name, call_id, _ = self._head
            arguments = self.parser.call_arguments(name, value)
            if arguments is None:
                return False
            self._call(name, arguments, self.parser.call_id_of(call_id))
            return True
        objects = value if isinstance(value, list) else [value]
        calls = [self.parser.call_from_object(obj) for obj in objects]
        if not calls or any(call is None for call in calls):
            return False
        for obj, call in zip(objects, calls):
            self._call(*call, self.parser.call_id_of(obj.get("id")))
        return True

    def _invalid(self, size: int) -> None:
        """The first `size` characters of `_buf` (from the marker on) are content, not a call."""
        self._content(self._take(size))
        self._state, self._value, self._head = "text", None, None
