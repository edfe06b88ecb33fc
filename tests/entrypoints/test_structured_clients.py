"""Structured output and tool calling as real clients use them, on the default model (SmolLM2-135M).

One `pagoda serve default` for the module, with auto tool choice and the hermes tool-call parser.
Every constrained output that ends on its own ("stop" / "tool_calls") must parse and validate
against what constrained it: JSON schemas (nested objects, bounded arrays, enums, ranged numbers),
regexes, choices and grammars, through the openai SDK (chat, completions, `parse`, stream helpers),
langchain-openai (`with_structured_output`, `bind_tools`) and litellm. Invalid constraints are a 400
naming the field the request used. A tiny model follows no instruction reliably: the grammar is what
makes these outputs valid, so most tests sample (temperature 1, n > 1, a fixed seed) and every schema
is bounded; only unbounded outputs (any JSON object) and answers a client parses into its own model
(langchain's json_mode) go greedy on a prompt that shows the shape.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Iterator, Literal

import pytest
from pydantic import BaseModel, Field

from .server_helpers import API_KEY, MODEL_NAME, ServerProcess, start_server
from .structured_clients import (CALL_ID, SCHEMA_PROMPTS, SCHEMAS, TOOL_PARAMETERS, TOOLS, assemble_chat_stream,
                                 check_tool_call, response_format, validated_json)

pytestmark = pytest.mark.slow

TOOL_FLAGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
TOOL_NAMES = list(TOOL_PARAMETERS)
SAMPLED = dict(temperature=1.0, seed=7)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    # NOTE: 256 MiB of KV cache holds ~5,800 tokens of the default model: every test's batch fits.
    process = start_server(Path("default"), tmp_path_factory.mktemp("structured-logs"), "--kv-cache-memory-bytes",
                           "256MiB", "--max-model-len", "2048", *TOOL_FLAGS)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(client, content: str, **kwargs):
    return client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": content}],
                                          **kwargs)


def both(non_streamed, streamed):
    """Runs a request and its streamed twin at once (the engine batches them) -> their results."""
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(non_streamed), pool.submit(streamed)
        return first.result(), second.result()


# -- openai SDK, chat: response_format ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_chat_json_schema_outputs_validate_streamed_and_not(client, name):
    schema, n = SCHEMAS[name], 3
    kwargs = dict(response_format=response_format(name, schema), max_completion_tokens=200, n=n, **SAMPLED)
    full, chunks = both(lambda: chat(client, SCHEMA_PROMPTS[name], **kwargs),
                        lambda: list(chat(client, SCHEMA_PROMPTS[name], stream=True, **kwargs)))
    assert len(full.choices) == n
    for choice in full.choices:
        assert choice.finish_reason == "stop", choice
        validated_json(choice.message.content, schema)
    streamed = assemble_chat_stream(chunks)
    assert sorted(streamed) == list(range(n))
    for choice in streamed.values():
        assert choice.role == "assistant" and choice.finish_reasons_sent == 1
        assert choice.finish_reason == "stop", choice
        validated_json(choice.content, schema)


def test_chat_json_schema_keeps_the_property_order(client):
    # OpenAI writes the properties in the schema's order; a schema that puts "reasoning" before
    # "answer" relies on it.
    schema = {"type": "object", "properties": {"zeta": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "alpha": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    response = chat(client, "Two digits as JSON.", response_format=response_format("order", schema),
                    max_completion_tokens=40, n=2, **SAMPLED)
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        assert list(validated_json(choice.message.content, schema)) == ["zeta", "alpha"], choice.message.content


def test_chat_json_object(client):
    # NOTE: any JSON object is unbounded (its strings are): greedy, on a prompt that shows one, ends it
    messages = [{"role": "system", "content": 'Reply with one JSON object with the keys "name" and "country", '
                                              'for example {"name": "Paris", "country": "France"}.'},
                {"role": "user", "content": "Give me a city in Japan."}]
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=120,
                                              response_format={"type": "json_object"}, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(json.loads(choice.message.content), dict), choice.message.content


class Address(BaseModel):
    city: str = Field(max_length=16)
    country: Literal["France", "Japan", "Peru"]


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    nicknames: list[Annotated[str, Field(max_length=12)]] = Field(max_length=2)
    address: Address


PERSON_PROMPT = "Invent a person (name, age, nicknames, address) and answer in JSON."


def test_chat_parse_returns_the_pydantic_model(client):
    completion = client.chat.completions.parse(model=MODEL_NAME, messages=[{"role": "user", "content": PERSON_PROMPT}],
                                               response_format=Person, max_completion_tokens=200, n=2, **SAMPLED)
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, Person), choice.message.content
        assert len(choice.message.parsed.nicknames) <= 2


def test_chat_stream_helper_parses_the_pydantic_model(client):
    with client.chat.completions.stream(model=MODEL_NAME, messages=[{"role": "user", "content": PERSON_PROMPT}],
                                        response_format=Person, max_completion_tokens=200, **SAMPLED) as stream:
        events = [event.type for event in stream]
        completion = stream.get_final_completion()
    assert "content.done" in events
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(completion.choices[0].message.parsed, Person)


# -- openai SDK, completions: structured_outputs and guided_* ---------------------------------------
GREETING_GRAMMAR = '''root ::= greeting " " name
greeting ::= "hello" | "hi"
name ::= "world" | "there" | [a-z] [a-z] [a-z]
'''
SMALL_ARRAY = {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3}
POINT = SCHEMAS["bounded_numbers"]


def fullmatch(pattern: str):
    return lambda text: re.fullmatch(pattern, text) is not None


def one_of(choices: list[str]):
    return lambda text: text in choices


def valid_against(schema: dict):
    def check(text: str) -> bool:
        validated_json(text, schema)           # raises, naming the text, when it is not valid
        return True

    return check


ANSWER = "Here is the answer:"
COMPLETION_CONSTRAINTS = {
    "structured_outputs.regex": ({"structured_outputs": {"regex": r"[A-Z][a-z]{2,8} [0-9]{1,3}"}},
                                 fullmatch(r"[A-Z][a-z]{2,8} [0-9]{1,3}")),
    "structured_outputs.choice": ({"structured_outputs": {"choice": ["red", "green", "blue"]}},
                                  one_of(["red", "green", "blue"])),
    "structured_outputs.json": ({"structured_outputs": {"json": POINT}}, valid_against(POINT)),
    "structured_outputs.grammar": ({"structured_outputs": {"grammar": GREETING_GRAMMAR}},
                                   fullmatch(r"(hello|hi) (world|there|[a-z]{3})")),
    "guided_regex": ({"guided_regex": r"\d{3}-\d{4}"}, fullmatch(r"\d{3}-\d{4}")),
    "guided_choice": ({"guided_choice": ["yes", "no", "maybe"]}, one_of(["yes", "no", "maybe"])),
    "guided_json": ({"guided_json": SMALL_ARRAY}, valid_against(SMALL_ARRAY)),
    "guided_grammar": ({"guided_grammar": GREETING_GRAMMAR}, fullmatch(r"(hello|hi) (world|there|[a-z]{3})")),
}


@pytest.mark.parametrize("field", list(COMPLETION_CONSTRAINTS))
def test_completion_constraints(client, field):
    body, check = COMPLETION_CONSTRAINTS[field]
    response = client.completions.create(model=MODEL_NAME, prompt=ANSWER, max_tokens=120, n=3, extra_body=body,
                                         **SAMPLED)
    assert len(response.choices) == 3
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice
        assert check(choice.text), f"{field}: {choice.text!r}"


def test_completion_json_object(client):
    # NOTE: any JSON object is unbounded (its strings are), and a sampled continuation of plain text
    # wanders inside one until max_tokens; greedy on a prompt that leads into an object ends it.
    response = client.completions.create(model=MODEL_NAME, prompt="A JSON object describing a cat:", max_tokens=120,
                                         temperature=0, extra_body={"structured_outputs": {"json_object": True}})
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(json.loads(choice.text), dict), choice.text


# -- errors -------------------------------------------------------------------------------------------
BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "minLength": 5, "maxLength": 2}}}
# (endpoint, body, the request's top-level field, what the message must name)
INVALID_CONSTRAINTS = {
    "structured_outputs-regex": ("completions", {"structured_outputs": {"regex": "(unclosed"}},
                                 "structured_outputs", "structured_outputs.regex"),
    "structured_outputs-grammar": ("completions", {"structured_outputs": {"grammar": "root ::= ("}},
                                   "structured_outputs", "structured_outputs.grammar"),
    "structured_outputs-json": ("completions", {"structured_outputs": {"json": {"type": "nonsense"}}},
                                "structured_outputs", "structured_outputs.json"),
    "guided_regex": ("completions", {"guided_regex": "[a-"}, "guided_regex", "guided_regex"),
    "guided_grammar": ("completions", {"guided_grammar": "root ::= ("}, "guided_grammar", "guided_grammar"),
    "guided_json": ("completions", {"guided_json": BAD_SCHEMA}, "guided_json", "guided_json"),
    "chat-guided_regex": ("chat", {"guided_regex": "(unclosed"}, "guided_regex", "guided_regex"),
    "response_format": ("chat", {"response_format": response_format("bad", BAD_SCHEMA)},
                        "response_format", "response_format"),
    "tools-parameters": ("chat", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "nonsense"}}}], "tool_choice": "required"}, "tools", "tools"),
}


def send_invalid(client, endpoint: str, body: dict):
    import openai

    with pytest.raises(openai.BadRequestError) as raised:
        if endpoint == "completions":
            client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=4, extra_body=body)
        else:
            chat(client, "x", max_completion_tokens=4, extra_body=body)
    assert raised.value.status_code == 400
    return raised.value


@pytest.mark.parametrize("case", list(INVALID_CONSTRAINTS))
def test_invalid_constraint_is_a_400_naming_the_field(client, case):
    endpoint, body, _, named = INVALID_CONSTRAINTS[case]
    error = send_invalid(client, endpoint, body)
    assert named in error.body["message"], error.body


@pytest.mark.parametrize("case", list(INVALID_CONSTRAINTS))
def test_invalid_constraint_error_sets_param(client, case):
    # as OpenAI does for an invalid schema (`"param": "response_format"`): clients show it
    endpoint, body, param, _ = INVALID_CONSTRAINTS[case]
    error = send_invalid(client, endpoint, body)
    assert error.body["param"] == param, error.body


# -- openai SDK, tools ----------------------------------------------------------------------------------
TOOL_PROMPT = "What is the weather in Paris, and what time is it in Tokyo?"


def tool_chat(client, **kwargs):
    return chat(client, TOOL_PROMPT, tools=TOOLS, max_completion_tokens=256, **kwargs)


def check_streamed_calls(choice) -> list:
    calls = choice.ordered_calls()
    for call in calls:
        # the first delta of a call carries its id, type and name; later ones only arguments
        assert call.ids_sent == 1 and CALL_ID.fullmatch(call.id or ""), call
        assert call.type == "function", call
    return calls


def test_required_tool_choice_calls_declared_functions(client):
    full, chunks = both(lambda: tool_chat(client, tool_choice="required", n=2, **SAMPLED),
                        lambda: list(tool_chat(client, tool_choice="required", n=2, stream=True, **SAMPLED)))
    for choice in full.choices:
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls
        assert calls, choice
        assert len({call.id for call in calls}) == len(calls)
        for call in calls:
            assert call.type == "function" and CALL_ID.fullmatch(call.id), call
            check_tool_call(call.function.name, call.function.arguments, TOOL_NAMES)
    streamed = assemble_chat_stream(chunks)
    assert sorted(streamed) == [0, 1]
    for choice in streamed.values():
        assert choice.finish_reason == "tool_calls" and choice.finish_reasons_sent == 1, choice
        calls = check_streamed_calls(choice)
        assert calls, choice
        for call in calls:
            check_tool_call(call.name, call.arguments, TOOL_NAMES)


class GetWeather(BaseModel):
    """The current weather of a city."""

    city: str = Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]


class GetTime(BaseModel):
    """The current time in a time zone."""

    timezone: Literal["UTC", "Europe/Paris", "Asia/Tokyo"]


def test_required_tool_choice_with_the_sdk_stream_helper(client):
    import openai

    tools = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(GetTime)]
    with client.chat.completions.stream(model=MODEL_NAME, messages=[{"role": "user", "content": TOOL_PROMPT}],
                                        tools=tools, tool_choice="required", max_completion_tokens=256,
                                        **SAMPLED) as stream:
        done = [event for event in stream if event.type == "tool_calls.function.arguments.done"]
        completion = stream.get_final_completion()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    # NOTE: the SDK fires a call's `arguments.done` event when a later chunk starts another call or
    # carries the finish reason; a finish reason in the chunk of the last call's delta loses it.
    assert len(done) == len(choice.message.tool_calls), "no tool_calls.function.arguments.done event per call"
    models = {"GetWeather": GetWeather, "GetTime": GetTime}
    for call in choice.message.tool_calls:
        assert isinstance(call.function.parsed_arguments, models[call.function.name]), call


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_named_tool_choice_makes_exactly_one_call(client, stream):
    named = {"type": "function", "function": {"name": "search"}}
    response = tool_chat(client, tool_choice=named, n=2, stream=stream, **SAMPLED)
    if stream:
        choices = assemble_chat_stream(response)
        calls_by_choice = [(c.finish_reason, [(call.name, call.arguments) for call in check_streamed_calls(c)])
                           for c in choices.values()]
    else:
        calls_by_choice = [(c.finish_reason, [(call.function.name, call.function.arguments)
                                              for call in c.message.tool_calls or []]) for c in response.choices]
    assert len(calls_by_choice) == 2
    for finish_reason, calls in calls_by_choice:
        # NOTE: OpenAI ends a forced named call with "stop" (vLLM too); what matters is the one call.
        assert finish_reason in ("stop", "tool_calls"), finish_reason
        assert len(calls) == 1, calls
        check_tool_call(*calls[0], ["search"])


def test_tool_choice_none_answers_in_plain_content(client):
    response = tool_chat(client, tool_choice="none", **SAMPLED)
    choice = response.choices[0]
    assert not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str) and choice.message.content


@pytest.mark.parametrize("tool_choice", ["none", "auto"])
def test_a_conversation_with_tool_calls_and_results_is_accepted(client, tool_choice):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_weather1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_weather1", "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS,
                                              tool_choice=tool_choice, max_completion_tokens=24, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.finish_reason == "tool_calls":
        for call in choice.message.tool_calls:
            check_tool_call(call.function.name, call.function.arguments, TOOL_NAMES)
    else:
        assert not choice.message.tool_calls and choice.message.content


# -- langchain-openai -----------------------------------------------------------------------------------
class Capital(BaseModel):
    """A capital city."""

    name: str = Field(max_length=24)
    country: str = Field(max_length=24)


# json_mode only guarantees a JSON object: the prompt must describe the fields
CAPITAL_PROMPT = 'What is the capital of Japan? Answer as JSON with keys "name" and "country".'


@pytest.fixture(scope="module")
def langchain_llm(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, model=MODEL_NAME, temperature=0,
                      max_tokens=120, max_retries=0, timeout=120, use_responses_api=False)


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(langchain_llm, method):
    result = langchain_llm.with_structured_output(Capital, method=method, include_raw=True).invoke(CAPITAL_PROMPT)
    assert result["parsing_error"] is None, result
    assert isinstance(result["parsed"], Capital), result


def test_langchain_bind_tools_required(langchain_llm):
    message = langchain_llm.bind_tools([GetWeather, GetTime], tool_choice="required").invoke(TOOL_PROMPT)
    assert message.tool_calls and not message.invalid_tool_calls, message
    models = {"GetWeather": GetWeather, "GetTime": GetTime}
    for call in message.tool_calls:
        assert call["name"] in models, call
        models[call["name"]].model_validate(call["args"])


# -- litellm ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["dict", "pydantic"])
def test_litellm_completion_json_schema(server, monkeypatch, form):
    # NOTE: litellm fetches a model price list at import unless told to use the copy it ships
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    schema = SCHEMAS["nested_object"]
    fmt = response_format("person", schema) if form == "dict" else Person
    response = litellm.completion(model=f"openai/{MODEL_NAME}", api_base=f"{server.url}/v1", api_key=API_KEY,
                                  messages=[{"role": "user", "content": PERSON_PROMPT}], response_format=fmt,
                                  max_tokens=200, temperature=1.0, seed=7, num_retries=0, timeout=120)
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice
    if form == "dict":
        validated_json(choice.message.content, schema)
    else:
        Person.model_validate_json(choice.message.content)
