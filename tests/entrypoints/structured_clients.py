"""Helpers of the client tests of structured output and tool calling (test_structured_clients.py).

The schemas and tools the tests send, and the checks every output goes through: JSON text parsed and
validated against the schema it was constrained by, and streamed chat chunks assembled the way the
openai SDK assembles them (strings concatenated, `index` and `type` replaced), so that what a real
client would see is what gets checked.

Every schema is bounded (maxLength strings, maxItems arrays, ranged numbers, enums): the default model
is tiny, and the grammar guarantees a valid document only when generation ends on its own ("stop").
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import jsonschema

# -- schemas of response_format / guided_json --------------------------------------------------------
SCHEMAS: dict[str, dict[str, Any]] = {
    "nested_object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 16},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array_of_enums": {
        "type": "object",
        "properties": {
            "colors": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
                       "minItems": 2, "maxItems": 3},
        },
        "required": ["colors"],
        "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "rating": {"type": "number", "minimum": 0, "maximum": 5},
            "active": {"type": "boolean"},
        },
        "required": ["age", "rating", "active"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "order": {
                "type": "array", "minItems": 1, "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "product": {"type": "string", "maxLength": 12},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                    },
                    "required": ["product", "quantity"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["order"],
        "additionalProperties": False,
    },
    "enum_and_nullable": {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["ok", "warning", "error"]},
            "code": {"anyOf": [{"type": "integer", "minimum": 100, "maximum": 599}, {"type": "null"}]},
            "note": {"type": "string", "maxLength": 24},
        },
        "required": ["status", "code", "note"],
        "additionalProperties": False,
    },
}

SCHEMA_PROMPTS = {
    "nested_object": "Describe a person and their address as JSON.",
    "array_of_enums": "List two or three colors as JSON.",
    "bounded_numbers": "Describe a user's age, rating and whether they are active, as JSON.",
    "array_of_objects": "Write a small shopping order as JSON.",
    "enum_and_nullable": "Report the status of a web request as JSON.",
}


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def validated_json(text: Optional[str], schema: dict[str, Any]) -> Any:
    """`text` parsed as JSON and validated against `schema` (AssertionError naming the text otherwise)."""
    assert text is not None, "no content"
    try:
        value = json.loads(text)
    except ValueError as error:
        raise AssertionError(f"not JSON ({error}): {text!r}") from None
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=str)
    assert not errors, f"{text!r} breaks the schema: {errors[0].message}"
    return value


# -- tools ------------------------------------------------------------------------------------------
def tool(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOLS = [
    tool("get_weather", "The current weather of a city.", {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}),
    tool("get_time", "The current time in a time zone.", {
        "type": "object",
        "properties": {"timezone": {"type": "string", "enum": ["UTC", "Europe/Paris", "Asia/Tokyo"]}},
        "required": ["timezone"], "additionalProperties": False}),
    tool("search", "Searches the web.", {
        "type": "object",
        "properties": {"query": {"type": "string", "maxLength": 30},
                       "top_k": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["query", "top_k"], "additionalProperties": False}),
]
TOOL_PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def check_tool_call(name: Optional[str], arguments: Optional[str], declared: Iterable[str]) -> Any:
    """A call names a declared function and its arguments are JSON valid against its parameters."""
    assert name in set(declared), f"call to undeclared function {name!r}"
    return validated_json(arguments, TOOL_PARAMETERS[name])


# -- streamed chat, assembled as the openai SDK does ------------------------------------------------
@dataclass
class StreamedCall:
    id: Optional[str] = None
    type: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""
    deltas: int = 0
    ids_sent: int = 0                  # deltas that carried an id (OpenAI: the first one only)


@dataclass
class StreamedChoice:
    role: Optional[str] = None
    content: str = ""
    finish_reason: Optional[str] = None
    finish_reasons_sent: int = 0
    calls: dict[int, StreamedCall] = field(default_factory=dict)

    def ordered_calls(self) -> list[StreamedCall]:
        assert sorted(self.calls) == list(range(len(self.calls))), f"tool call indexes {sorted(self.calls)}"
        return [self.calls[index] for index in sorted(self.calls)]


def _concat(before: Optional[str], delta: Optional[str]) -> Optional[str]:
    # NOTE: the SDK concatenates every string field of a delta (only `index` and `type` are replaced),
    # so a server that repeated a call's id or name in later deltas would corrupt them on the client.
    if delta is None:
        return before
    return delta if before is None else before + delta


def assemble_chat_stream(chunks: Iterable[Any]) -> dict[int, StreamedChoice]:
    """The choices of a streamed chat completion, by index."""
    choices: dict[int, StreamedChoice] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            state = choices.setdefault(choice.index, StreamedChoice())
            delta = choice.delta
            state.role = delta.role or state.role
            state.content += delta.content or ""
            if choice.finish_reason is not None:
                state.finish_reason = choice.finish_reason
                state.finish_reasons_sent += 1
            for call_delta in delta.tool_calls or []:
                call = state.calls.setdefault(call_delta.index, StreamedCall())
                call.deltas += 1
                if call_delta.id:
                    call.ids_sent += 1
                    call.id = _concat(call.id, call_delta.id)
                call.type = call_delta.type or call.type
                if call_delta.function is not None:
                    call.name = _concat(call.name, call_delta.function.name)
                    call.arguments = _concat(call.arguments, call_delta.function.arguments) or ""
    return choices


CALL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
