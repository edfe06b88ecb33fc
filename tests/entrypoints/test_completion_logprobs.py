"""Legacy completions' logprobs as OpenAI and vLLM give them: `logprobs=k` lists the k most likely
tokens plus the token actually there (up to k+1 entries), and `echo` with `max_tokens=0` returns the
prompt and its logprobs only (what lm-eval's loglikelihood requests send), streamed or not."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import httpx
import pytest

from pagoda.engine import EngineArgs
from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.entrypoints.openai.api_server import build_app
from pagoda.engine.entrypoints.settings import ServerSettings

PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = AsyncEngine(EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20).create_config())
    yield engine
    engine.shutdown()


def complete(engine: AsyncEngine, **body: Any) -> httpx.Response:
    async def main() -> httpx.Response:
        app = build_app(engine, ServerSettings())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            return await http.post("/v1/completions", json={"prompt": PROMPT, **body}, timeout=60)

    return asyncio.run(main())


def events(response: httpx.Response) -> list[Any]:
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", response.text
    return [json.loads(line) for line in lines[:-1]]


def check_entries(logprobs: dict[str, Any], k: int, first_is_none: bool = False) -> int:
    """Every position's top_logprobs holds its own token (with at least its logprob) and at most k+1
    entries; returns how many positions have k+1 (the token was not among the k most likely)."""
    with_extra = 0
    for position, (token, value, top) in enumerate(zip(logprobs["tokens"], logprobs["token_logprobs"],
                                                       logprobs["top_logprobs"])):
        if first_is_none and position == 0:
            assert value is None and top is None
            continue
        assert token in top and top[token] >= value - 1e-6, (token, value, top)
        assert 1 <= len(top) <= k + 1
        with_extra += len(top) == k + 1
    return with_extra


@pytest.mark.parametrize("stream", [False, True])
def test_top_logprobs_hold_the_sampled_token_too(engine, stream):
    # NOTE: a random tiny model is close to uniform: at temperature 2 the sampled token is almost never
    # the most likely one, so most positions must show 1 + 1 entries.
    response = complete(engine, max_tokens=16, temperature=2.0, seed=1, ignore_eos=True, logprobs=1, stream=stream)
    assert response.status_code == 200, response.text
    if stream:
        merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        for event in events(response):
            for choice in event["choices"]:
                for key in merged:
                    merged[key] += (choice["logprobs"] or {}).get(key, [])
        logprobs = merged
    else:
        logprobs = response.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 16
    assert check_entries(logprobs, k=1) >= 8


def test_logprobs_zero_gives_the_sampled_token_alone(engine):
    logprobs = complete(engine, max_tokens=6, temperature=1.0, seed=2, logprobs=0, ignore_eos=True).json()[
        "choices"][0]["logprobs"]
    assert [list(top) for top in logprobs["top_logprobs"]] == [[token] for token in logprobs["tokens"]]


def test_echo_with_max_tokens_zero_returns_the_prompt_and_its_logprobs_only(engine):
    result = complete(engine, echo=True, max_tokens=0, logprobs=2).json()
    choice, usage = result["choices"][0], result["usage"]
    assert choice["text"] == PROMPT
    assert choice["finish_reason"] == "length"
    assert usage["completion_tokens"] == 0 and usage["total_tokens"] == usage["prompt_tokens"]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == usage["prompt_tokens"] and "".join(logprobs["tokens"]) == PROMPT
    check_entries(logprobs, k=2, first_is_none=True)
    # the same numbers as the prompt part of an echo that generates
    generating = complete(engine, echo=True, max_tokens=3, logprobs=2, temperature=0).json()["choices"][0]["logprobs"]
    prompt_len = usage["prompt_tokens"]
    assert generating["token_logprobs"][:prompt_len] == pytest.approx(logprobs["token_logprobs"], abs=1e-5)
    assert generating["tokens"][:prompt_len] == logprobs["tokens"]
    assert len(generating["tokens"]) == prompt_len + 3
    # n choices, several prompts: every choice is its prompt alone
    several = complete(engine, prompt=["Hello world", PROMPT], echo=True, max_tokens=0, n=2).json()
    assert [c["text"] for c in several["choices"]] == ["Hello world"] * 2 + [PROMPT] * 2
    assert all(c["logprobs"] is None for c in several["choices"]) and several["usage"]["completion_tokens"] == 0


def test_echo_with_max_tokens_zero_streamed(engine):
    chunks = events(complete(engine, echo=True, max_tokens=0, logprobs=1, stream=True,
                             stream_options={"include_usage": True}))
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    assert "".join(choice["text"] for choice in choices) == PROMPT
    assert [choice["finish_reason"] for choice in choices if choice["finish_reason"]] == ["length"]
    tokens = [token for choice in choices for token in (choice["logprobs"] or {}).get("tokens", [])]
    usage = chunks[-1]["usage"]
    assert len(tokens) == usage["prompt_tokens"] and usage["completion_tokens"] == 0


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 0, "echo": False, "logprobs": 1}, "max_tokens"),
    ({"max_tokens": 0, "echo": True, "min_tokens": 2}, "min_tokens"),
    ({"max_tokens": -1, "echo": True}, "max_tokens"),
])
def test_max_tokens_zero_needs_echo(engine, body, param):
    response = complete(engine, **body)
    assert response.status_code == 400, response.text
    error: Optional[dict] = response.json()["error"]
    assert error["param"] == param and param in error["message"], error
