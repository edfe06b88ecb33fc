"""Every client mistake gets OpenAI's error envelope and its status (never 422 or 500), with no
stack trace or file path; a real internal error is a bare 500."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import httpx
import pytest

from .server_helpers import MODEL_NAME

from pagoda.engine.entrypoints.openai.api_server import build_app
from pagoda.engine.entrypoints.settings import ServerSettings
from pagoda.engine.outputs import EngineStats


def assert_envelope(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    for leak in ("Traceback", ".py", "/work", "site-packages", 'File "'):
        assert leak not in error["message"], error["message"]
    return error


def post(server, path: str, **kwargs) -> httpx.Response:
    headers = {**server.headers, **kwargs.pop("headers", {})}
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=30, **kwargs)


@pytest.mark.parametrize("content", [b'{"prompt": "x", ', b"not json at all", b"\xff\xfe", b""])
def test_malformed_json_is_400(main_server, content):
    error = assert_envelope(post(main_server, "/v1/completions", content=content), 400)
    assert "JSON" in error["message"]


@pytest.mark.parametrize("content", [b"[1, 2]", b'"a string"', b"42", b"null"])
def test_body_not_an_object_is_400(main_server, content):
    error = assert_envelope(post(main_server, "/v1/chat/completions", content=content), 400)
    assert "JSON object" in error["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
])
def test_wrong_types_are_400_naming_the_field(main_server, path, body, param):
    error = assert_envelope(post(main_server, path, json=body), 400)
    assert error["param"] == param
    assert param.split(".")[0] in error["message"]


@pytest.mark.parametrize("field, value", [
    ("temperature", 3.0), ("temperature", -1), ("top_p", 0.0), ("top_p", 1.5), ("n", 0), ("max_tokens", 0),
    ("logprobs", 50), ("presence_penalty", 5.0), ("frequency_penalty", -3), ("min_p", 2.0),
    ("repetition_penalty", 0.0), ("min_tokens", -1),
])
def test_out_of_range_values_are_400(main_server, field, value):
    error = assert_envelope(post(main_server, "/v1/completions", json={"prompt": "x", field: value}), 400)
    assert field in error["message"] and error["param"] == field


@pytest.mark.parametrize("body, word", [
    ({"prompt": "x", "min_tokens": 8, "max_tokens": 4}, "min_tokens"),
    ({"prompt": [100000]}, "vocabulary"),
    ({"prompt": "x", "logit_bias": {"-1": 1.0}}, "logit_bias"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": ""}, "prompt"),
])
def test_engine_validation_errors_are_400(main_server, body, word):
    error = assert_envelope(post(main_server, "/v1/completions", json=body), 400)
    assert word in error["message"]


def test_chat_errors_are_400(main_server):
    too_many = {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    assert "logprobs" in assert_envelope(post(main_server, "/v1/chat/completions", json=too_many), 400)["message"]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert "image_url" in assert_envelope(post(main_server, "/v1/chat/completions", json=image), 400)["message"]
    assert_envelope(post(main_server, "/v1/chat/completions", json={"messages": []}), 400)


def test_prompt_over_max_model_len_is_400_with_lengths(main_server):
    error = assert_envelope(post(main_server, "/v1/completions", json={"prompt": [5] * 9000}), 400)
    assert "9000" in error["message"] and "8192" in error["message"]
    stream = post(main_server, "/v1/completions", json={"prompt": [5] * 9000, "stream": True})
    assert_envelope(stream, 400)


def test_unknown_model_is_404(main_server):
    for path, body in (("/v1/completions", {"prompt": "x", "model": "gpt-9"}),
                       ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})):
        error = assert_envelope(post(main_server, path, json=body), 404)
        assert "gpt-9" in error["message"] and error["code"] == "model_not_found"


def test_unknown_route_and_method(main_server):
    assert_envelope(httpx.get(f"{main_server.url}/v1/nothing", headers=main_server.headers), 404)
    assert_envelope(httpx.get(f"{main_server.url}/v1/completions", headers=main_server.headers), 405)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "test-key"}])
def test_missing_or_wrong_api_key_is_401(main_server, headers):
    response = httpx.post(f"{main_server.url}/v1/completions", json={"prompt": "x"}, headers=headers)
    assert_envelope(response, 401)


def test_body_over_the_limit_is_413(main_server):
    big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    assert_envelope(post(main_server, "/v1/completions", content=big), 413)

    def chunks():   # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 32768
        yield b'"}'

    assert_envelope(post(main_server, "/v1/completions", content=chunks()), 413)


# -- hostile bodies: whatever a client sends, it gets a 4xx naming the problem and the server stays up
CHAT = "/v1/chat/completions"
DEEP = "[" * 5000 + "]" * 5000


def _messages(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("path, content, words", [
    ("/v1/completions", DEEP.encode(), ["deeper than 64"]),
    ("/v1/completions", b'{"prompt": ' + DEEP.encode() + b"}", ["deeper than 64"]),
    ("/v1/completions", b'{"prompt": "x", "ignored": ' + b'{"a": ' * 70 + b"1" + b"}" * 70 + b"}", ["deeper than 64"]),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "x": ' + DEEP.encode()
     + b"}]}]}", ["deeper than 64"]),
    ("/tokenize", b'{"prompt": ' + DEEP.encode() + b"}", ["deeper than 64"]),
    ("/detokenize", b'{"tokens": ' + DEEP.encode() + b"}", ["deeper than 64"]),
    ("/v1/completions", b'{"prompt": "\\\\ud800 is fine, \\ud800 is not"}', ["surrogate"]),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', ["surrogate"]),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}', ["surrogate"]),
    ("/v1/completions", b'{"prompt": "x", "model": "\\ud800"}', ["surrogate"]),
    ("/v1/completions", b'{"prompt": "x", "stop": ["\\ud800"]}', ["surrogate"]),
    ("/tokenize", b'{"prompt": "\\ud800"}', ["surrogate"]),
    ("/v1/completions", b'{"prompt": "caf\xe9 is Latin-1, not UTF-8"}', ["UTF-8"]),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', ["NaN"]),
    ("/v1/completions", b'{"prompt": "x", "top_p": Infinity}', ["Infinity"]),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", ["number"]),
])
def test_hostile_bodies_are_400_naming_the_problem(main_server, path, content, words):
    error = assert_envelope(post(main_server, path, content=content, headers={"Content-Type": "application/json"}),
                            400)
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e400}', "temperature"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"5": -1e999}}', "logit_bias"),
    ("/v1/completions", {"prompt": "x", "n": 10**30}, "n"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1.5": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"\u00b2": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {" 7": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"7": "1"}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": {"a": 1}}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [["a"]]}, "stop"),
    ("/v1/completions", {"prompt": [[1, 2], [3, [4]]]}, "prompt"),
    ("/v1/completions", {"prompt": [["a"]]}, "prompt"),
    ("/v1/completions", {"prompt": [True, False]}, "prompt"),
    ("/v1/completions", {"prompt": [1.0, 2.0]}, "prompt"),
    ("/v1/completions", {"prompt": {"a": "b" * 100_000}}, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 129}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
    (CHAT, {"messages": _messages("hi"), "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    (CHAT, {"messages": _messages("hi"), "max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"messages": _messages([{"type": "text", "text": ["nested"]}])}, "messages.0.content"),
    ("/detokenize", {"tokens": [1.5]}, "tokens"),
])
def test_bad_values_are_400_naming_the_field(main_server, path, body, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    error = assert_envelope(post(main_server, path, content=content, headers={"Content-Type": "application/json"}),
                            400)
    assert error["param"] == param or error["param"].startswith(param + "."), error
    assert len(error["message"]) < 400, error["message"]          # a huge value is quoted, not copied


@pytest.mark.parametrize("path, body, words", [
    ("/v1/completions", {"prompt": [-1]}, ["-1", "vocabulary"]),
    ("/v1/completions", {"prompt": [10**30]}, [str(10**30), "vocabulary"]),
    ("/v1/completions", {"prompt": [1, 512]}, ["512", "vocabulary"]),
    ("/v1/completions", {"prompt": []}, ["empty"]),
    ("/v1/completions", {"prompt": [[]]}, ["empty"]),
    ("/v1/completions", {"prompt": [[1, 2], []]}, ["empty"]),
    ("/v1/completions", {"prompt": [""]}, ["empty"]),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**30]}, ["stop_token_ids"]),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999999999999999": 1}}, ["logit_bias"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**30}, ["maximum context length", str(10**30)]),
    ("/detokenize", {"tokens": [-1]}, ["-1", "vocabulary"]),
    ("/detokenize", {"tokens": [1, 10**12]}, [str(10**12), "vocabulary"]),
    ("/detokenize", {"tokens": [5] * 9000}, ["9000", "max_model_len=8192"]),
])
def test_bad_token_ids_and_lengths_are_400(main_server, path, body, words):
    error = assert_envelope(post(main_server, path, json=body), 400)
    for word in words:
        assert word in error["message"], error["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_that_is_not_json_by_content_type_is_400(main_server, content_type):
    for path in ("/v1/completions", CHAT, "/tokenize", "/detokenize"):
        error = assert_envelope(post(main_server, path, content=b'{"prompt": "x", "tokens": [1]}',
                                     headers={"Content-Type": content_type}), 400)
        assert "Content-Type" in error["message"] and content_type in error["message"]


def test_odd_but_valid_inputs_are_served(main_server):
    """Null bytes, a huge top_k (the sampler's tensor of k's must not overflow: that would kill the
    engine), a JSON content type with a charset; the engine stays healthy after all of the above."""
    json_utf8 = {"Content-Type": "application/json; charset=utf-8"}
    for body in ({"prompt": "a\u0000b", "max_tokens": 2}, {"prompt": "x", "max_tokens": 2, "top_k": 10**30},
                 {"prompt": "x", "max_tokens": 2, "temperature": 1, "seed": -(2**63)}):
        content = json.dumps(body).encode()
        response = post(main_server, "/v1/completions", content=content, headers=json_utf8)
        assert response.status_code == 200, response.text
    response = post(main_server, "/v1/completions", json={"prompt": "x", "model": "\u0000"})
    assert_envelope(response, 404)
    assert httpx.get(f"{main_server.url}/health", timeout=10).status_code == 200
    assert "Traceback" not in main_server.log()


class _BrokenClient:
    """An engine client whose generate fails with an internal error mentioning a file path."""

    model_names = [MODEL_NAME]
    tokenizer = None
    max_model_len = 64

    async def generate(self, prompt, params, request_id, priority=0) -> AsyncIterator:
        raise RuntimeError('boom in File "/secret/engine/model_runner.py", line 3')
        yield  # pragma: no cover

    async def abort(self, request_id: str) -> None: ...
    async def get_stats(self) -> EngineStats: return EngineStats()
    async def is_healthy(self) -> bool: return True
    async def render_metrics(self) -> bytes: return b""


def test_internal_error_is_a_bare_500():
    app = build_app(_BrokenClient(), ServerSettings())

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            return (await http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}),
                    await http.post("/v1/completions", json={"prompt": [1, 2], "stream": True}))

    for response in asyncio.run(main()):
        error = assert_envelope(response, 500)
        assert "secret" not in error["message"] and error["type"] == "server_error"
