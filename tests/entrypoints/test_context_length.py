"""Length validation as vLLM and OpenAI do it: prompt + max_tokens over max_model_len is refused before
any generation, naming the prompt length, the request and the limit; the same check (the input
processor's) answers for the offline `LLM`, the `AsyncEngine`, HTTP (400) and gRPC (INVALID_ARGUMENT).

The tiny model's max_model_len is 8192 (server_helpers.MAX_POSITION_EMBEDDINGS)."""
from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest

from .server_helpers import API_KEY, MAX_POSITION_EMBEDDINGS as MAX_MODEL_LEN, metric

from pagoda.engine import SamplingParams
from pagoda.engine.config import EngineArgs
from pagoda.engine.entrypoints.grpc import pagoda_pb2, pagoda_pb2_grpc
from pagoda.engine.processing.tokenizer import ContextLengthExceededError

CHAT = "/v1/chat/completions"
GREEDY = {"temperature": 0, "ignore_eos": True}


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers, timeout=120)


def vllm_message(prompt_tokens: int, max_tokens: int) -> str:
    return (f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            f"completion). Please reduce the length of the messages or completion.")


def chat_messages(server, num_tokens: int) -> list[dict]:
    """A conversation whose chat prompt is exactly `num_tokens` tokens."""
    def count(words: int) -> int:
        body = {"messages": [{"role": "user", "content": "a" + " a" * words}]}
        return httpx.post(f"{server.url}/tokenize", json=body, headers=server.headers).json()["count"]

    overhead = count(0) - 1
    words = num_tokens - overhead - 1
    assert count(words) == num_tokens      # " a" is one token of the tiny tokenizer
    return [{"role": "user", "content": "a" + " a" * words}]


# -- HTTP ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_prompt_plus_max_tokens_over_the_limit_is_400_before_generation(main_server, stream):
    before = metric(main_server.metrics(), "pagoda:prompt_tokens_total")
    response = post(main_server, "/v1/completions", {"prompt": [5] * 8000, "max_tokens": 500, "stream": stream})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith(vllm_message(8000, 500)) and "at most 192" in error["message"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert metric(main_server.metrics(), "pagoda:prompt_tokens_total") == before     # nothing was run


def test_a_request_that_exactly_fits_is_served(main_server):
    response = post(main_server, "/v1/completions", {"prompt": [5] * (MAX_MODEL_LEN - 2), "max_tokens": 2, **GREEDY})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
    response = post(main_server, "/v1/completions", {"prompt": [5] * (MAX_MODEL_LEN - 2), "max_tokens": 3})
    assert response.status_code == 400 and vllm_message(MAX_MODEL_LEN - 2, 3) in response.json()["error"]["message"]


def test_completions_default_max_tokens_counts_as_requested(main_server):
    """OpenAI's completions default is max_tokens=16, and OpenAI refuses it when it does not fit too."""
    response = post(main_server, "/v1/completions", {"prompt": [5] * (MAX_MODEL_LEN - 10)})
    assert response.status_code == 400 and vllm_message(MAX_MODEL_LEN - 10, 16) in response.json()["error"]["message"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_chat_max_tokens_over_the_limit_is_400(main_server, field):
    messages = chat_messages(main_server, 100)
    response = post(main_server, CHAT, {"messages": messages, field: MAX_MODEL_LEN})
    assert response.status_code == 400, response.text
    assert vllm_message(100, MAX_MODEL_LEN) in response.json()["error"]["message"]


def test_chat_without_max_tokens_gets_what_fits(main_server):
    messages = chat_messages(main_server, MAX_MODEL_LEN - 3)
    response = post(main_server, CHAT, {"messages": messages, **GREEDY})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"] == {"prompt_tokens": MAX_MODEL_LEN - 3, "completion_tokens": 3, "total_tokens": MAX_MODEL_LEN}
    assert body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [5] * MAX_MODEL_LEN, "max_tokens": 1}),
    ("/v1/completions", {"prompt": "Once upon a time " * 30_000}),
    (CHAT, {"messages": [{"role": "user", "content": "Once upon a time " * 30_000}]}),
    ("/tokenize", {"prompt": "Once upon a time " * 30_000}),
])
def test_a_prompt_that_alone_fills_the_context_is_400(main_server, path, body):
    started = time.monotonic()
    response = post(main_server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert str(MAX_MODEL_LEN) in error["message"] and error["code"] == "context_length_exceeded"
    assert time.monotonic() - started < 5.0          # refused by its size, not after tokenizing it


# -- offline LLM and AsyncEngine: the same check, the same message -------------------------------------
@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    from pagoda.engine import LLM
    from pagoda.engine.async_engine import AsyncEngine

    llm = LLM(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20)
    engine = AsyncEngine(EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20).create_config())
    yield llm, engine
    engine.shutdown()
    llm.shutdown()


