"""Routing on a real local Ray cluster: replicas share the work, prefixes stick to the replica that
caches them, sessions stick, models route by name, and a TP=2 replica (Ray actors, gloo) matches TP=1.

Which replica served what is read from the replicas' own stats (`pagoda status` rows), diffed around
each test's requests.
"""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(300)

BLOCK_SIZE = 16


def _token_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(length)]


def _complete(app, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    with app.client() as http:
        response = http.post("/v1/completions", json={"max_tokens": 4, "temperature": 0, **body}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def _settled_counters(app, model: str, field: str, before: dict[str, dict], expected_total: int) -> dict[str, int]:
    """Per-replica growth of a stats counter, once the reports add up to `expected_total`."""
    def deltas() -> dict[str, int] | None:
        now = app.replicas(model)
        growth = {replica: row[field] - before.get(replica, {}).get(field, 0) for replica, row in now.items()}
        return growth if sum(growth.values()) >= expected_total else None

    return app.wait_for(deltas, 30, f"{model} replicas to report {expected_total} {field}")


def test_two_replicas_both_take_work(serving_app):
    before = serving_app.replicas("tiny")
    assert len(before) == 2
    prompts = [_token_prompt(seed, 24) for seed in range(16)]      # no shared prefix: power of two choices
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: _complete(serving_app, {"model": "tiny", "prompt": p, "max_tokens": 8}), prompts))
    growth = _settled_counters(serving_app, "tiny", "prompt_tokens", before, 16 * 24)
    assert all(tokens > 0 for tokens in growth.values()), growth


def test_a_shared_prefix_lands_on_the_replica_that_cached_it(serving_app):
    prefix = _token_prompt(1000, 8 * BLOCK_SIZE)                   # 8 full blocks
    before = serving_app.replicas("tiny")
    _complete(serving_app, {"model": "tiny", "prompt": prefix + _token_prompt(1, 5)})
    growth = _settled_counters(serving_app, "tiny", "prompt_tokens", before, len(prefix) + 5)
    [owner] = [replica for replica, tokens in growth.items() if tokens > 0]

    before = serving_app.replicas("tiny")
    followers = [prefix + _token_prompt(seed, 7) for seed in range(2, 8)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda p: _complete(serving_app, {"model": "tiny", "prompt": p}), followers))
    hits = _settled_counters(serving_app, "tiny", "prefix_cache_hits", before, len(followers) * len(prefix))
    assert hits[owner] >= len(followers) * len(prefix), hits
    assert all(count == 0 for replica, count in hits.items() if replica != owner), hits


def test_a_session_stays_on_one_replica(serving_app):
    before = serving_app.replicas("tiny")
    prompts = [_token_prompt(seed, 10) for seed in range(200, 208)]   # unrelated prompts, one session
    for prompt in prompts:
        _complete(serving_app, {"model": "tiny", "prompt": prompt}, headers={"x-session-id": "chat-42"})
    growth = _settled_counters(serving_app, "tiny", "prompt_tokens", before, 8 * 10)
    # every prompt token on one replica (a status snapshot may lack an idle replica's row)
    assert max(growth.values()) == sum(growth.values()) == 8 * 10, growth


def test_two_models_in_one_app_route_by_model(serving_app):
    before = {model: serving_app.replicas(model) for model in ("tiny", "tiny-tp2")}
    assert _complete(serving_app, {"model": "tiny-tp2", "prompt": _token_prompt(7, 9)})["model"] == "tiny-tp2"
    assert _complete(serving_app, {"model": "tiny", "prompt": _token_prompt(8, 11)})["model"] == "tiny"
    assert sum(_settled_counters(serving_app, "tiny-tp2", "prompt_tokens", before["tiny-tp2"], 9).values()) == 9
    assert sum(_settled_counters(serving_app, "tiny", "prompt_tokens", before["tiny"], 11).values()) == 11
    with serving_app.client() as http:
        models = http.get("/v1/models").json()
        assert [card["id"] for card in models["data"]] == ["tiny", "tiny-tp2", "tiny-auto"]
        response = http.post("/v1/completions", json={"model": "tiny-7b", "prompt": "x"})
        assert response.status_code == 404 and "tiny-tp2" in response.json()["error"]["message"]


def test_tensor_parallel_replica_matches_tp1_greedy(serving_app):
    prompts = ["Once upon a time", "The quick brown fox jumps over the lazy dog.", _token_prompt(5, 40)]
    for prompt in prompts:
        body = {"prompt": prompt, "max_tokens": 16, "ignore_eos": True, "logprobs": 0}
        tp1 = _complete(serving_app, {**body, "model": "tiny"})["choices"][0]
        tp2 = _complete(serving_app, {**body, "model": "tiny-tp2"})["choices"][0]
        assert tp2["logprobs"]["tokens"] == tp1["logprobs"]["tokens"]
        assert tp2["text"] == tp1["text"]
        assert tp2["logprobs"]["token_logprobs"] == pytest.approx(tp1["logprobs"]["token_logprobs"], abs=1e-3)
