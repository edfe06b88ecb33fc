"""Tool-call parsers (hermes, llama3_json, mistral) on recorded-style outputs of each model family.

Every sample is checked three ways: `extract` gives the expected content and calls; streaming it in
every chunking (whole, 1, 3 and 7 characters, random cuts) assembles, as the openai SDK assembles
deltas, to exactly what `extract` gives; and each streamed call is one well-formed delta. Random
mixtures of markers, JSON and text check the same agreement on outputs no one wrote by hand.
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from typing import Optional

import pytest

from pagoda.engine.entrypoints.openai.tool_parsers import (TOOL_PARSERS, DeltaItem, HermesToolParser,
                                                           Llama3JsonToolParser, MistralToolParser, ToolParser,
                                                           default_tool_parser, get_tool_parser)
from pagoda.engine.entrypoints.openai.tool_parsers.base import JsonValueEnd, partial_marker_len
from pagoda.engine.entrypoints.openai.tool_protocol import ChatTool, DeltaToolCall

TOOLS = [ChatTool.model_validate({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}})
         for name in ("get_weather", "get_time", "search")]


def args(**kwargs) -> str:
    return json.dumps(kwargs)


@dataclass
class Sample:
    id: str
    parser: str
    text: str
    content: Optional[str]
    calls: list[tuple[str, str]]          # (name, arguments JSON text)


W_PARIS = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
W_TOKYO = '{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "celsius"}}'
PARIS = ("get_weather", args(city="Paris", unit="celsius"))
TOKYO = ("get_weather", args(city="Tokyo", unit="celsius"))

HERMES = [
    Sample("qwen25-two-calls-after-text", "hermes",
           "I'll look up the current weather in both cities for you.\n"
           f"<tool_call>\n{W_PARIS}\n</tool_call>\n<tool_call>\n{W_TOKYO}\n</tool_call>",
           "I'll look up the current weather in both cities for you.", [PARIS, TOKYO]),
    Sample("qwen3-single-call", "hermes",
           '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Asia/Tokyo"}}\n</tool_call>',
           None, [("get_time", args(timezone="Asia/Tokyo"))]),
    Sample("hermes2-keys-reversed-compact", "hermes",
           '<tool_call>\n{"arguments":{"query":"pagoda release notes","top_k":3},"name":"search"}\n</tool_call>',
           None, [("search", '{"query": "pagoda release notes", "top_k": 3}')]),
    Sample("text-before-and-after", "hermes",
           f"Sure.\n\n<tool_call>\n{W_PARIS}\n</tool_call>\n\nI'll report back once I have it.",
           "Sure.\n\nI'll report back once I have it.", [PARIS]),
    Sample("tricky-argument-strings", "hermes",
           '<tool_call>\n{"name": "search", "arguments": {"query": "say \\"hi\\" {not} [a] </tool>", '
           '"lang": "日本語", "nested": {"deep": [1, {"x": null}]}}}\n</tool_call>',
           None, [("search", json.dumps({"query": 'say "hi" {not} [a] </tool>', "lang": "日本語",
                                         "nested": {"deep": [1, {"x": None}]}}))]),
    Sample("arguments-as-json-string", "hermes",
           '<tool_call>\n{"name": "get_time", "arguments": "{\\"timezone\\": \\"UTC\\"}"}\n</tool_call>',
           None, [("get_time", args(timezone="UTC"))]),
    Sample("missing-arguments-is-empty-object", "hermes",
           '<tool_call>\n{"name": "get_time"}\n</tool_call>', None, [("get_time", "{}")]),
    Sample("malformed-json", "hermes",
           'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
           'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>', []),
    Sample("valid-then-malformed", "hermes",
           f"<tool_call>\n{W_PARIS}\n</tool_call>\n"
           "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {'tz': 'UTC'}}\n</tool_call>",
           "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {'tz': 'UTC'}}\n</tool_call>", [PARIS]),
    Sample("undeclared-function", "hermes",
           '<tool_call>\n{"name": "delete_files", "arguments": {"path": "/"}}\n</tool_call>',
           '<tool_call>\n{"name": "delete_files", "arguments": {"path": "/"}}\n</tool_call>', []),
    Sample("nan-is-not-json", "hermes",
           '<tool_call>\n{"name": "search", "arguments": {"top_k": NaN}}\n</tool_call>',
           '<tool_call>\n{"name": "search", "arguments": {"top_k": NaN}}\n</tool_call>', []),
    Sample("truncated-by-max-tokens", "hermes",
           'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
           'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', []),
    Sample("unclosed-but-complete", "hermes",
           '<tool_call>\n{"name": "get_time", "arguments": {}}\n', None, [("get_time", "{}")]),
    Sample("ends-on-open-tag", "hermes", "Let me see <tool_call>", "Let me see <tool_call>", []),
    Sample("plain-text-with-angle-brackets", "hermes",
           "Use x < y and <tool> tags, or <tool_call_id>; nothing here is a call.",
           "Use x < y and <tool> tags, or <tool_call_id>; nothing here is a call.", []),
    Sample("plain-text", "hermes", "The capital of France is Paris.\n\n", "The capital of France is Paris.\n\n", []),
    Sample("empty", "hermes", "", None, []),
]

L_WEATHER = '{"name": "get_weather", "parameters": {"city": "San Francisco, CA", "unit": "fahrenheit"}}'
SF = ("get_weather", args(city="San Francisco, CA", unit="fahrenheit"))
LLAMA = [
    Sample("llama31-python-tag", "llama3_json", f"<|python_tag|>{L_WEATHER}", None, [SF]),
    Sample("llama32-two-calls-semicolon", "llama3_json",
           '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
           '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}',
           None, [("get_weather", args(city="Paris")), ("get_time", args(timezone="Europe/Paris"))]),
    Sample("arguments-key-and-newline-separated", "llama3_json",
           '\n{"name": "get_time", "arguments": {}}\n{"name": "search", "parameters": {"query": "tides"}}',
           None, [("get_time", "{}"), ("search", args(query="tides"))]),
    Sample("text-then-python-tag", "llama3_json",
           f"Let me check that for you.\n\n<|python_tag|>{L_WEATHER}", "Let me check that for you.", [SF]),
    Sample("call-then-text", "llama3_json",
           '{"name": "get_time", "parameters": {}}\nI will tell you the time.',
           "I will tell you the time.", [("get_time", "{}")]),
    Sample("plain-text", "llama3_json",
           "The capital of France is Paris; its metro area is home to about 12 million people.",
           "The capital of France is Paris; its metro area is home to about 12 million people.", []),
    Sample("json-answer-not-a-call", "llama3_json", '{"answer": 42, "unit": null}',
           '{"answer": 42, "unit": null}', []),
    Sample("undeclared-function", "llama3_json", '{"name": "send_email", "parameters": {"to": "a@b.c"}}',
           '{"name": "send_email", "parameters": {"to": "a@b.c"}}', []),
    Sample("valid-then-malformed", "llama3_json",
           '{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": }}',
           '{"name": "get_weather", "parameters": {"city": }}', [("get_time", "{}")]),
    Sample("truncated", "llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Par',
           '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Par', []),
    Sample("builtin-tool-code", "llama3_json", '<|python_tag|>brave_search.call(query="weather in Paris")',
           '<|python_tag|>brave_search.call(query="weather in Paris")', []),
    Sample("lone-python-tag", "llama3_json", "<|python_tag|>", "<|python_tag|>", []),
    Sample("partial-tag-lookalike", "llama3_json", "<|python is fun|>", "<|python is fun|>", []),
]

M_V03 = ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
         '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]')
MISTRAL = [
    Sample("v03-array-two-calls", "mistral", M_V03, None, [PARIS, ("get_time", args(timezone="Europe/Paris"))]),
    Sample("v03-array-with-ids", "mistral",
           '[TOOL_CALLS][{"name": "get_time", "arguments": {}, "id": "a1B2c3D4e"}]', None, [("get_time", "{}")]),
    Sample("v11-two-calls-after-text", "mistral",
           'Checking both.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
           '[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Paris"}',
           "Checking both.", [PARIS, ("get_time", args(timezone="Europe/Paris"))]),
    Sample("v11-call-id", "mistral", '[TOOL_CALLS]get_weather[CALL_ID]Xy7kP2q9Z[ARGS]{"city": "Lyon"}',
           None, [("get_weather", args(city="Lyon"))]),
    Sample("v11-without-args-token", "mistral", '[TOOL_CALLS]get_weather{"city": "Nice"}',
           None, [("get_weather", args(city="Nice"))]),
    Sample("v11-malformed-arguments", "mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": Paris}',
           '[TOOL_CALLS]get_weather[ARGS]{"city": Paris}', []),
    Sample("v11-undeclared", "mistral", '[TOOL_CALLS]rm_rf[ARGS]{"path": "/"}',
           '[TOOL_CALLS]rm_rf[ARGS]{"path": "/"}', []),
    Sample("array-with-an-undeclared-call", "mistral",
           '[TOOL_CALLS][{"name": "get_time", "arguments": {}}, {"name": "rm_rf", "arguments": {}}]',
           '[TOOL_CALLS][{"name": "get_time", "arguments": {}}, {"name": "rm_rf", "arguments": {}}]', []),
    Sample("truncated-array", "mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Pa',
           '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Pa', []),
    Sample("marker-then-prose", "mistral", "[TOOL_CALLS] sorry, no tool fits.",
           "[TOOL_CALLS] sorry, no tool fits.", []),
    Sample("plain-text-with-brackets", "mistral", "Arrays look like [1, 2, 3]; [TOOL] and [TOOL_CALL] are not markers.",
           "Arrays look like [1, 2, 3]; [TOOL] and [TOOL_CALL] are not markers.", []),
]

SAMPLES = HERMES + LLAMA + MISTRAL


def make_parser(name: str) -> ToolParser:
    return get_tool_parser(name)(TOOLS)


def chunkings(text: str, seed: int) -> list[list[str]]:
    out = [[text]] + [[text[i:i + size] for i in range(0, len(text), size)] for size in (1, 3, 7)]
    rng = random.Random(seed)
    for _ in range(6):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        bounds = [0] + cuts + [len(text)]
        out.append([text[a:b] for a, b in zip(bounds, bounds[1:])])
    return out


def run_stream(parser: ToolParser, chunks: list[str]) -> list[DeltaItem]:
    stream = parser.stream()
    items: list[DeltaItem] = []
    for chunk in chunks:
        items += stream.feed(chunk)
    return items + stream.finish()


def sdk_assemble(items: list[DeltaItem]) -> tuple[Optional[str], list[tuple[str, str]]]:
    """What a client gets from the chunks: the deltas go over the wire as JSON and are merged by index,
    string fields by concatenation (the openai SDK's accumulation)."""
    content = ""
    calls: dict[int, dict] = {}
    for item in items:
        if isinstance(item, str):
            content += item
            continue
        wire = json.loads(item.model_dump_json(exclude_none=True))
        call = calls.setdefault(wire["index"], {"name": "", "arguments": ""})
        call["name"] += wire.get("function", {}).get("name", "")
        call["arguments"] += wire.get("function", {}).get("arguments", "")
    return content or None, [(call["name"], call["arguments"]) for _, call in sorted(calls.items())]


def extracted(parser: ToolParser, text: str) -> tuple[Optional[str], list[tuple[str, str]]]:
    result = parser.extract(text)
    return result.content, [(call.function.name, call.function.arguments) for call in result.tool_calls]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: f"{s.parser}-{s.id}")
