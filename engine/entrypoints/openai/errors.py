"""Errors as OpenAI sends them: `{"error": {"message", "type", "param", "code"}}` with one status each.

    400 malformed JSON, a body that is not an object, wrong types, out-of-range values, prompts
        that do not fit max_model_len (every client mistake: never 422, never 500; see
        request_body.py for what a body may be)
    401 missing or wrong API key          404 unknown model or route
    413 body over the limit               503 queue full (+ Retry-After), shutting down, engine dead
    500 a real internal error: a fixed message; the traceback goes to the server log only
"""
from __future__ import annotations

import logging
import reprlib
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ...errors import EngineDeadError, EngineOverloadedError, EngineShuttingDownError, ModelNotFoundError
from ...processing.tokenizer import ContextLengthExceededError

logger = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "internal server error; the server log has the details"

# Values quoted in messages: a few elements and characters, however large the value (a full repr of
# a 15 MB prompt would cost as much as the request).
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 8
_SHORT.maxlevel = 3


def short_repr(value: Any) -> str:
    return _SHORT.repr(value)


class APIError(Exception):
    """An error with its HTTP status, ready to send."""

    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param)


def to_api_error(error: BaseException) -> APIError:
    """Maps any exception to the error a client sees (unknown ones become a bare 500, logged here)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValidationError):
        return validation_error(error.errors())
    if isinstance(error, ModelNotFoundError):
        return APIError(404, str(error), param="model", code="model_not_found")
    if isinstance(error, EngineOverloadedError):
        return APIError(503, str(error), type="server_overloaded", code="queue_full",
                        headers={"Retry-After": str(error.retry_after_s)})
    if isinstance(error, EngineShuttingDownError):
        return APIError(503, str(error), type="service_unavailable", code="shutting_down",
                        headers={"Retry-After": "5"})
    if isinstance(error, EngineDeadError):
        return APIError(500 if error.during_request else 503, str(error), type="server_error", code="engine_dead")
    if isinstance(error, ContextLengthExceededError):
        return APIError(400, str(error), code=error.code)
    if isinstance(error, ValueError):
        return bad_request(str(error))
    logger.error("internal error while serving a request", exc_info=error)
    return APIError(500, INTERNAL_ERROR_MESSAGE, type="server_error")


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first pydantic error as one readable sentence naming the field."""
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_union_tag(part)]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    elif first.get("type") != "missing" and "input" in first:
        message += f", got {short_repr(first['input'])}"
    return bad_request(f"{param}: {message}" if param else message, param=param)


def _is_union_tag(part: Any) -> bool:
    """pydantic names the union member that failed in the location ('stop', 'list[str]'); drop it."""
    return isinstance(part, str) and (
        "[" in part or "-" in part or part in ("str", "int", "float", "bool", "list", "dict", "none"))


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the OpenAI envelope; nothing leaves as FastAPI's 422 or a traceback."""

    async def on_api_error(request: Request, error: Exception) -> JSONResponse:
        return to_api_error(error).response()

    async def on_validation_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return validation_error(list(error.errors())).response()

    async def on_http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        status = error.status_code
        message = {404: f"no route {request.url.path!r}", 405: f"method {request.method} is not allowed here"}.get(
            status, str(error.detail))
        return APIError(status, message, type="invalid_request_error" if status < 500 else "server_error",
                        headers=dict(error.headers or {})).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_api_error)
