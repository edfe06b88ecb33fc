"""A drain that runs out of time must not look like success, and a drain with time serves the queue.

Every request accepted before the drain either completes or fails visibly: cut short by the
shutdown timeout, a non-streamed request gets 503 `shutting_down` (never a 200 with fewer tokens
than asked, or none), a stream that had started gets an error event before `[DONE]`, one that had
not started (it waited in the queue) a 503; a gRPC call ends UNAVAILABLE. Queued requests the drain
has time for are served in full.

In process (a real AsyncEngine behind `build_app` and its `ServerLifecycle`, the drain called
directly), plus one real `pagoda serve` process stopped by SIGTERM.
"""
from __future__ import annotations

import asyncio
import signal
import time
from typing import Any, AsyncIterator, Optional

import grpc
import httpx
import pytest

from pagoda.engine import EngineArgs, SamplingParams
from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.entrypoints.grpc import pagoda_pb2
from pagoda.engine.entrypoints.grpc.server import PagodaServicer
from pagoda.engine.entrypoints.lifecycle import ServerLifecycle
from pagoda.engine.entrypoints.openai.api_server import build_app
from pagoda.engine.entrypoints.settings import ServerSettings
from pagoda.engine.errors import EngineShuttingDownError
from pagoda.engine.outputs import CompletionOutput, RequestOutput

from .asgi_calls import AsgiResponse, server_errors, start_call, wait_until
from .server_helpers import MODEL_NAME, metric, start_server, wait_for

PROMPT = "Once upon a time"


def make_engine(model_dir, max_num_seqs: int) -> AsyncEngine:
    config = EngineArgs(model=str(model_dir), kv_cache_memory_bytes=16 << 20, max_num_seqs=max_num_seqs).create_config()
    return AsyncEngine(config)


async def load(engine: AsyncEngine, running: int, waiting: int) -> bool:
    stats = await engine.get_stats()
    return stats.num_running == running and stats.num_waiting == waiting


def completion(max_tokens: int, **overrides: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **overrides}


def chat(max_tokens: int, **overrides: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "ignore_eos": True,
            **overrides}


def assert_cut(response: AsgiResponse) -> None:
    """A 503 that says the shutdown cut the request (and when to come back)."""
    assert response.status == 503, response.body
    assert response.json()["error"]["code"] == "shutting_down"
    assert dict(response.messages[0]["headers"]).get(b"retry-after") == b"5"


def test_requests_the_drain_cuts_short_fail_visibly(tiny_model_dir, caplog):
    engine = make_engine(tiny_model_dir, max_num_seqs=3)
    try:
        async def main():
            app = build_app(engine, ServerSettings())
            lifecycle: ServerLifecycle = app.state.lifecycle
            running = [start_call(app, "/v1/completions", completion(8000)),
                       start_call(app, "/v1/completions", completion(8000, stream=True, logprobs=0,
                                                                     stream_options={"include_usage": True})),
                       start_call(app, "/v1/chat/completions", chat(8000, stream=True))]
            await wait_until(lambda: load(engine, 3, 0), 30, "three running requests")
            queued = [start_call(app, "/v1/chat/completions", chat(8)),
                      start_call(app, "/v1/chat/completions", chat(8, stream=True)),
                      start_call(app, "/v1/completions", completion(8, prompt=[PROMPT, "Hello"]))]
            await wait_until(lambda: load(engine, 3, 4), 30, "four queued engine requests")
            started = time.monotonic()
            await lifecycle.drain(engine, timeout_s=0.5)
            drained_in = time.monotonic() - started
            responses = [await call.result() for call in running + queued]
            return lifecycle, drained_in, responses, await engine.get_stats()

        lifecycle, drained_in, responses, stats = asyncio.run(main())
    finally:
        engine.shutdown()
    plain, stream, chat_stream, *queued = responses
    assert_cut(plain)
    for response in queued:
        assert_cut(response)
    for response in (stream, chat_stream):
        assert response.status == 200
        events = response.events()
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
        chunks = [event for event in events[:-2] if event.get("choices")]
        assert len(chunks) >= 2 and chunks[-1]["choices"][0]["finish_reason"] == "abort"
    assert stream.events()[-3]["usage"]["completion_tokens"] < 8000       # usage, as asked, before the error
    assert drained_in < 5.0 and lifecycle.num_active_calls == 0 and not lifecycle.active_request_ids
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert server_errors(caplog.records) == []


def test_queued_requests_accepted_before_the_drain_are_served(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_num_seqs=1)
    try:
        async def main():
            app = build_app(engine, ServerSettings())
            lifecycle: ServerLifecycle = app.state.lifecycle
            first = start_call(app, "/v1/completions", completion(60))
            await wait_until(lambda: load(engine, 1, 0), 30, "the first request to run")
            queued = [start_call(app, "/v1/completions", completion(12)),
                      start_call(app, "/v1/chat/completions", chat(12, stream=True)),
                      start_call(app, "/v1/completions", completion(12, stream=True))]
            await wait_until(lambda: load(engine, 1, 3), 30, "three queued requests")
            drain = asyncio.create_task(lifecycle.drain(engine, timeout_s=120))
            await wait_until(lambda: lifecycle.draining, 5, "the drain to start")
            refused = await start_call(app, "/v1/completions", completion(2)).result()
            await asyncio.wait_for(drain, 120)
            return refused, [await call.result() for call in [first, *queued]]

        refused, (first, plain, chat_stream, stream) = asyncio.run(main())
    finally:
        engine.shutdown()
    assert refused.status == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert first.status == 200 and first.json()["usage"]["completion_tokens"] == 60
    assert plain.status == 200 and plain.json()["choices"][0]["finish_reason"] == "length"
    assert plain.json()["usage"]["completion_tokens"] == 12
    for response in (chat_stream, stream):
        events = response.events()
        assert response.status == 200 and events[-1] == "[DONE]"
        assert not any("error" in event for event in events[:-1])
        assert [e for e in events[:-1] if e["choices"]][-1]["choices"][0]["finish_reason"] == "length"


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class _Context:
    """The part of grpc.aio.ServicerContext the servicer uses."""

    def invocation_metadata(self) -> tuple:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