def test_extract_gives_the_expected_content_and_calls(sample: Sample) -> None:
    assert extracted(make_parser(sample.parser), sample.text) == (sample.content, sample.calls)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: f"{s.parser}-{s.id}")
def test_every_chunking_streams_to_what_extract_gives(sample: Sample) -> None:
    parser = make_parser(sample.parser)
    expected = extracted(parser, sample.text)
    for chunks in chunkings(sample.text, seed=len(sample.text)):
        items = run_stream(parser, chunks)
        assert sdk_assemble(items) == expected, chunks
        calls = [item for item in items if isinstance(item, DeltaToolCall)]
        assert [call.index for call in calls] == list(range(len(calls)))
        for call in calls:          # one complete delta per call, as the first delta must be
            assert call.id and call.type == "function" and call.function.name and call.function.arguments


def test_calls_stream_as_soon_as_they_close_and_text_without_delay() -> None:
    sample = HERMES[0]
    stream = make_parser("hermes").stream()
    first_close = sample.text.index("</tool_call>") + len("</tool_call>")
    seen_at = {}
    content = ""
    for pos, char in enumerate(sample.text, start=1):
        for item in stream.feed(char):
            if isinstance(item, DeltaToolCall):
                seen_at[item.index] = pos
            else:
                content += item
        if pos == len("I'll look up the current"):
            assert content == "I'll look up the current"     # released char by char, never held to the end
    assert seen_at == {0: first_close, 1: len(sample.text)}


