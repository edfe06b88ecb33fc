"""No silent ignores: every field of OpenAI's chat-completions and completions request bodies is
honoured, refused with a 400 naming it, or accepted as advisory, each one sent to the app
(`build_app` around an in-process engine on the tiny model); the structured-output fields reach
`SamplingParams.structured_outputs`; tools, tool_choice and the chat-template fields are validated.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable, Optional

import httpx
import pytest

from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.entrypoints.openai.api_server import build_app
from pagoda.engine.entrypoints.openai.chat_messages import ChatCompletionRequest
from pagoda.engine.entrypoints.openai.protocol import CompletionRequest
from pagoda.engine.entrypoints.openai.request_to_params import structured_outputs_from, to_sampling_params
from pagoda.engine.entrypoints.settings import ServerSettings
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.structured_output.params import StructuredOutputsParams

from .server_helpers import MODEL_NAME

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hello there"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

# OpenAI's API reference: every field of the two request bodies.
OPENAI_CHAT_FIELDS = {
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "response_format",
    "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options", "temperature",
    "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity", "web_search_options"}
OPENAI_COMPLETION_FIELDS = {
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user"}


@dataclass
class Row:
    path: str
    field: str
    body: dict[str, Any]                        # what the row adds to a minimal request
    expect: str                                 # "honoured" | "refused" | "advisory" | "constraint"
    check: Optional[Callable[[Any], bool]] = None               # on the 200 response (JSON or SSE events)
    params: Optional[Callable[[SamplingParams], bool]] = None   # on the request's SamplingParams


def _events(response: httpx.Response) -> list[Any]:
    import json

    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


ROWS = [
    # -- chat completions ----------------------------------------------------------------------------
    Row(CHAT, "messages", {"messages": [{"role": "developer", "content": "Be brief"}, *MESSAGES]}, "honoured"),
    Row(CHAT, "model", {"model": MODEL_NAME}, "honoured", check=lambda r: r["model"] == MODEL_NAME),
    Row(CHAT, "audio", {"audio": {"voice": "alloy", "format": "wav"}}, "refused"),
    Row(CHAT, "frequency_penalty", {"frequency_penalty": 0.5}, "honoured", params=lambda p: p.frequency_penalty == 0.5),
    Row(CHAT, "function_call", {"function_call": "auto"}, "refused"),
    Row(CHAT, "functions", {"functions": [TOOLS[0]["function"]]}, "refused"),
    Row(CHAT, "logit_bias", {"logit_bias": {"5": 2.0}}, "honoured", params=lambda p: p.logit_bias == {5: 2.0}),
    Row(CHAT, "logprobs", {"logprobs": True}, "honoured",
        check=lambda r: len(r["choices"][0]["logprobs"]["content"]) == r["usage"]["completion_tokens"]),
    Row(CHAT, "max_completion_tokens", {"max_completion_tokens": 1, "max_tokens": None}, "honoured",
        check=lambda r: r["usage"]["completion_tokens"] <= 1),
    Row(CHAT, "max_tokens", {"max_tokens": 1}, "honoured", check=lambda r: r["usage"]["completion_tokens"] <= 1),
    Row(CHAT, "metadata", {"metadata": {"team": "search"}}, "advisory"),
    Row(CHAT, "modalities", {"modalities": ["text"]}, "honoured"),
    Row(CHAT, "modalities", {"modalities": ["text", "audio"]}, "refused"),
    Row(CHAT, "n", {"n": 2}, "honoured", check=lambda r: len(r["choices"]) == 2),
    Row(CHAT, "parallel_tool_calls", {"parallel_tool_calls": False, "tools": TOOLS}, "honoured"),
    Row(CHAT, "prediction", {"prediction": {"type": "content", "content": "Hello"}}, "refused"),
    Row(CHAT, "presence_penalty", {"presence_penalty": -0.5}, "honoured", params=lambda p: p.presence_penalty == -0.5),
    Row(CHAT, "prompt_cache_key", {"prompt_cache_key": "user-42"}, "advisory"),
    Row(CHAT, "prompt_cache_retention", {"prompt_cache_retention": "24h"}, "advisory"),
    Row(CHAT, "reasoning_effort", {"reasoning_effort": "low"}, "honoured"),
    Row(CHAT, "response_format", {"response_format": {"type": "text"}}, "honoured",
        params=lambda p: p.structured_outputs is None),
    Row(CHAT, "response_format", {"response_format": {"type": "json_object"}}, "constraint",
        params=lambda p: p.structured_outputs == StructuredOutputsParams(json_object=True)),
    Row(CHAT, "response_format", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "thing", "schema": SCHEMA, "strict": True, "description": "a thing"}}}, "constraint",
        params=lambda p: p.structured_outputs == StructuredOutputsParams(json=SCHEMA)),
    Row(CHAT, "response_format", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "refused"),
    Row(CHAT, "safety_identifier", {"safety_identifier": "hashed-user"}, "advisory"),
    Row(CHAT, "seed", {"seed": 11}, "honoured", params=lambda p: p.seed == 11),
    Row(CHAT, "service_tier", {"service_tier": "flex"}, "advisory"),
    Row(CHAT, "stop", {"stop": ["\n\n"]}, "honoured", params=lambda p: p.stop == ["\n\n"]),
    Row(CHAT, "store", {"store": True}, "advisory"),
    Row(CHAT, "stream", {"stream": True}, "honoured", check=lambda events: events[-1] == "[DONE]"),
    Row(CHAT, "stream_options", {"stream": True, "stream_options": {"include_usage": True}}, "honoured",
        check=lambda events: events[-2]["usage"]["completion_tokens"] >= 1),
    Row(CHAT, "stream_options", {"stream_options": {"include_usage": True}}, "refused"),
    Row(CHAT, "temperature", {"temperature": 0.25}, "honoured", params=lambda p: p.temperature == 0.25),
    Row(CHAT, "tool_choice", {"tool_choice": "auto", "tools": TOOLS}, "honoured"),
    Row(CHAT, "tool_choice", {"tool_choice": "required"}, "refused"),
    Row(CHAT, "tools", {"tools": TOOLS}, "honoured"),
    Row(CHAT, "top_logprobs", {"logprobs": True, "top_logprobs": 2}, "honoured",
        check=lambda r: all(len(e["top_logprobs"]) == 2 for e in r["choices"][0]["logprobs"]["content"])),
    Row(CHAT, "top_p", {"top_p": 0.5}, "honoured", params=lambda p: p.top_p == 0.5),
    Row(CHAT, "user", {"user": "user-42"}, "advisory"),
    Row(CHAT, "verbosity", {"verbosity": "low"}, "refused"),
    Row(CHAT, "web_search_options", {"web_search_options": {}}, "refused"),
    # -- completions ----------------------------------------------------------------------------------
    Row(COMPLETIONS, "model", {"model": MODEL_NAME}, "honoured", check=lambda r: r["model"] == MODEL_NAME),
    Row(COMPLETIONS, "prompt", {"prompt": ["Once", "Twice"]}, "honoured", check=lambda r: len(r["choices"]) == 2),
    Row(COMPLETIONS, "best_of", {"best_of": 2, "n": 2}, "honoured", check=lambda r: len(r["choices"]) == 2),
    Row(COMPLETIONS, "best_of", {"best_of": 3, "n": 1}, "refused"),
    Row(COMPLETIONS, "echo", {"echo": True}, "honoured", check=lambda r: r["choices"][0]["text"].startswith("Once")),
    Row(COMPLETIONS, "frequency_penalty", {"frequency_penalty": 1.5}, "honoured",
        params=lambda p: p.frequency_penalty == 1.5),
    Row(COMPLETIONS, "logit_bias", {"logit_bias": {"7": -100}}, "honoured", params=lambda p: p.logit_bias == {7: -100}),
    Row(COMPLETIONS, "logprobs", {"logprobs": 1}, "honoured",
        check=lambda r: len(r["choices"][0]["logprobs"]["tokens"]) == r["usage"]["completion_tokens"]),
    Row(COMPLETIONS, "max_tokens", {"max_tokens": 1}, "honoured", check=lambda r: r["usage"]["completion_tokens"] == 1),
    Row(COMPLETIONS, "max_tokens", {"max_tokens": 0}, "refused"),
    Row(COMPLETIONS, "n", {"n": 3}, "honoured", check=lambda r: len(r["choices"]) == 3),
    Row(COMPLETIONS, "presence_penalty", {"presence_penalty": 2.0}, "honoured",
        params=lambda p: p.presence_penalty == 2.0),
    Row(COMPLETIONS, "seed", {"seed": -5}, "honoured", params=lambda p: p.seed == -5),
    Row(COMPLETIONS, "stop", {"stop": "."}, "honoured", params=lambda p: p.stop == ["."]),
    Row(COMPLETIONS, "stream", {"stream": True}, "honoured", check=lambda events: events[-1] == "[DONE]"),
    Row(COMPLETIONS, "stream_options", {"stream": True, "stream_options": {"include_usage": True}}, "honoured",
        check=lambda events: events[-2]["usage"]["prompt_tokens"] >= 1),
    Row(COMPLETIONS, "suffix", {"suffix": " The end."}, "refused"),
    Row(COMPLETIONS, "temperature", {"temperature": 2.0}, "honoured", params=lambda p: p.temperature == 2.0),
    Row(COMPLETIONS, "top_p", {"top_p": 0.1}, "honoured", params=lambda p: p.top_p == 0.1),
    Row(COMPLETIONS, "user", {"user": "user-42"}, "advisory"),
    # vLLM's structured-output fields, on both endpoints
    Row(COMPLETIONS, "response_format", {"response_format": {"type": "json_object"}}, "constraint",
        params=lambda p: p.structured_outputs == StructuredOutputsParams(json_object=True)),
    Row(COMPLETIONS, "structured_outputs", {"structured_outputs": {"regex": "[0-9]+"}}, "constraint",
        params=lambda p: p.structured_outputs == StructuredOutputsParams(regex="[0-9]+")),
    Row(CHAT, "structured_outputs", {"structured_outputs": {"choice": ["yes", "no"]}}, "constraint",
        params=lambda p: p.structured_outputs == StructuredOutputsParams(choice=["yes", "no"])),
    Row(CHAT, "guided_json", {"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar"}, "constraint",
        params=lambda p: p.structured_outputs == StructuredOutputsParams(json=SCHEMA)),
    Row(COMPLETIONS, "guided_json", {"guided_json": '{"type": "string"}'}, "constraint",
        params=lambda p: p.structured_outputs == StructuredOutputsParams(json={"type": "string"})),
    Row(COMPLETIONS, "guided_regex", {"guided_regex": "a|b"}, "constraint",
        params=lambda p: p.structured_outputs == StructuredOutputsParams(regex="a|b")),
    Row(CHAT, "guided_choice", {"guided_choice": ["red", "blue"]}, "constraint",
        params=lambda p: p.structured_outputs == StructuredOutputsParams(choice=["red", "blue"])),
    Row(COMPLETIONS, "guided_grammar", {"guided_grammar": 'root ::= "x"'}, "constraint",
        params=lambda p: p.structured_outputs == StructuredOutputsParams(grammar='root ::= "x"')),
]


def _body(row: Row) -> dict[str, Any]:
    base = {"messages": MESSAGES} if row.path == CHAT else {"prompt": "Once upon a time"}
    body = {**base, "max_tokens": 2, "temperature": 0, **row.body}
    return {key: value for key, value in body.items() if value is not None}


def _id(row: Row) -> str:
    return f"{'chat' if row.path == CHAT else 'completions'}-{row.field}-{row.expect}-{ROWS.index(row)}"


def test_the_table_covers_every_openai_field_and_each_is_declared():
    """Every OpenAI field has a row, and every one is a declared field: none is dropped as unknown."""
    chat_rows = {row.field for row in ROWS if row.path == CHAT}
    completion_rows = {row.field for row in ROWS if row.path == COMPLETIONS}
    assert OPENAI_CHAT_FIELDS <= chat_rows, OPENAI_CHAT_FIELDS - chat_rows
    assert OPENAI_COMPLETION_FIELDS <= completion_rows, OPENAI_COMPLETION_FIELDS - completion_rows
    assert not OPENAI_COMPLETION_FIELDS - set(CompletionRequest.model_fields)
    assert not OPENAI_CHAT_FIELDS - set(ChatCompletionRequest.model_fields)
    # every row's field is an OpenAI field or one of vLLM's structured-output fields
    vllm = {"structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"}
    assert chat_rows | completion_rows <= OPENAI_CHAT_FIELDS | OPENAI_COMPLETION_FIELDS | vllm


@pytest.fixture
def engine(inprocess_engine):
    return inprocess_engine


# NOTE: tool calling switched on (as vLLM, tool_choice "auto" may need it), so that every valid tools
# request is servable whatever the chat template.
TOOL_SETTINGS = ServerSettings(enable_auto_tool_choice=True, tool_call_parser="hermes")


def post(engine: AsyncEngine, path: str, body: dict[str, Any], settings: ServerSettings = TOOL_SETTINGS
         ) -> httpx.Response:
    async def main() -> httpx.Response:
        app = build_app(engine, settings)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            return await http.post(path, json=body, timeout=60)

    return asyncio.run(main())


@pytest.mark.parametrize("row", [row for row in ROWS if row.expect != "constraint"], ids=_id)
def test_each_field_is_honoured_refused_or_advisory(engine, row):
    response = post(engine, row.path, _body(row))
    if row.expect == "refused":
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == row.field or error["param"].startswith(row.field + "."), error
        assert row.field in error["message"], error
        return
    assert response.status_code == 200, response.text
    if row.check is not None:
        assert row.check(_events(response) if row.body.get("stream") else response.json()), response.text
    if row.params is not None:
        request_type = ChatCompletionRequest if row.path == CHAT else CompletionRequest
        assert row.params(to_sampling_params(request_type.model_validate(_body(row)), 2, None))


@pytest.mark.parametrize("row", [row for row in ROWS if row.expect == "constraint"], ids=_id)
def test_structured_output_fields_reach_sampling_params(row):
    request_type = ChatCompletionRequest if row.path == CHAT else CompletionRequest
    params = to_sampling_params(request_type.model_validate(_body(row)), 4, None)
    assert params.structured_outputs is not None and row.params(params), params.structured_outputs


def test_no_constraint_and_text_format_give_none():
    assert structured_outputs_from(CompletionRequest.model_validate({"prompt": "x"})) is None
    text = CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "text"}, "guided_regex": "a"})
    assert structured_outputs_from(text) == StructuredOutputsParams(regex="a")


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex",
     ["response_format", "guided_regex"]),
    ({"guided_json": SCHEMA, "guided_choice": ["a"]}, "guided_choice", ["guided_json", "guided_choice"]),
    ({"structured_outputs": {"regex": "a"}, "guided_grammar": "root ::= \"a\""}, "guided_grammar",
     ["structured_outputs", "guided_grammar"]),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", ["regex", "choice"]),
    ({"structured_outputs": {}}, "structured_outputs", ["exactly one"]),
    ({"structured_outputs": {"structural_tag": {"x": 1}}}, "structured_outputs", ["structural_tag"]),
    ({"guided_json": "{not json"}, "guided_json", ["guided_json", "JSON"]),
    ({"guided_choice": []}, "guided_choice", ["guided_choice"]),
    ({"response_format": {"type": "xml"}}, "response_format.type", ["response_format"]),
    ({"response_format": {"type": "json_schema"}}, "response_format", ["json_schema"]),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "a", "schema": {}}}}, "response_format",
     ["json_schema"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": "{}"}}},
     "response_format.json_schema.schema", ["schema"]),
])
def test_bad_or_conflicting_constraints_are_400_naming_them(engine, extra, param, words):
    for path in (CHAT, COMPLETIONS):
        response = post(engine, path, _body(Row(path, "", extra, "refused")))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param, error
        for word in words:
            assert word in error["message"], error


# -- tools and the chat template's fields ---------------------------------------------------------------
@pytest.mark.parametrize("extra, param, words", [
    ({"tool_choice": "auto"}, "tool_choice", ["tool_choice", "needs tools"]),
    ({"tool_choice": "required", "tools": []}, "tool_choice", ["needs tools"]),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}, "tools": TOOLS}, "tool_choice",
     ["get_time", "get_weather"]),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice", ["needs tools"]),
    ({"tools": TOOLS + TOOLS}, "tools", ["get_weather", "distinct"]),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name", ["name"]),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type", ["function"]),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice", ["tool_choice"]),
    ({"continue_final_message": True}, "continue_final_message", ["add_generation_prompt"]),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", ["tokenize"]),
    ({"reasoning_effort": "extreme"}, "reasoning_effort", ["reasoning_effort"]),
    ({"messages": [{"role": "tool", "content": "18C"}]}, "messages.0", ["tool_call_id"]),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0", ["assistant"]),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages.0.content",
     ["input_audio"]),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]}, "messages.0.content", ["file"]),
    ({"chat_template": "{{ messages }}"}, "chat_template", ["--trust-request-chat-template"]),
])
def test_chat_field_validation_is_400_naming_the_field(engine, extra, param, words):
    response = post(engine, CHAT, _body(Row(CHAT, "", extra, "refused")))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error


def test_a_conversation_with_tool_calls_and_results_is_served(engine):
    messages = [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should call the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]
    for tool_choice in ("none", "auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        response = post(engine, CHAT, {"messages": messages, "tools": TOOLS, "tool_choice": tool_choice,
                                       "max_tokens": 2})
        assert response.status_code == 200, (tool_choice, response.text)
    # "none" asks for nothing, so it needs no tools
    assert post(engine, CHAT, {"messages": MESSAGES, "tool_choice": "none", "max_tokens": 2}).status_code == 200


def test_a_request_chat_template_is_allowed_where_the_server_trusts_it(engine):
    body = {"messages": MESSAGES, "max_tokens": 2, "chat_template": "{{ messages[0]['content'] }}"}
    assert post(engine, CHAT, body, ServerSettings(trust_request_chat_template=True)).status_code == 200
    assert post(engine, CHAT, body, ServerSettings()).status_code == 400


def test_template_dicts_of_messages():
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": None, "reasoning_content": "hmm", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": [1, 2]}'}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "not json"}},
            {"id": "c", "type": "function", "function": {"name": "h", "arguments": ""}},
            {"id": "d", "type": "function", "function": {"name": "k", "arguments": "[1]"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "3"}],
        "tools": TOOLS, "reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}})
    system, user, assistant, tool = request.template_messages()
    assert system == {"role": "system", "content": "Be brief"}
    assert user == {"role": "user", "content": "Hi", "name": "ann"}
    assert assistant["content"] == "" and "reasoning_content" not in assistant
    assert [call["function"]["arguments"] for call in assistant["tool_calls"]] == [{"x": [1, 2]}, "not json", {}, "[1]"]
    assert assistant["tool_calls"][0] == {"id": "a", "type": "function",
                                          "function": {"name": "f", "arguments": {"x": [1, 2]}}}
    assert tool == {"role": "tool", "content": "3", "tool_call_id": "a"}
    assert request.template_tools() == TOOLS
    assert request.template_kwargs() == {"reasoning_effort": "high", "enable_thinking": False}
    assert request.parallel_tool_calls is True
    overridden = request.model_copy(update={"chat_template_kwargs": {"reasoning_effort": "low"}})
    assert overridden.template_kwargs() == {"reasoning_effort": "low"}