def _offline_error(llm, prompt, params) -> str:
    with pytest.raises(ContextLengthExceededError) as raised:
        llm.generate([{"prompt_token_ids": [5, 6]}, prompt], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()          # the good prompt was not queued either
    return str(raised.value)


def _async_error(engine, prompt, params) -> str:
    async def main() -> str:
        with pytest.raises(ContextLengthExceededError) as raised:
            async for _ in engine.generate(prompt, params):
                pass
        assert (await engine.get_stats()).num_waiting == 0
        return str(raised.value)

    return asyncio.run(main())


@pytest.mark.parametrize("prompt, params, expected", [
    ({"prompt_token_ids": [5] * 8000}, SamplingParams(max_tokens=500), vllm_message(8000, 500)),
    ({"prompt_token_ids": [5] * (MAX_MODEL_LEN - 10)}, SamplingParams(), vllm_message(MAX_MODEL_LEN - 10, 16)),
    ({"prompt_token_ids": [5] * MAX_MODEL_LEN}, SamplingParams(max_tokens=None),
     f"prompt has {MAX_MODEL_LEN} tokens, but max_model_len is {MAX_MODEL_LEN}"),
    ("Once upon a time " * 30_000, SamplingParams(),
     f"prompt (510000 characters) cannot fit: max_model_len={MAX_MODEL_LEN} tokens hold at most"),
])
def test_offline_and_async_engines_refuse_alike(engines, prompt, params, expected):
    llm, engine = engines
    offline, served = _offline_error(llm, prompt, params), _async_error(engine, prompt, params)
    assert offline == served and expected in offline


def test_max_tokens_none_is_what_fits_offline_and_async(engines):
    llm, engine = engines
    prompt = {"prompt_token_ids": [5] * (MAX_MODEL_LEN - 4)}
    params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    offline = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]

    async def served():
        return [output async for output in engine.generate(prompt, params)][-1].outputs[0]

    for completion in (offline, asyncio.run(served())):
        assert len(completion.token_ids) == 4 and completion.finish_reason == "length"


# -- gRPC ---------------------------------------------------------------------------------------------
AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="module")
def channel(main_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{main_server.grpc_port}")
    yield channel
    channel.close()


@pytest.mark.parametrize("request_message, words", [
    (pagoda_pb2.GenerateRequest(token_ids=pagoda_pb2.TokenIds(ids=[5] * 8000),
                                sampling=pagoda_pb2.SamplingOptions(max_tokens=500)), [vllm_message(8000, 500)]),
    (pagoda_pb2.GenerateRequest(token_ids=pagoda_pb2.TokenIds(ids=[5] * MAX_MODEL_LEN)), ["max_model_len"]),
    (pagoda_pb2.GenerateRequest(text="Once upon a time " * 30_000), ["510000 characters", str(MAX_MODEL_LEN)]),
    (pagoda_pb2.GenerateRequest(text="x", sampling=pagoda_pb2.SamplingOptions(n=1000)), ["n must be at most 128"]),
    (pagoda_pb2.GenerateRequest(text="x", sampling=pagoda_pb2.SamplingOptions(logprobs=10**6)), ["logprobs"]),
])
def test_grpc_refuses_with_invalid_argument(channel, request_message, words):
    stub = pagoda_pb2_grpc.PagodaStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request_message, metadata=AUTH, timeout=60))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    for word in words:
        assert word in raised.value.details()


def test_grpc_message_that_does_not_decode_is_invalid_argument(channel):
    payload = pagoda_pb2.GenerateRequest(text="ab").SerializeToString().replace(b"ab", b"\xff\xfe")
    call = channel.unary_stream("/pagoda.v1.Pagoda/Generate")
    with pytest.raises(grpc.RpcError) as raised:
        list(call(payload, metadata=AUTH, timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in raised.value.details()