@pytest.mark.parametrize("parser_name, prefix, marker_part, rest, released", [
    ("hermes", "Hello ", "<tool", "box> is a tag", "Hello <toolbox> is a tag"),
    ("llama3_json", "Hi ", "<|python", "ic|> ok", "Hi <|pythonic|> ok"),
    ("mistral", "See ", "[TOOL_CA", "T] here", "See [TOOL_CAT] here"),
])
def test_a_possible_marker_is_held_back_until_it_cannot_be_one(parser_name, prefix, marker_part, rest, released):
    stream = make_parser(parser_name).stream()
    assert stream.feed(prefix) == [prefix.rstrip()]
    assert stream.feed(marker_part) == []
    out = stream.feed(rest) + stream.finish()
    assert prefix.rstrip() + "".join(out) == released


def test_hermes_marker_is_never_shown_before_the_call() -> None:
    stream = make_parser("hermes").stream()
    assert stream.feed("Checking <tool_") == ["Checking"]
    assert stream.feed('call>\n{"name": "get_time", ') == []
    [call] = stream.feed('"arguments": {}}\n</tool_call>')
    assert isinstance(call, DeltaToolCall) and call.function.name == "get_time"
    assert stream.finish() == []


def test_call_ids() -> None:
    hermes = make_parser("hermes").extract(HERMES[0].text).tool_calls
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id) for call in hermes)
    assert len({call.id for call in hermes}) == 2
    # Mistral's templates refuse other shapes when the calls come back in the conversation
    mistral = make_parser("mistral").extract(M_V03).tool_calls
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", call.id) for call in mistral)
    assert [c.id for c in make_parser("mistral").extract(MISTRAL[1].text).tool_calls] == ["a1B2c3D4e"]
    assert [c.id for c in make_parser("mistral").extract(MISTRAL[3].text).tool_calls] == ["Xy7kP2q9Z"]


