"""Reasoning parsers: split a model's raw output into `reasoning_content` and `content`, whole or
streamed. `--reasoning-parser NAME` (vLLM's names) picks one:

    qwen3        <think>...</think> only when the output starts with it     Qwen3, QwQ
    deepseek_r1  reasoning until </think> (the prompt opened <think>)        DeepSeek-R1 and its distills

    parser = get_reasoning_parser("qwen3")()
    parser.extract(text)                       # -> (reasoning, content), None for an empty part
    stream = parser.stream(); stream.feed(delta) ...; stream.finish()   # -> (reasoning_delta, content_delta)
    parser.is_reasoning_end(text_so_far)       # the answer has begun (e.g. to start structured output)
"""
from __future__ import annotations

from .think import DeepSeekR1ReasoningParser, Qwen3ReasoningParser, ReasoningStream, ThinkReasoningParser

REASONING_PARSERS: dict[str, type[ThinkReasoningParser]] = {
    parser.name: parser for parser in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)
}


def get_reasoning_parser(name: str) -> type[ThinkReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"reasoning_parser must be one of {sorted(REASONING_PARSERS)}, got {name!r}") from None


__all__ = ["REASONING_PARSERS", "DeepSeekR1ReasoningParser", "Qwen3ReasoningParser", "ReasoningStream",
           "ThinkReasoningParser", "get_reasoning_parser"]
