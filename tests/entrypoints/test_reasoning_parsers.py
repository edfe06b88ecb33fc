"""Reasoning parsers (qwen3, deepseek_r1) on recorded-style outputs: `extract` splits reasoning from
content as expected; streaming in every chunking gives the same split and never shows a partial tag
in either channel; `is_reasoning_end` agrees with the stream at every prefix; and a reasoning stream
chains into a tool-call stream the way a chat response with both uses them."""
from __future__ import annotations

import random
from typing import Optional

import pytest

from pagoda.engine.entrypoints.openai.reasoning import (REASONING_PARSERS, DeepSeekR1ReasoningParser,
                                                        Qwen3ReasoningParser, ThinkReasoningParser,
                                                        get_reasoning_parser)
from pagoda.engine.entrypoints.openai.tool_parsers import HermesToolParser
from pagoda.engine.entrypoints.openai.tool_protocol import ChatTool, DeltaToolCall

Split = tuple[Optional[str], Optional[str]]

QWEN3 = [
    ("thinking", "<think>\nThe user asks for 2 + 2. That is 4.\n</think>\n\nThe answer is 4.",
     ("The user asks for 2 + 2. That is 4.", "The answer is 4.")),
    ("paragraphs-kept-inside", "<think>\nStep 1: parse.\n\nStep 2: add.\n</think>\n\nDone.\n",
     ("Step 1: parse.\n\nStep 2: add.", "Done.\n")),
    ("thinking-disabled", "The answer is 4.", (None, "The answer is 4.")),
    ("empty-think-block", "<think>\n\n</think>\n\nHi there!", (None, "Hi there!")),
    ("truncated-reasoning", "<think>\nLet me think about the", ("Let me think about the", None)),
    ("tag-later-in-text-is-content", "Sure, <think> is an HTML-like tag.",
     (None, "Sure, <think> is an HTML-like tag.")),
    ("tag-lookalikes-inside", "<think>\nIs </thin a tag? Or <think>?\n</think>\n\nNo.",
     ("Is </thin a tag? Or <think>?", "No.")),
    ("reasoning-then-tool-call", '<think>\nNeed the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
     '"arguments": {"city": "Paris"}}\n</tool_call>',
     ("Need the weather.", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')),
    ("only-newlines-after", "<think>\nok\n</think>\n\n", ("ok", None)),
    ("empty", "", (None, None)),
]

DEEPSEEK_R1 = [
    ("opened-by-template", "Okay, so the user wants 2 + 2.\nThat is 4.\n</think>\n\nThe answer is **4**.",
     ("Okay, so the user wants 2 + 2.\nThat is 4.", "The answer is **4**.")),
    ("explicit-leading-tag", "<think>\nOkay, simple.\n</think>\n\nFour.", ("Okay, simple.", "Four.")),
    ("never-closes", "Okay, let me see. 2 + 2\n", ("Okay, let me see. 2 + 2\n", None)),
    ("closes-at-once", "</think>\n\nHello!", (None, "Hello!")),
    ("second-close-is-content", "a\n</think>\nb </think> c", ("a", "b </think> c")),
    ("partial-tag-at-end", "thinking </thi", ("thinking </thi", None)),
]

CASES = [("qwen3", *case) for case in QWEN3] + [("deepseek_r1", *case) for case in DEEPSEEK_R1]


def chunkings(text: str, seed: int) -> list[list[str]]:
    out = [[text]] + [[text[i:i + size] for i in range(0, len(text), size)] for size in (1, 3, 7)]
    rng = random.Random(seed)
    for _ in range(6):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 10)))) if len(text) > 1 else []
        bounds = [0] + cuts + [len(text)]
        out.append([text[a:b] for a, b in zip(bounds, bounds[1:])])
    return out


def run_stream(parser: ThinkReasoningParser, chunks: list[str]) -> tuple[list[str], list[str]]:
    stream = parser.stream()
    reasoning, content = [], []
    for delta in [stream.feed(chunk) for chunk in chunks] + [stream.finish()]:
        assert delta[0] != "" and delta[1] != ""       # nothing is None, not ""
        reasoning += [delta[0]] if delta[0] is not None else []
        content += [delta[1]] if delta[1] is not None else []
    return reasoning, content


