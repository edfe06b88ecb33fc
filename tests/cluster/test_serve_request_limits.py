"""Hostile bodies and length errors through Ray Serve (proxy -> ingress -> replica and back): 400s
with the engine's own message and code, whichever process raised them. The tiny model's
max_model_len is 256; the app's body limit is 64 KiB."""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.timeout(300)

JSON = {"Content-Type": "application/json"}


def test_hostile_bodies_and_context_length_through_serve(serving_app):
    with serving_app.client() as http:
        deep = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": ' + b"[" * 20_000 + b"}",
                         headers=JSON)
        assert deep.status_code == 400 and "deeper than 64" in deep.json()["error"]["message"]
        lone = http.post("/v1/chat/completions", headers=JSON,
                         content=b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udc00"}]}')
        assert lone.status_code == 400 and "surrogate" in lone.json()["error"]["message"]

        # raised in the replica, pickled through Ray: the message and code survive
        too_long = http.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 200, "max_tokens": 100})
        assert too_long.status_code == 400, too_long.text
        error = too_long.json()["error"]
        assert error["code"] == "context_length_exceeded" and "ray::" not in error["message"]
        assert "you requested 300 tokens (200 in the messages, 100 in the completion)" in error["message"]

        # refused by its size in the ingress's chat path, before any template or tokenizer runs
        started = time.monotonic()
        chat = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": "Once upon a time " * 3500}]})
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "context_length_exceeded"
        assert time.monotonic() - started < 10
        assert http.get("/health").status_code == 200
