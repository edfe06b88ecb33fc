"""The OpenAI-compatible API through the official `openai` client against a real server process."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .server_helpers import API_KEY, MODEL_NAME, metric, wait_for

PROMPT = "Once upon a time"
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


def tokenize(server, **body) -> list[int]:
    response = httpx.post(f"{server.url}/tokenize", json=body, headers=server.headers)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_models_health_version(client, main_server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].max_model_len == 8192
    assert httpx.get(f"{main_server.url}/health").status_code == 200
    assert httpx.get(f"{main_server.url}/version").json()["version"]


def test_completion_usage_and_stream_equals_non_stream(client, main_server):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, **GREEDY)
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.prompt_tokens == len(tokenize(main_server, prompt=PROMPT))
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completion_token_prompts_and_several_prompts(client, main_server):
    ids = tokenize(main_server, prompt=PROMPT)
    by_text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, **GREEDY)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    several = client.completions.create(model=MODEL_NAME, prompt=[ids, ids[:2]], max_tokens=6, n=2, **GREEDY)
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]
    texts = {c.index: c.text for c in several.choices}
    assert texts[0] == texts[1] == by_text.choices[0].text        # greedy: both samples agree
    assert several.usage.prompt_tokens == len(ids) + 2
    assert several.usage.completion_tokens == 4 * 6


def test_completion_n2_stream(client):
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, n=2, stream=True,
                                            temperature=1.0, seed=7, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    finishes = {choice.index: choice.finish_reason for c in chunks for choice in c.choices if choice.finish_reason}
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 10


def test_completion_logprobs_and_echo(client):
    result = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, logprobs=3, **GREEDY)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    for value, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert value <= 0.0 and 1 <= len(top) <= 3       # fewer when tokens decode to the same text
        assert max(top.values()) == pytest.approx(value, abs=1e-4)     # greedy: the sampled token is the best
    echoed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, echo=True, logprobs=1, **GREEDY)
    assert echoed.choices[0].text == PROMPT + result.choices[0].text
    prompt_len = result.usage.prompt_tokens
    assert len(echoed.choices[0].logprobs.tokens) == prompt_len + 4
    assert echoed.choices[0].logprobs.token_logprobs[0] is None


def test_stop_string(client):
    base = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, **GREEDY).choices[0].text
    visible = [i for i in range(1, len(base)) if base[i].isascii() and base[i].strip()]
    if not visible:
        pytest.skip(f"the tiny model's greedy text has no usable stop string: {base!r}")
    stop = base[visible[0]]
    cut = base[: base.index(stop)]
    result = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, stop=[stop], **GREEDY)
    assert result.choices[0].text == cut
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].model_extra["stop_reason"] == stop
    streamed = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, stop=stop,
                                              stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_seed_determinism(client):
    def sample(seed):
        return client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_chat_stream_equals_non_stream_and_usage(client, main_server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    full = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=10,
                                          **GREEDY)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 10
    chat_ids = tokenize(main_server, messages=messages)
    assert full.usage.prompt_tokens == len(chat_ids)

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_logprobs_n_stop_seed(client):
    messages = [{"role": "user", "content": "The quick brown fox"}]
    result = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, n=2, logprobs=True,
                                            top_logprobs=2, seed=3, temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in result.choices] == [0, 1]
    for choice in result.choices:
        content = choice.logprobs.content
        assert len(content) == 5
        assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0.0 for entry in content)
    again = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, n=2, seed=3,
                                           temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == [c.message.content for c in result.choices]
    base = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20, **GREEDY)
    text = base.choices[0].message.content
    visible = [i for i in range(1, len(text)) if text[i].isascii() and text[i].strip()]
    if visible:
        stop = text[visible[0]]
        stopped = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20, stop=[stop],
                                                 **GREEDY)
        assert stopped.choices[0].message.content == text[: text.index(stop)]
        assert stopped.choices[0].finish_reason == "stop"


def test_tokenize_detokenize_roundtrip(main_server):
    headers = main_server.headers
    tokens = httpx.post(f"{main_server.url}/tokenize", json={"prompt": "Hello world"}, headers=headers).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 8192
    text = httpx.post(f"{main_server.url}/detokenize", json={"tokens": tokens["tokens"]}, headers=headers).json()
    assert text["prompt"] == "Hello world"


def test_100_concurrent_streams_each_return_max_tokens(async_client_factory):
    max_tokens = 8

    async def one(client, index):
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=f"Request number {index}:", max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, temperature=0.8, seed=index, extra_body={"ignore_eos": True})
        usage, finish = None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
        return usage.completion_tokens, finish

    async def main():
        client = async_client_factory()
        try:
            return await asyncio.gather(*(one(client, i) for i in range(100)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert results == [(max_tokens, "length")] * 100


def test_client_disconnect_frees_the_request(client, main_server):
    before = main_server.metrics()
    aborted_before = metric(before, "pagoda:request_success_total", finished_reason="abort")
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4000, stream=True,
                                       logprobs=0, **GREEDY)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    running = main_server.metrics()
    assert metric(running, "pagoda:num_requests_running") == 1
    assert metric(running, "pagoda:kv_cache_usage_perc") > 0
    stream.close()
    start = time.monotonic()

    def idle() -> bool:
        values = main_server.metrics()
        return (metric(values, "pagoda:num_requests_running") == 0
                and metric(values, "pagoda:kv_cache_usage_perc") == 0
                and metric(values, "pagoda:request_success_total", finished_reason="abort") == aborted_before + 1)

    assert wait_for(idle, timeout_s=5.0), main_server.metrics()
    assert time.monotonic() - start < 2.0


def test_metrics_move_as_requests_run(client, main_server):
    before = main_server.metrics()
    client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=7, **GREEDY)
    after = main_server.metrics()

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("pagoda:generation_tokens_total") == 7
    assert delta("pagoda:prompt_tokens_total") + delta("pagoda:prefix_cache_hits_total") >= 1
    assert delta("pagoda:prefix_cache_queries_total") >= 1
    assert delta("pagoda:request_success_total", finished_reason="length") == 1
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"pagoda:{histogram}_count") == 1, histogram
    assert delta("pagoda:inter_token_latency_seconds_count") == 6
    assert metric(after, "pagoda:num_requests_waiting") == 0
    text = httpx.get(f"{main_server.url}/metrics").text
    for name in ("num_preemptions_total", "kv_cache_usage_perc", "num_requests_running"):
        assert f'pagoda:{name}{{model_name="{MODEL_NAME}"}}' in text


def test_api_key_required(main_server):
    import openai

    bad = openai.OpenAI(base_url=f"{main_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        bad.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    assert raised.value.status_code == 401
    for path in ("/v1/models", "/tokenize"):
        response = httpx.request("GET" if path == "/v1/models" else "POST", f"{main_server.url}{path}",
                                 json={"prompt": "x"})
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{main_server.url}/health").status_code == 200      # open
    assert httpx.get(f"{main_server.url}/metrics").status_code == 200     # open
    ok = httpx.get(f"{main_server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200
