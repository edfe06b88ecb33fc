"""Reading a request body: its content type, a bound on its nesting, then strict JSON.

Whatever goes wrong here is the client's fault: a 400 naming the problem, raised before anything
costly runs, so a hostile body never reaches a parser that could recurse, overflow or crash.

    Content-Type    absent, application/json or application/<x>+json (a charset is ignored: JSON is
                    UTF-8); anything else, e.g. curl's default form encoding, is refused
    nesting         at most MAX_JSON_DEPTH levels of arrays/objects, counted on the raw bytes
                    (C-speed passes over the body) before the parser runs
    JSON            RFC 8259, parsed by pydantic-core (Rust, no Python recursion): invalid UTF-8, an
                    unpaired UTF-16 surrogate escape ("\\ud800"), NaN/Infinity, raw control
                    characters and integers over 4300 digits are errors, never Python objects
                    that break later (a lone surrogate cannot be tokenized or even sent back)
    the value       must be a JSON object
"""
from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np
import pydantic_core

from .errors import bad_request

# OpenAI's requests nest a handful of levels (messages[].content[].image_url.url); tool schemas a
# few more. Deeper is hostile.
MAX_JSON_DEPTH = 64

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Up to this many quotes, strings are cut out by splitting at quotes (C-speed copies, whatever the
# strings' length); past it by one regex pass (C-speed per character, whatever their number).
_MAX_QUOTES_TO_SPLIT = 4096
# Bytes -> depth steps: "[" and "{" become +1, "]" and "}" -1 (as int8), everything else is dropped.
_DEPTH_STEPS = bytes(1 if b in b"[{" else 255 if b in b"]}" else 0 for b in range(256))
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_json_object(body: bytes, content_type: Optional[str] = None) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    check_content_type(content_type)
    if nesting_depth_exceeds(body, MAX_JSON_DEPTH):
        raise bad_request(f"the request body's JSON nests arrays and objects deeper than {MAX_JSON_DEPTH} levels "
                          "(the maximum nesting depth)")
    try:
        value = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as error:
        raise bad_request(f"the request body is not valid JSON: {_explain(error, body)}") from None
    if not isinstance(value, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {_json_type(value)}")
    return value


def check_content_type(content_type: Optional[str]) -> None:
    if content_type is None or not content_type.strip():
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json")):
        return
    shown = content_type if len(content_type) <= 80 else content_type[:80] + "..."
    raise bad_request(f"Content-Type must be application/json, got {shown!r}")


def nesting_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether some array/object in `body` lies more than `limit` levels deep (brackets inside
    strings do not count). O(len(body)) in C: byte counts, strings cut out, a cumulative sum."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False                          # the common case: too few brackets to nest that deep
    steps = _outside_strings(body).translate(_DEPTH_STEPS, _NOT_BRACKETS)
    if len(steps) <= limit:
        return False
    return int(np.cumsum(np.frombuffer(steps, dtype=np.int8), dtype=np.int32).max()) > limit


def _outside_strings(body: bytes) -> bytes:
    """`body` without its JSON strings. (An unterminated string may leave brackets behind: such a
    body is no JSON anyway, and a 400 either way.)"""
    if body.count(b'"') > _MAX_QUOTES_TO_SPLIT:
        return _STRING.sub(b"", body)
    parts = body.split(b'"')
    pieces = [parts[0]]
    inside = False
    for before, after in zip(parts, parts[1:]):
        # a quote inside a string is escaped when an odd number of backslashes precede it
        if not (inside and (len(before) - len(before.rstrip(b"\\"))) % 2 == 1):
            inside = not inside
        if not inside:
            pieces.append(after)
    return b"".join(pieces)


def _explain(error: ValueError, body: bytes) -> str:
    message = str(error)
    if ("surrogate" in message or "hex escape" in message) and _SURROGATE_ESCAPE.search(body):
        return f"a \\u escape is an unpaired UTF-16 surrogate, which is not a character ({message})"
    if "invalid unicode code point" in message:
        return f"its bytes are not valid UTF-8 ({message})"
    if message.startswith(("expected value", "invalid number")) and (b"NaN" in body or b"Infinity" in body):
        return f"{message} (NaN and Infinity are not JSON numbers)"
    return message


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}.get(type(value), "value")
