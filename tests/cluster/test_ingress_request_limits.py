"""Hostile bodies, length validation and a free event loop through the cluster ingress: the ingress
app and `ClusterEngineClient` in one process over a real `LLMReplica` (as in test_ingress_client.py),
so the ingress's own body peek (RequestScopeMiddleware) and routing-key tokenization are covered
without a Ray cluster. The tiny model's max_model_len is 256."""
from __future__ import annotations

import asyncio
import pickle
import time
from typing import Any

import httpx
import pytest
from ray.exceptions import RayTaskError

from test_ingress_client import FakeHandle, LoopThread

from pagoda.cluster.client import ClusterEngineClient, ModelRoute, _cause
from pagoda.cluster.config import ModelDeployment
from pagoda.cluster.ingress import build_ingress_app
from pagoda.cluster.replica import LLMReplica
from pagoda.engine.entrypoints.settings import ServerSettings
from pagoda.engine.processing.tokenizer import ContextLengthExceededError

API_KEY = "k"
MAX_MODEL_LEN = 256
MAX_HEALTH_LATENCY_S = 0.5


@pytest.fixture(scope="module")
def ingress(tiny_model):
    loop_thread = LoopThread()
    replica = LLMReplica({"model": str(tiny_model), "served_model_name": "tiny", "num_gpus_per_worker": 0,
                          "engine_args": {"kv_cache_memory_bytes": 16 << 20, "device": "cpu"}})
    handle = FakeHandle(replica)
    route = ModelRoute(ModelDeployment(model="x", served_model_name="tiny"), "model-tiny", handle)
    client = ClusterEngineClient([route], app_name="test", token_channels=False)
    app = build_ingress_app(client, ServerSettings(api_key=API_KEY, max_request_body_bytes=32 << 20))
    transport = httpx.ASGITransport(app=app)

    async def send(method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, float]:
        headers = {"Authorization": f"Bearer {API_KEY}", **kwargs.pop("headers", {})}
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress", timeout=120) as http:
            started = time.perf_counter()
            response = await http.request(method, path, headers=headers, **kwargs)
            return response, time.perf_counter() - started

    yield loop_thread, send, handle
    replica.engine.shutdown()
    loop_thread.stop()


def request(ingress, method: str, path: str, **kwargs: Any) -> httpx.Response:
    loop_thread, send, _ = ingress
    return loop_thread.run(send(method, path, **kwargs))[0]


@pytest.mark.parametrize("content, word", [
    (b"[" * 100_000, "deeper than 64"),
    (b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "deeper than 64"),
    (b'{"model": "tiny", "prompt": "\\ud800"}', "surrogate"),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "NaN"),
])
def test_hostile_bodies_are_400_through_the_ingress(ingress, content, word):
    response = request(ingress, "POST", "/v1/completions", content=content,
                       headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert word in response.json()["error"]["message"]


def test_wrong_content_type_is_400_through_the_ingress(ingress):
    response = request(ingress, "POST", "/v1/completions", content=b'{"model": "tiny", "prompt": "x"}',
                       headers={"Content-Type": "text/plain"})
    assert response.status_code == 400 and "Content-Type" in response.json()["error"]["message"]


def test_max_tokens_over_the_context_is_400_with_the_lengths(ingress):
    response = request(ingress, "POST", "/v1/completions",
                       json={"model": "tiny", "prompt": [5] * 200, "max_tokens": 100})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert (f"maximum context length is {MAX_MODEL_LEN} tokens. However, you requested 300 tokens "
            "(200 in the messages, 100 in the completion)") in error["message"]


def test_the_length_error_crosses_ray_intact():
    error = ContextLengthExceededError("This model's maximum context length is 256 tokens.")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ContextLengthExceededError and str(copy) == str(error)
    wrapped = RayTaskError("generate", "Traceback ...", error).as_instanceof_cause()
    cause = _cause(wrapped)
    assert isinstance(cause, ContextLengthExceededError) and cause.code == "context_length_exceeded"


def test_health_answers_while_a_huge_prompt_is_refused(ingress):
    loop_thread, send, handle = ingress
    huge = {"model": "tiny", "prompt": "Once upon a time " * (15_000_000 // 17)}

    async def main() -> tuple[httpx.Response, list[float]]:
        await send("GET", "/health")
        latencies: list[float] = []
        task = asyncio.ensure_future(send("POST", "/v1/completions", json=huge))
        while not task.done():
            response, latency = await send("GET", "/health")
            assert response.status_code == 200
            latencies.append(latency)
            await asyncio.sleep(0.01)
        return (await task)[0], latencies

    calls_before = len(handle.calls)
    response, latencies = loop_thread.run(main())
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert latencies and max(latencies) < MAX_HEALTH_LATENCY_S, latencies
    [call] = handle.calls[calls_before:]
    assert call.hints.prefix_hashes == []         # not tokenized for routing: it cannot fit