def test_a_grpc_call_the_drain_cuts_short_ends_unavailable(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_num_seqs=1)
    try:
        async def main():
            lifecycle = ServerLifecycle()
            servicer = PagodaServicer(engine, ServerSettings(), lifecycle)
            request = pagoda_pb2.GenerateRequest(text=PROMPT, sampling=pagoda_pb2.SamplingOptions(
                max_tokens=8000, temperature=0.0, ignore_eos=True))
            messages: list = []

            async def call() -> None:
                async for message in servicer.Generate(request, _Context()):
                    messages.append(message)

            task = asyncio.create_task(call())
            await wait_until(lambda: len(messages) >= 2, 30, "streamed tokens")
            await lifecycle.drain(engine, timeout_s=0.2)
            with pytest.raises(_Aborted) as raised:
                await asyncio.wait_for(task, 10)
            return messages, raised.value

        messages, aborted = asyncio.run(main())
    finally:
        engine.shutdown()
    assert aborted.code == grpc.StatusCode.UNAVAILABLE and "shut down" in str(aborted)
    assert messages[-1].finish_reason == "abort"


class _LateClient:
    """An engine client that, like AsyncEngine while it tokenizes, does not know a request until it
    has started, and ignores aborts of ids it does not know."""

    model_names = [MODEL_NAME]
    tokenizer = None
    max_model_len = 64

    def __init__(self) -> None:
        self.may_start = asyncio.Event()
        self.live: set[str] = set()
        self.aborted: set[str] = set()

    async def generate(self, prompt, params, request_id, priority=0) -> AsyncIterator[RequestOutput]:
        await self.may_start.wait()
        self.live.add(request_id)
        tokens: list[int] = []
        while request_id not in self.aborted:
            tokens.append(1)
            yield _output(request_id, tokens, None)
            await asyncio.sleep(0.01)
        yield _output(request_id, tokens, "abort")

    async def abort(self, request_id: str) -> None:
        if request_id in self.live:
            self.aborted.add(request_id)


def _output(request_id: str, tokens: list[int], finish_reason: Optional[str]) -> RequestOutput:
    completion = CompletionOutput(index=0, text="", token_ids=list(tokens), cumulative_logprob=None, logprobs=None,
                                  finish_reason=finish_reason, delta_token_ids=[1] if finish_reason is None else [])
    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=[1], prompt_logprobs=None,
                         outputs=[completion], finished=finish_reason is not None)


def test_a_request_the_engine_did_not_know_yet_when_cut_is_aborted_at_its_first_output():
    async def main():
        client = _LateClient()
        lifecycle = ServerLifecycle()
        outputs: list[RequestOutput] = []

        async def consume() -> None:
            with lifecycle.call():
                async for output in lifecycle.generate(client, PROMPT, SamplingParams(), "late"):
                    outputs.append(output)

        consumer = asyncio.create_task(consume())
        await wait_until(lambda: lifecycle.active_request_ids, 5, "the call to begin")
        drain = asyncio.create_task(lifecycle.drain(client, timeout_s=0.1))
        await asyncio.sleep(0.5)                 # the drain has run out of time and aborted "late"...
        client.may_start.set()                   # ...which the engine learns of only now
        await asyncio.wait_for(drain, 5)
        await asyncio.wait_for(consumer, 5)
        with pytest.raises(EngineShuttingDownError, match="shut down before this request finished"):
            async for _ in lifecycle.generate(client, PROMPT, SamplingParams(), "after-the-cut"):
                pass
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"


# -- a real server stopped by SIGTERM ------------------------------------------------------------------
def test_sigterm_with_a_short_timeout_cuts_visibly_and_exits_0(tiny_model_dir, tmp_path):
    server = start_server(tiny_model_dir, tmp_path, "--max-num-seqs", "2", "--shutdown-timeout", "2")
    try:
        async def main():
            async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as http:
                async def stream(body: dict) -> tuple[int, list[str]]:
                    async with http.stream("POST", "/v1/completions", json=body) as response:
                        lines = [line async for line in response.aiter_lines()]
                        return response.status_code, [line[6:] for line in lines if line.startswith("data: ")]

                body = {"model": MODEL_NAME, **completion(8000)}
                calls = [asyncio.create_task(http.post("/v1/completions", json=body)),
                         asyncio.create_task(stream({**body, "stream": True}))]
                await asyncio.to_thread(
                    wait_for, lambda: metric(server.metrics(), "pagoda:num_requests_running") == 2, 30.0)
                calls.append(asyncio.create_task(http.post("/v1/completions", json=body)))
                await asyncio.to_thread(
                    wait_for, lambda: metric(server.metrics(), "pagoda:num_requests_waiting") == 1, 30.0)
                server.process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*calls)

        plain, (stream_status, events), queued = asyncio.run(main())
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()
    for response in (plain, queued):
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "shutting_down"
    assert stream_status == 200 and events[-1] == "[DONE]" and '"shutting_down"' in events[-2]
    assert "Traceback" not in server.log()
