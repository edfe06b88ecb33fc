"""What travels between the ingress and the model replicas (Ray object payloads, no Ray imports).

    ingress                                             replica (LLMReplica)
    ReplicaRequest(prompt, params, id, RoutingHints) ─> AsyncEngine.generate
      router reads .hints (prefix hashes, session)
    OutputDecoder: rebuilds RequestOutput  <───────────  OutputEncoder: list[WireOutput] per stream item
                                                        (deltas only; several outputs coalesced)
    with the ingress's token channel (channels.py):
    ReplicaRequest(..., channel=ChannelRef) ──────────> the request's own call carries no tokens:
      Mailbox.put([(request id, seq, outputs), ...])  <─ every ready output for that ingress, per call
      <── LeaseEnd(replica, number of channel batches, final outputs) when it is done
    router reads ReplicaReport  <── controller ───────  record_routing_stats() every few seconds

Why deltas: a `RequestOutput` carries the cumulative token ids, logprobs and text of every
completion, so streaming one per token moves O(n^2) data through Ray. A `WireOutput` carries what is
new plus what the decoder cannot rebuild on its own, and the decoder reproduces the replica's
`RequestOutput`s exactly (tests/cluster/test_wire.py checks this field by field).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from pagoda.engine.generation_defaults import GenerationDefaults
from pagoda.engine.outputs import CompletionOutput, EngineStats, Logprob, RequestMetrics, RequestOutput
from pagoda.engine.sampling_params import SamplingParams

if TYPE_CHECKING:        # (the input processor imports the tokenizer side: transformers, torch)
    from pagoda.engine.processing.input_processor import PromptType


@dataclass
class RoutingHints:
    """What the router may use to pick a replica for one request (never needed for correctness)."""

    request_id: str
    prefix_hashes: list[int] = field(default_factory=list)   # chained hashes of the prompt's first full blocks
    session_id: Optional[str] = None                          # `x-session-id`: keep a conversation on one replica
    attempt: int = 0                                          # 1 = the retry after a replica failed


@dataclass
class ReplicaRequest:
    """One `generate` call on a replica: `AsyncEngine.generate`'s arguments plus routing hints."""

    prompt: PromptType
    params: SamplingParams
    request_id: str
    priority: int
    hints: RoutingHints
    # None: the outputs stream back over this call. Else the ingress's token channel (a
    # `channels.ChannelRef`): the outputs go to its mailbox and this call yields one `LeaseEnd`.
    channel: Optional[Any] = None


@dataclass
class LeaseEnd:
    """The one item of a channel-mode `generate` call: its request is done. The channel carried
    batches 0..num_batches-1 of it; `final` holds the last outputs (the finished one among them)."""

    replica_id: str
    num_batches: int
    final: list["WireOutput"]


@dataclass
class ModelInfo:
    """What the ingress learns once per model from a replica: no weights on the ingress node needed."""

    served_model_name: str
    max_model_len: int
    block_size: int
    enable_prefix_caching: bool
    tokenizer: Any                      # the Hugging Face tokenizer (pickled once), or None
    model_format: dict[str, Optional[str]] = field(default_factory=dict)   # EngineConfig.serving_format
    # the model's sampling defaults: the ingress merges them under each request's own fields
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)


@dataclass
class ReplicaReport:
    """A replica's state as routers and `pagoda status` see it (the `record_routing_stats` payload).

    Plain fields only: the controller stores it and broadcasts it to every router of the deployment.
    """

    replica_id: str
    model_name: str
    stats: EngineStats                   # cached_prefix_hashes emptied: they travel as prefix_hashes
    prefix_hashes: list[int]
    healthy: bool
    metrics: bytes                       # the replica's Prometheus exposition (pagoda: metrics)
    reported_at: float                   # time.time() on the replica
    # the replica's entry of the console's status document (`ReplicaStatus.to_dict()`: its counters
    # and last-minute latencies); None from a replica that does not send one
    console: Optional[dict[str, Any]] = None

    @property
    def load(self) -> int:
        return self.stats.num_waiting + self.stats.num_running

    def to_routing_stats(self) -> dict[str, Any]:
        """Builtins only: the Serve controller unpickles it and need not import pagoda."""
        stats = {name: getattr(self.stats, name) for name in _STAT_FIELDS}
        return {_REPORT_KEY: 1, "replica_id": self.replica_id, "model_name": self.model_name, "stats": stats,
                "prefix_hashes": list(self.prefix_hashes), "healthy": self.healthy, "metrics": self.metrics,
                "reported_at": self.reported_at, "console": self.console}

    @classmethod
    def from_routing_stats(cls, routing_stats: Optional[dict[str, Any]]) -> Optional["ReplicaReport"]:
        """The report in a replica's routing stats; None before its first report."""
        if not routing_stats or _REPORT_KEY not in routing_stats:
            return None
        stats = EngineStats(**{name: value for name, value in routing_stats["stats"].items() if name in _STAT_FIELDS})
        return cls(replica_id=routing_stats["replica_id"], model_name=routing_stats["model_name"], stats=stats,
                   prefix_hashes=list(routing_stats["prefix_hashes"]), healthy=routing_stats["healthy"],
                   metrics=routing_stats["metrics"], reported_at=routing_stats["reported_at"],
                   console=routing_stats.get("console"))

    @property
    def prefix_cache_hit_rate(self) -> float:
        queries = self.stats.prefix_cache_queries
        return self.stats.prefix_cache_hits / queries if queries else 0.0


_REPORT_KEY = "pagoda_report"
_STAT_FIELDS = tuple(name for name in EngineStats.__dataclass_fields__ if name != "cached_prefix_hashes")