@pytest.mark.parametrize("name, case_id, text, expected", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_extract_splits_reasoning_from_content(name: str, case_id: str, text: str, expected: Split) -> None:
    assert get_reasoning_parser(name)().extract(text) == expected


@pytest.mark.parametrize("name, case_id, text, expected", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_chunking_streams_the_same_split(name: str, case_id: str, text: str, expected: Split) -> None:
    parser = get_reasoning_parser(name)()
    for chunks in chunkings(text, seed=len(text)):
        reasoning, content = run_stream(parser, chunks)
        assert ("".join(reasoning) or None, "".join(content) or None) == expected, chunks


@pytest.mark.parametrize("name, case_id, text, expected", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_is_reasoning_end_agrees_with_the_stream_at_every_prefix(name, case_id, text, expected) -> None:
    parser = get_reasoning_parser(name)()
    stream = parser.stream()
    assert not stream.reasoning_ended and not parser.is_reasoning_end("")
    for pos, char in enumerate(text, start=1):
        stream.feed(char)
        assert parser.is_reasoning_end(text[:pos]) == stream.reasoning_ended, text[:pos]


@pytest.mark.parametrize("name", sorted(REASONING_PARSERS))
def test_random_outputs_stream_the_same_split(name: str) -> None:
    parser = get_reasoning_parser(name)()
    pieces = ["<think>", "</think>", "<thi", "</th", "<", "\n", "\n\n", " ", "text", "k>"]
    rng = random.Random(99)
    both = 0
    for round_ in range(300):
        opening = rng.choice(["", "<think>", "<think>\n", " <think>"])
        text = opening + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        expected = parser.extract(text)
        both += None not in expected
        for chunks in chunkings(text, seed=round_)[1:6]:
            reasoning, content = run_stream(parser, chunks)
            assert ("".join(reasoning) or None, "".join(content) or None) == expected, chunks
    assert both > 30            # the mixtures do split into both channels


def test_partial_tags_are_held_back_then_released() -> None:
    stream = Qwen3ReasoningParser().stream()
    assert stream.feed("<thi") == (None, None)                   # may be <think>
    assert stream.feed("nk>\nPlan: add. </th") == ("Plan: add. ", None)
    assert stream.feed("e end\n") == ("</the end", None)         # not </think> after all; "\n" may precede it
    assert stream.feed("</think>") == (None, None)
    assert stream.reasoning_ended
    assert stream.feed("\n\n") == (None, None)                   # newlines after the tag are dropped
    assert stream.feed("4") == (None, "4")
    assert stream.finish() == (None, None)

    plain = Qwen3ReasoningParser().stream()
    assert plain.feed("<b>") == (None, "<b>")                    # cannot become <think>: content at once
    assert plain.reasoning_ended


def test_is_reasoning_end() -> None:
    qwen3, r1 = Qwen3ReasoningParser(), DeepSeekR1ReasoningParser()
    assert not qwen3.is_reasoning_end("<think>\nhmm")
    assert qwen3.is_reasoning_end("<think>\nhmm\n</think>")
    assert qwen3.is_reasoning_end("Hello")                        # no reasoning: all of it is the answer
    assert not qwen3.is_reasoning_end("\n<thi")
    assert not r1.is_reasoning_end("Okay, 2 + 2")
    assert r1.is_reasoning_end("Okay, 4.\n</think>\n\n")


def test_reasoning_stream_feeds_a_tool_call_stream() -> None:
    """How a chat response with both parsers streams: reasoning deltas go out as reasoning_content, the
    content deltas go through the tool parser."""
    tools = [ChatTool.model_validate({"type": "function", "function": {"name": "get_weather"}})]
    text = QWEN3[7][1]
    reasoning_parser, tool_parser = Qwen3ReasoningParser(), HermesToolParser(tools)
    reasoning_stream, tool_stream = reasoning_parser.stream(), tool_parser.stream()
    reasoning, items = "", []
    for delta in [reasoning_stream.feed(text[i:i + 2]) for i in range(0, len(text), 2)] + [reasoning_stream.finish()]:
        reasoning += delta[0] or ""
        items += tool_stream.feed(delta[1] or "")
    items += tool_stream.finish()
    assert reasoning == "Need the weather."
    [call] = items
    assert isinstance(call, DeltaToolCall) and call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "Paris"}'


def test_get_reasoning_parser() -> None:
    assert get_reasoning_parser("qwen3") is Qwen3ReasoningParser
    assert get_reasoning_parser("deepseek_r1") is DeepSeekR1ReasoningParser
    assert sorted(REASONING_PARSERS) == ["deepseek_r1", "qwen3"]
    with pytest.raises(ValueError, match=r"reasoning_parser must be one of \['deepseek_r1', 'qwen3'\], got 'r1'"):
        get_reasoning_parser("r1")


def test_a_stream_refuses_use_after_finish() -> None:
    stream = DeepSeekR1ReasoningParser().stream()
    assert stream.feed("abc") == ("abc", None)
    assert stream.finish() == (None, None)
    with pytest.raises(RuntimeError):
        stream.feed("x")