def test_only_declared_tools_are_calls() -> None:
    text = f"<tool_call>\n{W_PARIS}\n</tool_call>"
    assert HermesToolParser([]).extract(text).tool_calls == []
    assert HermesToolParser(None).extract(text).content == text
    assert len(HermesToolParser(TOOLS[:1]).extract(text).tool_calls) == 1


def test_a_stream_refuses_use_after_finish() -> None:
    stream = make_parser("llama3_json").stream()
    stream.finish()
    with pytest.raises(RuntimeError):
        stream.feed("x")
    with pytest.raises(RuntimeError):
        stream.finish()


# -- random outputs --------------------------------------------------------------------------------
JSON_PIECES = ['{"name": "get_time", "arguments": {}}', '{"name": "search", "parameters": {"query": "a}\\"b"}}',
               '{"name": "nope", "arguments": {}}', '{"name": "get_time", "arguments": {', '{"x": [1, 2]}',
               '"', "\\", "}", "{"]
ARGUMENT_PIECES = ['{"city": "Paris"}', "{}", '{"city": ', '"\\"', "{[}"]
# well-formed calls (valid or not), fragments of markers, and text
PIECES = {
    "hermes": [f"<tool_call>\n{obj}\n</tool_call>" for obj in JSON_PIECES[:5]]
              + ["<tool_call>", "</tool_call>", "<tool_", "</tool", "\n", "  ", "text", "<", ">"],
    "llama3_json": JSON_PIECES[:5] * 2 + ["<|python_tag|>", "<|python", "; ", ";", "\n", " ", "text"],
    "mistral": [f"[TOOL_CALLS]{head}{arguments}"
                for head in ("get_time[ARGS]", "search", "get_time[CALL_ID]abc123XYZ[ARGS]")
                for arguments in ARGUMENT_PIECES[:3]]
               + ["[TOOL_CALLS]" + json.dumps([json.loads(JSON_PIECES[0])]), "[TOOL_CALLS] [", "[TOOL_CALLS]",
                  "[ARGS]", "[CALL_ID]", "[TOOL", "get_time", "[", "]", " ", "text"],
}


