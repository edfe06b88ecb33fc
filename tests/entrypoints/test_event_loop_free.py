"""One request never freezes the server: while a huge request is read, refused or tokenized, /health
and a small completion still answer at once (a real server process, the tiny model's real tokenizer).

Tokenizing 15 MB takes the tokenizer seconds on these CPUs; on the event loop, every other request
would wait that long. A prompt that cannot fit is refused by its character count before tokenizing,
and a long one that might fit is tokenized on a worker thread."""
from __future__ import annotations

import asyncio
import statistics
import threading
import time
from typing import Callable

import httpx
import pytest

from .server_helpers import MODEL_NAME, start_server

from pagoda.engine.processing.tokenizer import INLINE_TOKENIZER_SIZE, TokenizerThread

HUGE_CHARS = 15_000_000
# Before the fix /health waited for the whole tokenization (seconds); a loaded shared CPU adds tens of ms.
MAX_HEALTH_LATENCY_S = 0.5


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("logs"), "--max-request-body-bytes", "32MiB")
    yield server
    server.stop()


class Prober(threading.Thread):
    """Calls `probe` (returns a status) over and over until stopped; records (latency, status)."""

    def __init__(self, probe: Callable[[httpx.Client], int], interval_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.probe = probe
        self.interval_s = interval_s
        self.results: list[tuple[float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stopped.is_set():
                started = time.perf_counter()
                status = self.probe(http)
                self.results.append((time.perf_counter() - started, status))
                self.stopped.wait(self.interval_s)


def while_serving(server, send: Callable[[], httpx.Response]) -> tuple[httpx.Response, list, list]:
    """Runs `send` while probing /health and small completions; returns its response and both probes'
    (latency, status) lists."""
    health = Prober(lambda http: http.get(f"{server.url}/health").status_code)
    small = Prober(lambda http: http.post(f"{server.url}/v1/completions", headers=server.headers, json={
        "model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 1}).status_code, interval_s=0.05)
    for prober in (health, small):
        prober.start()
    time.sleep(0.3)                     # both probes warmed up (connections open)
    health.results.clear()
    small.results.clear()
    try:
        response = send()
    finally:
        for prober in (health, small):
            prober.stopped.set()
            prober.join(60)
    return response, health.results, small.results


def huge_request(server, path: str, body: dict) -> Callable[[], httpx.Response]:
    return lambda: httpx.post(f"{server.url}{path}", json=body, headers=server.headers, timeout=120)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Once upon a time " * (HUGE_CHARS // 17)}),
    ("/v1/completions", {"prompt": ["Once upon a time " * (HUGE_CHARS // 34)] * 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Once upon a time " * (HUGE_CHARS // 17)}]}),
    ("/tokenize", {"prompt": "Once upon a time " * (HUGE_CHARS // 17)}),
    ("/v1/completions", {"prompt": "[{" * (HUGE_CHARS // 2)}),
])
def test_health_and_small_requests_answer_while_a_huge_request_is_refused(server, path, body):
    response, health, small = while_serving(server, huge_request(server, path, body))
    assert response.status_code == 400, response.text[:500]
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert health and all(status == 200 for _, status in health)
    assert small and all(status == 200 for _, status in small)
    worst = max(latency for latency, _ in health)
    assert worst < MAX_HEALTH_LATENCY_S, (worst, statistics.median(latency for latency, _ in health))
    assert max(latency for latency, _ in small) < 2 * MAX_HEALTH_LATENCY_S


def test_a_long_prompt_that_might_fit_is_tokenized_off_the_event_loop(server):
    """~100k characters pass the size check (the tiny tokenizer's tokens hold up to 13 characters),
    so they are tokenized (on the worker thread) and refused by their token count."""
    prompt = "Once upon a time " * 6000
    response, health, _ = while_serving(server, huge_request(server, "/v1/completions", {"prompt": prompt}))
    assert response.status_code == 400 and "tokens, but max_model_len is 8192" in response.json()["error"]["message"]
    assert max(latency for latency, _ in health) < MAX_HEALTH_LATENCY_S


def test_the_tokenizer_thread_runs_small_work_inline_and_large_work_on_its_thread():
    thread = TokenizerThread("test-tokenizer")

    async def main() -> tuple[str, str]:
        small = await thread.run(lambda: threading.current_thread().name, size=INLINE_TOKENIZER_SIZE)
        large = await thread.run(lambda: threading.current_thread().name, size=INLINE_TOKENIZER_SIZE + 1)
        return small, large

    small, large = asyncio.run(main())
    assert small == threading.current_thread().name and large.startswith("test-tokenizer")
