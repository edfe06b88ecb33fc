"""The engine client: everything the HTTP and gRPC servers need from an engine, and nothing more.

`AsyncEngine` implements it in one process. The cluster ingress implements it by forwarding to Ray
replicas, and reuses the servers (`build_app`, the gRPC servicer) unchanged. Requests arrive as
`SamplingParams` plus a prompt (text or token ids); results come back as a stream of
`RequestOutput`s whose completions carry both cumulative text/tokens and per-output deltas.

Errors: `ValueError` (bad request, message names the value), `EngineOverloadedError` (queue full),
`EngineShuttingDownError`, `EngineDeadError`, `ModelNotFoundError` (see `errors.py`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, Optional, Protocol, runtime_checkable

from .errors import ModelNotFoundError
from .generation_defaults import GenerationDefaults
from .outputs import EngineStats, RequestOutput
from .sampling_params import SamplingParams

if TYPE_CHECKING:     # (the input processor imports the tokenizer side: transformers, torch)
    from .processing.input_processor import PromptType


@runtime_checkable
class EngineClient(Protocol):
    @property
    def model_names(self) -> list[str]:
        """Names a request's `model` may use; the first is the one reported by /v1/models first."""

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (chat template, /tokenize, logprob token strings)."""

    @property
    def max_model_len(self) -> int:
        """Prompt + output tokens one sequence may hold."""

    @property
    def model_format(self) -> dict[str, Optional[str]]:
        """The weights' quantization and the KV cache's element type (EngineConfig.serving_format);
        empty when not known (a cluster model none of whose replicas answered yet)."""

    @property
    def generation_defaults(self) -> GenerationDefaults:
        """The model's sampling defaults, which requests that leave a field unset take
        (engine/generation_defaults.py); empty when not known."""

    def generate(self, prompt: PromptType, params: SamplingParams, request_id: str,
                 priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs, the last with `finished=True`.

        Validation and admission errors raise on the first iteration, before any output. Closing
        the iterator early (or cancelling its consumer) aborts the request and frees its blocks.
        """

    async def abort(self, request_id: str) -> None:
        """Finishes the request now: its stream ends with finish_reason 'abort'. Unknown ids are ignored."""

    async def get_stats(self) -> EngineStats: ...

    async def is_healthy(self) -> bool:
        """False once the engine died (a step raised, a worker is gone)."""

    async def render_metrics(self) -> bytes:
        """Prometheus text exposition (`pagoda:` metrics labelled with model_name)."""


def resolve_model_name(client: EngineClient, requested: Optional[str]) -> str:
    """The served name a request's `model` field resolves to (None or '' = the default model)."""
    names = client.model_names
    if not requested:
        return names[0]
    if requested not in names:
        raise ModelNotFoundError(requested, names)
    return requested
