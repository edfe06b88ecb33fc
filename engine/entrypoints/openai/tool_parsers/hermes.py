"""Hermes-style tool calls, as Qwen2.5, Qwen3 and Hermes 2/3 write them:

    I'll look both up.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Tokyo"}}
    </tool_call>

Any number of calls, text before, between or after them. A block whose JSON is not a valid call
stays in the content verbatim, tags included. A last block the output ends in without its closing
tag (a stop string, or EOS right after the JSON) is a call if its JSON is complete and valid.
"""
from __future__ import annotations

from .base import ToolCallStream, ToolParser, partial_marker_len

START = "<tool_call>"
END = "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def stream(self) -> ToolCallStream:
        return _HermesStream(self)


class _HermesStream(ToolCallStream):
    def __init__(self, parser: ToolParser) -> None:
        super().__init__(parser)
        self._in_call = False           # `START` was consumed; `_buf` begins with the call's body
        self._end_search_from = 0       # where to look for `END` next (the body seen so far has none)

    def _advance(self, final: bool) -> None:
        while self._buf:
            if not self._in_call:
                start = self._buf.find(START)
                if start < 0:
                    keep = 0 if final else partial_marker_len(self._buf, START)
                    self._content(self._take(len(self._buf) - keep))
                    return
                self._content(self._take(start))
                self._take(len(START))
                self._in_call, self._end_search_from = True, 0
                continue
            end = self._buf.find(END, self._end_search_from)
            if end < 0:
                if not final:
                    self._end_search_from = max(0, len(self._buf) - len(END) + 1)
                    return
                body, closing = self._take(len(self._buf)), ""
            else:
                body, closing = self._take(end), END
                self._take(len(END))
            self._in_call = False
            call = self.parser.call_from_json(body)
            if call is not None:
                self._call(*call)
            else:
                self._content(START + body + closing)
        if final and self._in_call:      # the output ended right after `START`
            self._in_call = False
            self._content(START)
