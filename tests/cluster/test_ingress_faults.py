"""Faults as the ingress sees them, in one process without a Ray cluster: the ingress app over a fake
deployment handle that drives a real `LLMReplica`.

- A replica that cuts its requests short (its engine shutting down aborts them) is a replica
  failure, never a finished request: what the client had not seen yet is retried on another
  replica, a stream that had sent tokens ends with an error event.
- A client that leaves while the replica runs its request is not an error: the request is aborted
  on the replica, and nothing is logged as an error.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest

from pagoda.cluster.client import ClusterEngineClient, ModelRoute
from pagoda.cluster.config import ModelDeployment
from pagoda.cluster.ingress import build_ingress_app
from pagoda.cluster.replica import LLMReplica
from pagoda.engine.entrypoints.settings import ServerSettings


class _Stream:
    def __init__(self, batches: Any) -> None:
        self._batches = batches

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._batches.__anext__()

    def cancel(self) -> None:
        asyncio.ensure_future(self._batches.aclose())


class CuttingHandle:
    """A deployment handle over one in-process replica. The first call's request is aborted by the
    replica's own engine once `cut_after` batches went out (0: before any), as its shutdown does;
    later calls (the retries) run normally."""

    def __init__(self, replica: LLMReplica, cut_after: int, delay_s: float = 0.0) -> None:
        self.replica = replica
        self.cut_after = cut_after
        self.delay_s = delay_s               # a slow relay: the client can leave mid-request
        self.calls: list[Any] = []
        self.num_relayed = 0
        outer = self

        class _Generate:
            def remote(self, call: Any) -> _Stream:
                outer.calls.append(call)
                return _Stream(outer._run(call, cut=len(outer.calls) == 1))

        class _Describe:
            def remote(self) -> Any:
                return outer.replica.describe()

        self.generate, self.describe = _Generate(), _Describe()

    def options(self, **kwargs: Any) -> "CuttingHandle":
        return self

    async def _run(self, call: Any, cut: bool):
        batches = self.replica.generate(call)
        sent = 0
        try:
            async for batch in batches:
                if cut and sent == self.cut_after:
                    cut = False
                    await self.replica.engine.abort(call.request_id)
                    if sent == 0:
                        continue             # nothing of it reaches the ingress before the cut
                await asyncio.sleep(self.delay_s)
                yield batch
                sent += 1
                self.num_relayed += 1
        finally:
            await batches.aclose()


@pytest.fixture(scope="module")
def replica(tiny_model):
    deployment = {"model": str(tiny_model), "served_model_name": "tiny", "num_gpus_per_worker": 0,
                  "engine_args": {"kv_cache_memory_bytes": 16 << 20, "device": "cpu"}}
    replica = LLMReplica(deployment)
    yield replica
    replica.engine.shutdown()


def post(replica: LLMReplica, cut_after: int, path: str, body: dict[str, Any]) -> tuple[httpx.Response, CuttingHandle]:
    handle = CuttingHandle(replica, cut_after)
    route = ModelRoute(ModelDeployment(model="x", served_model_name="tiny"), "model-tiny", handle)
    client = ClusterEngineClient([route], app_name="test", token_channels=False)
    app = build_ingress_app(client, ServerSettings())

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress",
                                     timeout=60) as http:
            return await http.post(path, json=body)

    return asyncio.run(main()), handle


def completion(**overrides: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, **overrides}


def events(response: httpx.Response) -> list[Any]:
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


@pytest.mark.parametrize("cut_after", [0, 3])
def test_a_non_streamed_request_the_replica_cut_is_retried(replica, cut_after):
    response, handle = post(replica, cut_after, "/v1/completions", completion())
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length" and response.json()["usage"]["completion_tokens"] == 24
    assert [call.hints.attempt for call in handle.calls] == [0, 1]


def test_a_stream_the_replica_cut_before_any_output_is_retried(replica):
    response, handle = post(replica, 0, "/v1/completions", completion(stream=True))
    stream = events(response)
    assert stream[-1] == "[DONE]" and not any("error" in event for event in stream[:-1])
    assert [e for e in stream[:-1] if e["choices"]][-1]["choices"][0]["finish_reason"] == "length"
    assert len(handle.calls) == 2


def test_a_stream_the_replica_cut_after_tokens_ends_with_an_error_event(replica):
    response, handle = post(replica, 3, "/v1/completions", completion(stream=True))
    stream = events(response)
    assert response.status_code == 200 and stream[-1] == "[DONE]"
    error = stream[-2]["error"]
    assert error["code"] == "shutting_down" and "replica" in error["message"]
    assert not any(e["choices"][0]["finish_reason"] for e in stream[:-2] if e.get("choices")), "a cut looked finished"
    assert len(handle.calls) == 1


def test_a_client_that_leaves_while_the_replica_runs_its_request_is_not_an_error(replica, caplog):
    handle = CuttingHandle(replica, cut_after=10**9, delay_s=0.05)          # never cuts
    route = ModelRoute(ModelDeployment(model="x", served_model_name="tiny"), "model-tiny", handle)
    app = build_ingress_app(ClusterEngineClient([route], app_name="test", token_channels=False), ServerSettings())
    body = json.dumps(completion(max_tokens=200)).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def main() -> list[dict[str, Any]]:
        left = asyncio.Event()
        messages: list[dict[str, Any]] = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        call = asyncio.ensure_future(app(scope, receive, send))
        for _ in range(1500):
            if handle.num_relayed >= 2 or call.done():
                break
            await asyncio.sleep(0.02)
        assert not call.done(), sent
        left.set()
        await asyncio.wait_for(call, 30)
        return sent

    sent = asyncio.run(main())
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] in ([], [499])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
