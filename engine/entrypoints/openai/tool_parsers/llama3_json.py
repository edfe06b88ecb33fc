"""Llama 3.x JSON tool calls (Llama 3.1 / 3.2 / 3.3 with the JSON tool-calling prompt of their chat
templates):

    {"name": "get_weather", "parameters": {"city": "Paris"}}
    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

A call is a JSON object with "name" and "parameters" (or "arguments"), at the start of the output or
right after `<|python_tag|>` (which `skip_special_tokens` usually removes); further calls follow,
separated by `;` or whitespace. Output that starts with anything else is ordinary text: content, streamed
without delay. An object that is not a valid call (another JSON answer, an undeclared name, malformed or
truncated JSON) is content verbatim, and so is everything after it up to the next `<|python_tag|>`.

NOTE: an output that starts with "{" is held back until that object closes, since only then is it known
to be a call or not.
"""
from __future__ import annotations

import re
from typing import Optional

from .base import JsonValueEnd, ToolCallStream, ToolParser, partial_marker_len

PYTHON_TAG = "<|python_tag|>"
_WHITESPACE = re.compile(r"\s*")


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def stream(self) -> ToolCallStream:
        return _Llama3JsonStream(self)


class _Llama3JsonStream(ToolCallStream):
    # states: "start" (nothing decided), "text" (content until a python tag), "calls" (a call may
    # follow), "separator" (after a call: ';', whitespace, another call or text)
    def __init__(self, parser: ToolParser) -> None:
        super().__init__(parser)
        self._state = "start"
        self._raw = ""                  # consumed marker text that becomes content if no call follows
        self._value: Optional[JsonValueEnd] = None

    def _advance(self, final: bool) -> None:
        while self._buf:
            # NOTE: offsets, not `lstrip()`: a held object is re-examined on every delta
            lead = _WHITESPACE.match(self._buf).end()
            at_end = lead == len(self._buf)
            if self._state == "text":
                tag = self._buf.find(PYTHON_TAG)
                if tag < 0:
                    keep = 0 if final else partial_marker_len(self._buf, PYTHON_TAG)
                    self._content(self._take(len(self._buf) - keep))
                    return
                self._content(self._take(tag))
                self._raw = self._take(len(PYTHON_TAG))
                self._state = "calls"
            elif self._state in ("start", "separator"):
                if at_end and not final:
                    return
                if self._buf.startswith(PYTHON_TAG, lead):
                    self._raw = self._take(lead + len(PYTHON_TAG))
                    self._state = "calls"
                elif self._buf.startswith("{", lead):
                    self._state = "calls"
                elif self._state == "separator" and self._buf.startswith(";", lead):
                    self._take(lead + 1)                    # the separator between two calls
                    self._state = "calls"
                elif (not final and len(self._buf) - lead < len(PYTHON_TAG)
                      and PYTHON_TAG.startswith(self._buf[lead:])):
                    return
                else:
                    self._state = "text"
            elif not self._buf.startswith("{", lead):      # "calls", but no object follows
                if at_end and not final:
                    return
                self._content(self._raw)
                self._raw, self._state = "", "text"
            else:                               # "calls", an object
                if self._value is None:
                    self._value = JsonValueEnd(lead)
                end = self._value.find(self._buf)
                if end is None:
                    if not final:
                        return
                    end = len(self._buf)
                self._value = None
                text = self._take(end)
                call = self.parser.call_from_json(text)
                if call is not None:
                    self._call(*call)
                    self._state = "separator"
                else:
                    self._content(self._raw + text)
                    self._state = "text"
                self._raw = ""
        if final and self._raw:                 # the output ended right after a python tag
            self._content(self._raw)
            self._raw = ""
