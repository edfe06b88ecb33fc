"""Errors an engine client raises to its callers (the HTTP and gRPC servers, the cluster ingress).

Each names one situation a server maps to one status: a bad request is a plain `ValueError` (400,
INVALID_ARGUMENT); these are the others. They carry messages safe to show a client: no stack
traces, no file paths.
"""
from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine stopped after an internal error and can serve nothing more.

    during_request: True for a request that was in flight when the engine died (its generation
        failed: HTTP 500); False for a new request refused afterwards (HTTP 503).
    """

    def __init__(self, message: str = "the engine stopped after an internal error and can no longer serve requests",
                 during_request: bool = False) -> None:
        super().__init__(message)
        self.during_request = during_request


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (`max_queued_requests`): try again later (HTTP 503 + Retry-After)."""

    def __init__(self, num_queued: int, max_queued_requests: int, retry_after_s: int = 1) -> None:
        super().__init__(
            f"the server is overloaded: {num_queued} requests are already waiting "
            f"(max_queued_requests={max_queued_requests}); retry later")
        self.retry_after_s = retry_after_s


class EngineShuttingDownError(RuntimeError):
    """The server is shutting down: it takes no new requests, or it cut this one short (HTTP 503)."""

    def __init__(self, message: str = "the server is shutting down and accepts no new requests") -> None:
        super().__init__(message)


class ModelNotFoundError(LookupError):
    """A request named a model this server does not serve (HTTP 404)."""

    def __init__(self, requested: str, served: list[str]) -> None:
        super().__init__(f"model {requested!r} does not exist; this server serves {served}")
