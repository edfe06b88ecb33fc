"""How the servers (HTTP and gRPC) listen and guard themselves, and how chat requests are rendered and
parsed; engine settings live in `EngineArgs`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


# the settings that shape chat requests: a Ray ingress takes them from its app config's `chat` section
CHAT_SETTINGS = ("chat_template", "trust_request_chat_template", "enable_auto_tool_choice", "tool_call_parser",
                 "reasoning_parser")


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
    # chat: the template (Jinja text) used instead of the tokenizer's; None = the tokenizer's own
    chat_template: Optional[str] = None
    # whether a request may bring its own chat_template (it is code the server runs: off by default)
    trust_request_chat_template: bool = False
    # tool_choice "auto" parses tool calls out of the output (with tool_call_parser, or the parser the
    # chat template points to)
    enable_auto_tool_choice: bool = False
    tool_call_parser: Optional[str] = None        # a name of the tool-parser registry (vLLM's names)
    reasoning_parser: Optional[str] = None        # a name of the reasoning-parser registry
    # the web console's page (`/`, `/console/*`) off; `GET /v1/cluster/status` stays (it is an API)
    disable_console: bool = False

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
        if self.chat_template is not None:
            _check_template_syntax(self.chat_template)
        # NOTE: the registries are imported only when a parser is named: they are not needed otherwise,
        # and a server's start-up time is mostly imports.
        if self.tool_call_parser is not None:
            from .openai.tool_parsers import get_tool_parser

            get_tool_parser(self.tool_call_parser)
        if self.reasoning_parser is not None:
            from .openai.reasoning import get_reasoning_parser

            get_reasoning_parser(self.reasoning_parser)


def _check_template_syntax(template: str) -> None:
    """A chat template that is not valid Jinja fails the start, not every chat request."""
    import jinja2

    if not template.strip():
        raise ValueError("chat_template must not be empty (leave it unset for the tokenizer's template)")
    try:
        # the loop-control extension, as transformers renders templates with it ({% break %})
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"chat_template is not a valid Jinja template: {error.message} "
                         f"(line {error.lineno})") from None
