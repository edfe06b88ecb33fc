"""Reading a request body (request_body.py) without a server: the nesting bound against a reference
depth on random JSON (strings full of brackets, quotes and backslashes), the content type, strict
JSON, and that all of it stays cheap on a 15 MB body."""
from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest

from pagoda.engine.entrypoints.openai import request_body
from pagoda.engine.entrypoints.openai.errors import APIError
from pagoda.engine.entrypoints.openai.request_body import MAX_JSON_DEPTH, nesting_depth_exceeds, parse_json_object


def reference_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(reference_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(reference_depth, value), default=0)
    return 0


KEY_STARTS = ["k", "[", "{", '"', "\\"]


def random_json(rng: random.Random, depth: int) -> Any:
    if depth == 0 or rng.random() < 0.25:
        return rng.choice(['[[{', '\\"]', 'a\\', '"', '}]"[', 7, None, 1.5, "plain"])
    if rng.random() < 0.5:
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(KEY_STARTS) + str(i): random_json(rng, depth - 1) for i in range(rng.randint(0, 3))}


@pytest.mark.parametrize("split_strings", [True, False], ids=["split at quotes", "regex"])
def test_nesting_depth_matches_the_parsed_depth(monkeypatch, split_strings):
    if not split_strings:   # force the many-quotes path
        monkeypatch.setattr(request_body, "_MAX_QUOTES_TO_SPLIT", 0)
    rng = random.Random(0)
    for _ in range(1500):
        value = random_json(rng, rng.randint(1, 10))
        body = json.dumps(value).encode()
        depth = reference_depth(value)
        for limit in (0, 1, 3, 6, 9):
            assert nesting_depth_exceeds(body, limit) == (depth > limit), (body, limit, depth)


@pytest.mark.parametrize("body", [
    b"[" * 5000 + b"]" * 5000,
    b'{"prompt": ' + b"[" * 100_000 + b"1" + b"]" * 100_000 + b"}",
    b'{"prompt": "x", "extra": ' + b'{"a": ' * 65 + b"1" + b"}" * 65 + b"}",
    b"[" * 1_000_000,                         # never closed
])
def test_deep_bodies_are_refused_before_parsing(body):
    with pytest.raises(APIError) as raised:
        parse_json_object(body)
    assert raised.value.status_code == 400 and f"deeper than {MAX_JSON_DEPTH}" in raised.value.message


def test_depth_at_the_limit_and_brackets_in_strings_are_fine():
    at_limit = b'{"a": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert parse_json_object(at_limit)["a"]
    assert parse_json_object(json.dumps({"prompt": "[" * 100_000 + '\\"{' * 1000}).encode())["prompt"]


@pytest.mark.parametrize("body, words", [
    (b'{"prompt": "\\ud800"}', ["surrogate"]),
    (b'{"prompt": "a\\udc00b"}', ["surrogate"]),
    (b'{"prompt": "\\ud800\\u0041"}', ["surrogate"]),
    (b'{"temperature": NaN}', ["NaN"]),
    (b'{"temperature": -Infinity}', ["Infinity"]),
    (b'{"prompt": "\xff\xfe"}', ["UTF-8"]),
    (b'{"n": ' + b"9" * 5000 + b"}", ["number"]),
    (b'{"prompt": "a\x00b"}', ["control character"]),
    (b"", ["JSON"]),
])
def test_invalid_json_is_a_400_naming_the_problem(body, words):
    with pytest.raises(APIError) as raised:
        parse_json_object(body)
    assert raised.value.status_code == 400 and "not valid JSON" in raised.value.message
    for word in words:
        assert word.lower() in raised.value.message.lower(), raised.value.message


def test_what_json_allows_is_kept():
    value = parse_json_object(b'{"prompt": "\\ud83d\\ude00 \\u0000 \\\\ud800", "n": 1, "seed": 18446744073709551616}')
    assert value == {"prompt": "\U0001F600 \x00 \\ud800", "n": 1, "seed": 2**64}


@pytest.mark.parametrize("content_type", [None, "", "application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/merge-patch+json"])
def test_json_content_types_are_accepted(content_type):
    assert parse_json_object(b'{"a": 1}', content_type) == {"a": 1}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/jsonx", "json"])
def test_other_content_types_are_a_400(content_type):
    with pytest.raises(APIError) as raised:
        parse_json_object(b'{"a": 1}', content_type)
    assert raised.value.status_code == 400 and "Content-Type" in raised.value.message
    assert content_type in raised.value.message


@pytest.mark.parametrize("body", [
    json.dumps({"prompt": "hello world " * 1_250_000}).encode(),                  # 15 MB of text
    json.dumps({"prompt": "[{" * 7_500_000}).encode(),                             # brackets in a string
])
def test_a_15_mb_body_is_read_in_well_under_a_second(body):
    started = time.perf_counter()
    parse_json_object(body, "application/json")
    assert time.perf_counter() - started < 1.0
