"""Tool calling and reasoning in the chat endpoint, on the tiny random model (in-process app).

A random model writes no tool syntax by itself: "required" and named tool_choice must still give
valid calls (the grammar's work); "auto" is checked with a scripted output through the same path
(an engine client whose generations are fixed texts), streamed and not; reasoning splits likewise.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import httpx
import jsonschema
import pytest

from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.entrypoints.openai.api_server import build_app
from pagoda.engine.entrypoints.settings import ServerSettings

from .server_helpers import MODEL_NAME

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def engine(inprocess_engine):
    return inprocess_engine


def post(engine: Any, body: dict[str, Any], settings: Optional[ServerSettings] = None) -> httpx.Response:
    async def main() -> httpx.Response:
        app = build_app(engine, settings or ServerSettings())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            return await http.post("/v1/chat/completions", json={"model": MODEL_NAME, **body}, timeout=60)

    return asyncio.run(main())


def assemble(response: httpx.Response) -> list[dict[str, Any]]:
    """Per choice: content, reasoning and tool calls assembled from the stream as the openai SDK does."""
    choices: dict[int, dict[str, Any]] = {}
    for line in response.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[6:]).get("choices", []):
            state = choices.setdefault(choice["index"], {"content": "", "reasoning": "", "calls": {}, "finish": None})
            delta = choice["delta"]
            state["content"] += delta.get("content") or ""
            state["reasoning"] += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or []:
                slot = state["calls"].setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""
            state["finish"] = choice["finish_reason"] or state["finish"]
    return [choices[i] for i in sorted(choices)]


def check_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_always_gives_valid_calls(engine, parallel):
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "n": 3, "temperature": 1.0,
            "seed": 5, "max_tokens": 200, "parallel_tool_calls": parallel}
    response = post(engine, body)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        message = choice["message"]
        assert choice["finish_reason"] == "tool_calls" and message["content"] is None
        assert message["tool_calls"] and (parallel or len(message["tool_calls"]) == 1)
        for call in message["tool_calls"]:
            assert call["id"].startswith("call_") and call["type"] == "function"
            check_call(call["function"]["name"], call["function"]["arguments"])
    streamed = assemble(post(engine, {**body, "stream": True}))
    assert len(streamed) == 3
    for state in streamed:
        assert state["finish"] == "tool_calls" and state["calls"] and not state["content"]
        for call in state["calls"].values():
            assert call["id"]
            check_call(call["name"], call["arguments"])


def test_named_function_gives_one_call_to_it(engine):
    body = {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 200, "temperature": 0.9, "seed": 1,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    choice = post(engine, body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    check_call("get_weather", call["function"]["arguments"])
    [state] = assemble(post(engine, {**body, "stream": True}))
    assert [c["name"] for c in state["calls"].values()] == ["get_weather"]
    assert state["calls"][0]["arguments"] == call["function"]["arguments"]       # same seed, same call
    assert state["finish"] == "tool_calls"


def test_none_gives_plain_content(engine):
    choice = post(engine, {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none", "max_tokens": 8,
                           "temperature": 0.0}).json()["choices"][0]
    assert choice["message"]["tool_calls"] == [] and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")


def test_auto_without_a_parser_is_400_naming_tool_choice(engine):
    for body in ({"messages": MESSAGES, "tools": TOOLS}, {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "auto"}):
        response = post(engine, body)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "tool_choice" and "--enable-auto-tool-choice" in response.text


def test_required_with_response_format_is_400(engine):
    response = post(engine, {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
                             "response_format": {"type": "json_object"}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_auto_tool_choice_needs_a_parser_the_template_can_tell(engine):
    with pytest.raises(ValueError, match="--tool-call-parser"):
        build_app(engine, ServerSettings(enable_auto_tool_choice=True))


# -- "auto" and reasoning over scripted outputs ---------------------------------------------------------
class ScriptedEngine:
    """An engine client whose every generation is `text`, streamed in small pieces."""

    def __init__(self, real: AsyncEngine, text: str) -> None:
        self._real, self.text = real, text
        self.params: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def generate(self, prompt, params, request_id=None, priority=0):
        from pagoda.engine.outputs import CompletionOutput, RequestOutput

        self.params.append(params)
        pieces = [self.text[i:i + 3] for i in range(0, len(self.text), 3)]
        token_ids: list[int] = []
        for position, piece in enumerate(pieces):
            last = position == len(pieces) - 1
            token_ids.append(position)
            completion = CompletionOutput(index=0, text=self.text[:3 * (position + 1)], token_ids=list(token_ids),
                                          cumulative_logprob=None, logprobs=None,
                                          finish_reason="stop" if last else None,
                                          delta_text=piece, delta_token_ids=[position])
            yield RequestOutput(request_id=request_id or "r", prompt=None, prompt_token_ids=[1, 2],
                                prompt_logprobs=None, outputs=[completion], finished=last)


HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
AUTO = ServerSettings(enable_auto_tool_choice=True, tool_call_parser="hermes")


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_the_models_calls(engine, stream):
    scripted = ScriptedEngine(engine, HERMES)
    response = post(scripted, {"messages": MESSAGES, "tools": TOOLS, "stream": stream}, AUTO)
    assert response.status_code == 200, response.text
    if stream:
        [state] = assemble(response)
        content, calls = state["content"], [(c["name"], c["arguments"]) for c in state["calls"].values()]
        finish = state["finish"]
    else:
        choice = response.json()["choices"][0]
        content, finish = choice["message"]["content"], choice["finish_reason"]
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]]
    assert content.strip() == "Let me check." and finish == "tool_calls"
    assert [(name, json.loads(arguments)) for name, arguments in calls] == [
        ("get_weather", {"city": "Oslo", "days": 2}), ("get_time", {"zone": "CET"})]
    single = post(scripted, {"messages": MESSAGES, "tools": TOOLS, "parallel_tool_calls": False}, AUTO)
    assert [c["function"]["name"] for c in single.json()["choices"][0]["message"]["tool_calls"]] == ["get_weather"]


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_content_is_split_from_the_answer_and_its_calls(engine, stream):
    text = "<think>\nThe user wants weather.\n</think>\n\n" + HERMES
    settings = ServerSettings(enable_auto_tool_choice=True, tool_call_parser="hermes", reasoning_parser="qwen3")
    response = post(ScriptedEngine(engine, text), {"messages": MESSAGES, "tools": TOOLS, "stream": stream}, settings)
    if stream:
        [state] = assemble(response)
        reasoning, content, names = state["reasoning"], state["content"], [c["name"] for c in state["calls"].values()]
    else:
        message = response.json()["choices"][0]["message"]
        reasoning, content = message["reasoning_content"], message["content"]
        names = [c["function"]["name"] for c in message["tool_calls"]]
    assert reasoning == "The user wants weather." and content.strip() == "Let me check."
    assert names == ["get_weather", "get_time"]


def test_with_reasoning_the_constraint_starts_after_the_thinking(engine):
    """A reasoning model's constrained answer: the engine is told to start the grammar after </think>
    unless the prompt closed the block already (a template rendering with thinking off)."""
    settings = ServerSettings(reasoning_parser="deepseek_r1")
    scripted = ScriptedEngine(engine, '<think>\nhm\n</think>\n{"a": 1}')
    body = {"messages": MESSAGES, "response_format": {"type": "json_object"}}
    message = post(scripted, body, settings).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "hm" and json.loads(message["content"]) == {"a": 1}
    after = scripted.params[-1].structured_outputs.after_token_ids
    assert after and engine.tokenizer.decode(after) == "</think>"
    closed = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think></think>"}]
    post(scripted, {**body, "messages": closed, "add_generation_prompt": False, "continue_final_message": True},
         settings)
    assert scripted.params[-1].structured_outputs.after_token_ids is None
    post(scripted, body)                                              # no reasoning parser: from the start
    assert scripted.params[-1].structured_outputs.after_token_ids is None
