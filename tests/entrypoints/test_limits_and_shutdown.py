"""A server with a small batch and queue: queue full -> 503 + Retry-After; SIGTERM drains and exits 0.

The server (max_num_seqs 2, max_queued_requests 1, shutdown timeout 8 s) is stopped by the last test.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from .server_helpers import MODEL_NAME, child_pids, metric, start_server, wait_for

# NOTE: the long stream (8000 tokens) must outlast the drain on a fast idle machine too: the tiny
# model would need > 2,600 tokens/s for one sequence to finish within 3 s.
SHUTDOWN_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("logs"), "--max-num-seqs", "2",
                          "--max-queued-requests", "1", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
                          "--allowed-origins", "https://app.example")
    yield server
    server.stop()


def body(max_tokens: int, **extra) -> dict:
    return {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "logprobs": 0, "stream_options": {"include_usage": True}, **extra}


class Stream:
    """One streaming completion read event by event."""

    def __init__(self, http: httpx.AsyncClient, server, max_tokens: int) -> None:
        self.context = http.stream("POST", f"{server.url}/v1/completions", json=body(max_tokens),
                                   headers=server.headers)
        self.events: list = []

    async def start(self) -> "Stream":
        self.response = await self.context.__aenter__()
        assert self.response.status_code == 200
        self.lines = self.response.aiter_lines()
        await self.next_event()
        return self

    async def next_event(self):
        async for line in self.lines:
            if line.startswith("data: "):
                payload = line[len("data: "):]
                event = payload if payload == "[DONE]" else json.loads(payload)
                self.events.append(event)
                return event
        return None

    async def read_to_end(self) -> list:
        while (await self.next_event()) not in (None, "[DONE]"):
            pass
        return self.events

    async def close(self) -> None:
        await self.context.__aexit__(None, None, None)

    def finish_reason(self):
        reasons = [c["finish_reason"] for e in self.events if isinstance(e, dict) for c in e.get("choices", [])
                   if c.get("finish_reason")]
        return reasons[-1] if reasons else None

    def usage(self):
        return [e["usage"] for e in self.events if isinstance(e, dict) and e.get("usage")][-1]


def test_cors_only_for_allowed_origins(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{server.url}/v1/completions", headers={"Origin": "https://app.example", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(f"{server.url}/v1/completions", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_queue_full_is_503_with_retry_after(server):
    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            running = [await Stream(http, server, 8000).start() for _ in range(2)]       # both batch seats
            queued = asyncio.create_task(Stream(http, server, 4).start())               # waits for a seat
            assert await asyncio.to_thread(
                wait_for, lambda: metric(server.metrics(), "pagoda:num_requests_waiting") == 1, 10.0)
            refused = await http.post(f"{server.url}/v1/completions", json=body(4), headers=server.headers)
            queued.cancel()
            for stream in running:
                await stream.close()
            return refused

    refused = asyncio.run(main())
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and "max_queued_requests=1" in error["message"]
    assert wait_for(lambda: metric(server.metrics(), "pagoda:num_requests_running") == 0
                    and metric(server.metrics(), "pagoda:num_requests_waiting") == 0, 10.0)


def test_sigterm_drains_then_exits_0(server):
    children = set(child_pids(server.process.pid))

    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            long = await Stream(http, server, 8000).start()
            short = await Stream(http, server, 12).start()
            server.process.send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()

            async def refused() -> bool:
                response = await http.post(f"{server.url}/v1/completions", json=body(2), headers=server.headers)
                return response.status_code == 503

            while not await refused():
                assert time.monotonic() - signalled_at < 5, "new requests still accepted after SIGTERM"
                await asyncio.sleep(0.05)
            health = await http.get(f"{server.url}/health")
            short_events = await short.read_to_end()
            long_events = await long.read_to_end()
            long_ended_at = time.monotonic() - signalled_at
            return health, short, short_events, long, long_events, long_ended_at

    health, short, short_events, long, long_events, long_ended_at = asyncio.run(main())
    assert health.status_code == 503
    assert short.finish_reason() == "length" and short.usage()["completion_tokens"] == 12
    assert short_events[-1] == "[DONE]"
    assert long.finish_reason() == "abort" and long_events[-1] == "[DONE]"
    assert long_events[-2]["error"]["code"] == "shutting_down"      # cut short: an error, never a finish
    assert long.usage()["completion_tokens"] < 8000
    assert long_ended_at >= SHUTDOWN_TIMEOUT_S - 1.0
    assert server.process.wait(timeout=30) == 0
    assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")], "child processes left behind"