@pytest.mark.parametrize("parser_name", sorted(TOOL_PARSERS))
def test_random_outputs_stream_to_what_extract_gives(parser_name: str) -> None:
    rng = random.Random(1234)
    parser = make_parser(parser_name)
    pieces = PIECES[parser_name] + JSON_PIECES[5:] + ARGUMENT_PIECES[3:]
    produced_calls = 0
    for round_ in range(250):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        expected = extracted(parser, text)
        produced_calls += len(expected[1])
        for chunks in chunkings(text, seed=round_)[1:6]:
            assert sdk_assemble(run_stream(parser, chunks)) == expected, chunks
    assert produced_calls > 50      # the mixtures do contain calls, not just text


@pytest.mark.parametrize("parser_name", sorted(TOOL_PARSERS))
def test_long_outputs_stream_in_linear_time(parser_name: str) -> None:
    parser = make_parser(parser_name)
    text = "The quick brown fox jumps over the lazy dog; [1] <b> {x}. " * 3000          # ~180 kB of prose
    huge = {"query": "x" * 100_000}
    call = {"hermes": f'<tool_call>{{"name": "search", "arguments": {json.dumps(huge)}}}</tool_call>',
            "llama3_json": f'{{"name": "search", "parameters": {json.dumps(huge)}}}',
            "mistral": f"[TOOL_CALLS]search[ARGS]{json.dumps(huge)}"}[parser_name]
    for output, expected_calls in ((text, 0), (call, 1)):
        started = time.perf_counter()
        items = run_stream(parser, [output[i:i + 4] for i in range(0, len(output), 4)])
        assert time.perf_counter() - started < 3.0
        assert sum(isinstance(item, DeltaToolCall) for item in items) == expected_calls


# -- helpers and registry ----------------------------------------------------------------------------
def test_partial_marker_len() -> None:
    assert partial_marker_len("abc <tool", "<tool_call>") == 5
    assert partial_marker_len("abc <tool_call>", "<tool_call>") == 0       # a whole marker is found, not held
    assert partial_marker_len("abc", "<tool_call>") == 0
    assert partial_marker_len("<<", "<tool_call>") == 1


def test_json_value_end_is_resumable_and_respects_strings() -> None:
    text = '  {"a": "}]\\"{", "b": [1, {"c": 2}]} tail'
    whole = JsonValueEnd(2).find(text)
    assert text[2:whole] == '{"a": "}]\\"{", "b": [1, {"c": 2}]}'
    finder = JsonValueEnd(2)
    ends = [finder.find(text[:size]) for size in range(3, len(text) + 1)]
    assert all(end is None for end in ends[:whole - 3]) and ends[whole - 3] == whole


def test_get_tool_parser() -> None:
    assert get_tool_parser("hermes") is HermesToolParser
    assert get_tool_parser("llama3_json") is Llama3JsonToolParser
    assert get_tool_parser("mistral") is MistralToolParser
    valid = r"\['hermes', 'llama3_json', 'mistral'\]"
    with pytest.raises(ValueError, match=rf"tool_call_parser must be one of {valid}, got 'qwen'"):
        get_tool_parser("qwen")


QWEN25_TEMPLATE = ('{%- if tools %}{{- "# Tools\\n\\nYou may call one or more functions" }}...'
                   '{{- "<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}'
                   '\\n</tool_call>" }}')
MISTRAL_TEMPLATE = '{%- if message.tool_calls %}{{- "[TOOL_CALLS][" }}{%- for tool_call in message.tool_calls %}'
LLAMA31_TEMPLATE = ('{%- if builtin_tools is defined or tools is not none %}'
                    '{{- "Environment: ipython\\n" }}{%- endif %}'
                    '{{- "Given the following functions, please respond with a JSON for a function call " }}'
                    '{{- "<|python_tag|>" + tool_call.name }}')
LLAMA32_JSON_ONLY = '{{- "Given the following functions, please respond with a JSON for a function call " }}'
CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']}}{% endfor %}"


@pytest.mark.parametrize("template, expected", [
    (QWEN25_TEMPLATE, "hermes"), (MISTRAL_TEMPLATE, "mistral"), (LLAMA31_TEMPLATE, "llama3_json"),
    (LLAMA32_JSON_ONLY, "llama3_json"), (CHATML, None), (None, None), ("", None),
    (QWEN25_TEMPLATE + MISTRAL_TEMPLATE, None),          # two families: ambiguous
])
def test_default_tool_parser_reads_the_chat_template(template, expected) -> None:
    assert default_tool_parser(template) == expected
