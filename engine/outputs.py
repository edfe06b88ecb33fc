"""What the engine hands back.

`EngineCoreOutput` is the compact per-step record the core emits (token ids only, no text);
the output processor turns a stream of them into vLLM-shaped `RequestOutput`s with text.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

# token id -> logprob, for the sampled token plus the top-k alternatives at one position
LogprobsDict = dict[int, float]


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: Optional[list[LogprobsDict]] = None       # one dict per new token
    # (prompt index of the first entry, entries) for the prompt positions computed this step
    new_prompt_logprobs: Optional[tuple[int, list[Optional[LogprobsDict]]]] = None
    finish_reason: Optional[str] = None                      # stop | length | abort | error
    stop_reason: Optional[int | str] = None
    num_cached_tokens: int = 0
    error: Optional[str] = None
    first_scheduled_time: Optional[float] = None             # when the request first ran (queue time)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[list[dict[int, Logprob]]]
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None
    # what is new since the previous RequestOutput of this request (for streaming)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: Optional[list[dict[int, Logprob]]] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: Optional[RequestMetrics] = None
    error: Optional[str] = None


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output saying what `earlier` and then `later` said (two consecutive outputs of one request).

    For a consumer that fell behind: it gets one output with the deltas of both, instead of two
    (vLLM's output collector does the same). Cumulative fields come from `later`; each completion's
    deltas are `earlier`'s followed by `later`'s. Neither argument is modified.
    Invariant: `earlier` is not finished (nothing follows a finished output).
    """
    if earlier.request_id != later.request_id:
        raise ValueError(f"cannot merge outputs of different requests: {earlier.request_id!r}, {later.request_id!r}")
    if earlier.finished:
        raise ValueError(f"request {earlier.request_id!r}: nothing can follow its finished output")
    before = {completion.index: completion for completion in earlier.outputs}
    merged = []
    for completion in later.outputs:
        first = before.pop(completion.index, None)
        if first is None:
            merged.append(completion)
            continue
        logprobs = None
        if first.delta_logprobs is not None or completion.delta_logprobs is not None:
            logprobs = (first.delta_logprobs or []) + (completion.delta_logprobs or [])
        merged.append(replace(completion, delta_text=first.delta_text + completion.delta_text,
                              delta_token_ids=first.delta_token_ids + completion.delta_token_ids,
                              delta_logprobs=logprobs))
    merged.extend(before.values())             # a completion `later` did not mention keeps its news
    merged.sort(key=lambda completion: completion.index)
    return replace(later, outputs=merged)


@dataclass
class EngineStats:
    """A snapshot of the engine's counters (also what /metrics and the cluster router read)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0              # fraction of blocks referenced by live requests
    num_blocks: int = 0
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0            # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0               # of which found
    num_preemptions: int = 0
    prompt_tokens: int = 0                   # tokens of prompts computed (excluding cache hits)
    generation_tokens: int = 0
    num_steps: int = 0
    cached_prefix_hashes: list[int] = field(default_factory=list)
    # speculative decoding (vLLM's spec_decode counters; all 0 and [] when it is off):
    spec_decode_num_drafts: int = 0          # verifications: one per request and step that carried drafts
    spec_decode_num_draft_tokens: int = 0    # drafts verified
    spec_decode_num_accepted_tokens: int = 0     # of which accepted
    # per draft position j (0 .. K-1): how often the j-th draft was accepted
    spec_decode_num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
