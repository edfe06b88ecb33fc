"""Liveness under KV-cache pressure through the HTTP server: 16 concurrent completions near
max_model_len on an engine whose cache holds two of them all finish with their exact token count,
under both scheduling policies, and none is preempted more than MAX_PREEMPTIONS_PER_REQUEST times
(the server's counter of preemptions is at most that many per request). The server's app is driven in process (ASGI), the engine core on
its thread, as `pagoda serve` runs them; the scheduler's own bounds are in tests/engine/test_kv_pressure.py.
"""
from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from model_factory import TinyModelSpec
from pagoda.engine import EngineArgs
from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.core.scheduler import MAX_PREEMPTIONS_PER_REQUEST
from pagoda.engine.entrypoints.openai.api_server import build_app
from pagoda.engine.entrypoints.settings import ServerSettings

MAX_MODEL_LEN = 64
NUM_REQUESTS = 16
SPEC = TinyModelSpec()
BLOCK_BYTES = 2 * SPEC.num_hidden_layers * 16 * SPEC.num_key_value_heads * SPEC.head_dim * 4


def counter(metrics_text: str, name: str) -> float:
    """The value of counter `name` in a /metrics page (its one sample)."""
    from prometheus_client.parser import text_string_to_metric_families

    [value] = [sample.value for family in text_string_to_metric_families(metrics_text)
               for sample in family.samples if sample.name == name]
    return value


@pytest.mark.parametrize("policy, max_num_batched_tokens", [("fcfs", None), ("priority", 16)],
                         ids=["fcfs", "priority-chunked"])
def test_concurrent_long_completions_all_finish_under_kv_pressure(tiny_model_dir, policy, max_num_batched_tokens):
    # 8 blocks of 16 tokens: two sequences of max_model_len at a time
    config = EngineArgs(model=str(tiny_model_dir), max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=8 * BLOCK_BYTES,
                        scheduling_policy=policy, max_num_batched_tokens=max_num_batched_tokens).create_config()
    engine = AsyncEngine(config)
    rng = random.Random(2)
    bodies = []
    for i in range(NUM_REQUESTS):
        # short prompts, long outputs: every running sequence grows by a block every 16 steps
        prompt = [rng.randint(3, 400) for _ in range(rng.randint(2, 12))]
        bodies.append({"prompt": prompt, "max_tokens": MAX_MODEL_LEN - len(prompt) - i % 3, "temperature": 0.0,
                       "ignore_eos": True, "priority": rng.randint(0, 3)})
    try:
        async def main():
            app = build_app(engine, ServerSettings())
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app",
                                         timeout=120) as http:
                responses = await asyncio.gather(*(http.post("/v1/completions", json=body) for body in bodies))
                return responses, (await http.get("/metrics")).text

        responses, metrics_text = asyncio.run(asyncio.wait_for(main(), 300))
    finally:
        engine.shutdown()
    for response, body in zip(responses, bodies):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == body["max_tokens"]
    num_preemptions = counter(metrics_text, "pagoda:num_preemptions_total")
    assert 0 < num_preemptions <= MAX_PREEMPTIONS_PER_REQUEST * NUM_REQUESTS
