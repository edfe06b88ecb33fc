"""`<think>...</think>` reasoning parsers: a model's raw output -> OpenAI-style `reasoning_content` + `content`.

    Qwen3        <think>\\nplan...\\n</think>\\n\\nanswer      reasoning only when the output starts with
                 <think> (with enable_thinking=false the template closes the block in the prompt)
    DeepSeek-R1  plan...\\n</think>\\n\\nanswer              the template opened <think> in the prompt, so
                 the output is reasoning until </think> (an explicit leading <think> is accepted too)

Reasoning is returned without the tags and without the newlines that touch them; content after
</think> loses its leading newlines. A reasoning block that never closes (max_tokens) is all
reasoning. Streaming holds back text that could be the start of a tag, so no channel ever shows a
partial tag; `extract` is the stream fed the whole text, so both always agree.
"""
from __future__ import annotations

from typing import ClassVar, Optional

from ..tool_parsers.base import partial_marker_len

START = "<think>"
END = "</think>"
_NEWLINES = "\r\n"

# (reasoning delta, content delta): None where a channel got nothing
ReasoningDelta = tuple[Optional[str], Optional[str]]


class ReasoningStream:
    """Splits one choice's output deltas into reasoning and content deltas."""

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._starts_in_reasoning = starts_in_reasoning
        self._state = "start"           # "start" (undecided), "reasoning", "content"
        self._buf = ""
        self._strip_leading = False     # drop newlines at the start of the current channel
        self._pending_newlines = ""     # reasoning's trailing newlines: dropped if </think> follows
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._finished = False

    @property
    def reasoning_ended(self) -> bool:
        """Whether what follows is the answer (the reasoning closed, or there is none)."""
        return self._state == "content"

    def feed(self, delta_text: str) -> ReasoningDelta:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta_text
        self._advance(final=False)
        return self._drain()

    def finish(self) -> ReasoningDelta:
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        self._advance(final=True)
        if self._pending_newlines:      # newlines of an unclosed block touch no tag: they are reasoning
            self._reasoning.append(self._pending_newlines)
            self._pending_newlines = ""
        return self._drain()

    def _advance(self, final: bool) -> None:
        while self._buf:
            if self._state == "start":
                rest = self._buf.lstrip()
                if rest.startswith(START):
                    self._buf = rest[len(START):]
                    self._state, self._strip_leading = "reasoning", True
                elif START.startswith(rest) and not final:
                    return                      # may still become <think>
                elif self._starts_in_reasoning:
                    self._state, self._strip_leading = "reasoning", True
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                end = self._buf.find(END)
                if end < 0:
                    keep = 0 if final else partial_marker_len(self._buf, END)
                    self._add_reasoning(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return
                self._add_reasoning(self._buf[:end])
                self._pending_newlines = ""
                self._buf = self._buf[end + len(END):]
                self._state, self._strip_leading = "content", True
            else:
                text = self._buf.lstrip(_NEWLINES) if self._strip_leading else self._buf
                if text:
                    self._content.append(text)
                    self._strip_leading = False
                self._buf = ""

    def _add_reasoning(self, text: str) -> None:
        if self._strip_leading:
            text = text.lstrip(_NEWLINES)
            if not text:
                return
            self._strip_leading = False
        text = self._pending_newlines + text
        body = text.rstrip(_NEWLINES)
        if body:
            self._reasoning.append(body)
        self._pending_newlines = text[len(body):]

    def _drain(self) -> ReasoningDelta:
        reasoning, content = "".join(self._reasoning), "".join(self._content)
        self._reasoning, self._content = [], []
        return reasoning or None, content or None


class ThinkReasoningParser:
    """A `<think>` reasoning format; subclasses say whether the output starts inside the block."""

    name: ClassVar[str] = ""
    starts_in_reasoning: ClassVar[bool] = False

    def stream(self) -> ReasoningStream:
        """A fresh stream: one per choice of a streamed response."""
        return ReasoningStream(self.starts_in_reasoning)

    def extract(self, text: str) -> ReasoningDelta:
        """(reasoning, content) of a whole output; None for an empty part."""
        stream = self.stream()
        first, last = stream.feed(text), stream.finish()
        reasoning = (first[0] or "") + (last[0] or "")
        content = (first[1] or "") + (last[1] or "")
        return reasoning or None, content or None

    def is_reasoning_end(self, text_so_far: str) -> bool:
        """Whether the output so far has left the reasoning (what comes next is the answer): the same
        answer a stream fed `text_so_far` gives in `reasoning_ended`."""
        rest = text_so_far.lstrip()
        if rest.startswith(START):
            return END in rest
        if START.startswith(rest):              # nothing yet, or a partial <think>
            return False
        return END in text_so_far if self.starts_in_reasoning else True


class Qwen3ReasoningParser(ThinkReasoningParser):
    name = "qwen3"
    starts_in_reasoning = False


class DeepSeekR1ReasoningParser(ThinkReasoningParser):
    name = "deepseek_r1"
    starts_in_reasoning = True