# -- stream encoding --------------------------------------------------------------------------------
@dataclass
class WireCompletion:
    index: int
    delta_text: str
    delta_token_ids: list[int]
    delta_logprobs: Optional[list[dict[int, Logprob]]]
    cumulative_logprob: Optional[float]
    finish_reason: Optional[str]
    stop_reason: Optional[int | str]
    text: Optional[str] = None           # only when it is not previous text + delta_text
    token_ids: Optional[list[int]] = None            # only when not previous + delta (never, today)
    logprobs: Optional[list[dict[int, Logprob]]] = None
    has_logprobs: bool = False           # whether the cumulative logprobs list exists at all


@dataclass
class WireOutput:
    request_id: str
    finished: bool
    completions: list[WireCompletion]
    num_cached_tokens: int = 0
    metrics: Optional[RequestMetrics] = None
    error: Optional[str] = None
    prompt: Optional[str] = None                      # first output only
    prompt_token_ids: Optional[list[int]] = None      # first output only
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None   # when it grew
    has_prompt_logprobs: bool = False


@dataclass
class _Sent:
    text: str = ""
    num_tokens: int = 0
    num_logprobs: int = 0


class OutputEncoder:
    """Replica side, one per request: turns each `RequestOutput` into a `WireOutput`."""

    def __init__(self) -> None:
        self._first = True
        self._num_prompt_logprobs = 0
        self._sent: dict[int, _Sent] = {}

    def encode(self, output: RequestOutput) -> WireOutput:
        wire = WireOutput(request_id=output.request_id, finished=output.finished, completions=[],
                          num_cached_tokens=output.num_cached_tokens, metrics=output.metrics, error=output.error,
                          has_prompt_logprobs=output.prompt_logprobs is not None)
        if self._first:
            wire.prompt, wire.prompt_token_ids = output.prompt, output.prompt_token_ids
            self._first = False
        if output.prompt_logprobs is not None and len(output.prompt_logprobs) != self._num_prompt_logprobs:
            wire.prompt_logprobs = list(output.prompt_logprobs)
            self._num_prompt_logprobs = len(output.prompt_logprobs)
        for completion in output.outputs:
            sent = self._sent.setdefault(completion.index, _Sent())
            entry = WireCompletion(
                index=completion.index, delta_text=completion.delta_text,
                delta_token_ids=list(completion.delta_token_ids), delta_logprobs=completion.delta_logprobs,
                cumulative_logprob=completion.cumulative_logprob, finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason, has_logprobs=completion.logprobs is not None)
            # NOTE: the detokenizer may hold back text (a possible stop string) and send it later, or
            # drop it at the end: only send the full text when appending the delta does not rebuild it.
            if completion.text != sent.text + completion.delta_text:
                entry.text = completion.text
            num_tokens = len(completion.token_ids)
            if num_tokens != sent.num_tokens + len(completion.delta_token_ids) or \
                    completion.token_ids[sent.num_tokens:] != completion.delta_token_ids:
                entry.token_ids = list(completion.token_ids)
            if completion.logprobs is not None:
                num_logprobs = len(completion.logprobs)
                if num_logprobs != sent.num_logprobs + len(completion.delta_logprobs or []):
                    entry.logprobs = list(completion.logprobs)
                sent.num_logprobs = num_logprobs
            sent.text, sent.num_tokens = completion.text, num_tokens
            wire.completions.append(entry)
        return wire


@dataclass
class _Received:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)


class OutputDecoder:
    """Ingress side, one per request attempt: rebuilds the replica's `RequestOutput`s in order."""

    def __init__(self) -> None:
        self._prompt: Optional[str] = None
        self._prompt_token_ids: list[int] = []
        self._prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
        self._received: dict[int, _Received] = {}

    def decode(self, wire: WireOutput) -> RequestOutput:
        if wire.prompt_token_ids is not None:
            self._prompt, self._prompt_token_ids = wire.prompt, wire.prompt_token_ids
        if wire.prompt_logprobs is not None:
            self._prompt_logprobs = wire.prompt_logprobs
        elif wire.has_prompt_logprobs and self._prompt_logprobs is None:
            self._prompt_logprobs = []
        outputs = []
        for entry in wire.completions:
            received = self._received.setdefault(entry.index, _Received())
            received.text = entry.text if entry.text is not None else received.text + entry.delta_text
            if entry.token_ids is not None:
                received.token_ids = list(entry.token_ids)
            else:
                received.token_ids = received.token_ids + entry.delta_token_ids
            if entry.logprobs is not None:
                received.logprobs = list(entry.logprobs)
            elif entry.delta_logprobs:
                received.logprobs = received.logprobs + entry.delta_logprobs
            outputs.append(CompletionOutput(
                index=entry.index, text=received.text, token_ids=received.token_ids,
                cumulative_logprob=entry.cumulative_logprob,
                logprobs=received.logprobs if entry.has_logprobs else None,
                finish_reason=entry.finish_reason, stop_reason=entry.stop_reason, delta_text=entry.delta_text,
                delta_token_ids=entry.delta_token_ids, delta_logprobs=entry.delta_logprobs))
        return RequestOutput(
            request_id=wire.request_id, prompt=self._prompt, prompt_token_ids=self._prompt_token_ids,
            prompt_logprobs=self._prompt_logprobs if wire.has_prompt_logprobs else None, outputs=outputs,
            finished=wire.finished, num_cached_tokens=wire.num_cached_tokens, metrics=wire.metrics,
            error=wire.error)
