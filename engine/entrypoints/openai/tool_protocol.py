"""OpenAI's tool-calling wire format: the tools a request declares, the calls a response carries.

Request side (strict, like every request model): `tools` is a list of `ChatTool`, `tool_choice` is
"none" | "auto" | "required" | a `NamedToolChoice`. Response side: `message.tool_calls` holds
`ToolCall`s; a stream sends `DeltaToolCall`s that the openai SDK assembles by `index` (the first
delta of a call carries its id, type and name; `arguments` grows by concatenation).
"""
from __future__ import annotations

import re
import secrets
import string
from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from .protocol import _Request, _Response

_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    """'call_' + 24 random alphanumerics, as OpenAI's ids look."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def check_function_name(name: str) -> str:
    if not _FUNCTION_NAME.fullmatch(name):
        raise ValueError(f"function names must match ^[a-zA-Z0-9_-]{{1,64}}$, got {name[:80]!r}")
    return name


# -- request ----------------------------------------------------------------------------------------
class FunctionDefinition(_Request):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None        # a JSON schema of the arguments object
    strict: Optional[bool] = None

    _check_name = field_validator("name")(classmethod(lambda cls, value: check_function_name(value)))


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


# -- response ---------------------------------------------------------------------------------------
class FunctionCall(_Response):
    name: str
    arguments: str                                     # JSON text of the arguments object


class ToolCall(_Response):
    id: str = Field(default_factory=new_tool_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(_Response):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(_Response):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None
