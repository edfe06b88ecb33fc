"""How the servers (HTTP and gRPC) listen and guard themselves; engine settings live in `EngineArgs`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ServerSettings:
    """How the servers listen and guard themselves (engine settings live in `EngineArgs`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None                 # None = no authentication
    allowed_origins: list[str] = field(default_factory=list)   # CORS; empty = CORS off
    max_request_body_bytes: int = 16 * 1024 * 1024
    shutdown_timeout_s: float = 30.0              # how long SIGTERM lets in-flight requests finish
    grpc_port: Optional[int] = None               # None = no gRPC server
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        if self.grpc_port is not None and (not isinstance(self.grpc_port, int) or not 0 <= self.grpc_port <= 65535):
            raise ValueError(f"grpc_port must be in [0, 65535], got {self.grpc_port!r}")
        if not isinstance(self.max_request_body_bytes, int) or self.max_request_body_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be a positive integer, got {self.max_request_body_bytes!r}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset for no authentication)")
