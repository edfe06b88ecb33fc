"""The compact step descriptor the scheduler hands to the executor (and, under tensor
parallelism, that rank 0 sends to every worker). Plain data: no tensors, no references to
scheduler state, so it pickles small and the workers never reach into the scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """First schedule of a request (or its resumption after a preemption)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]          # tokens generated before a preemption (for penalties)
    sampling_params: SamplingParams
    seed: Optional[int]                  # the request's own seed; None = the engine's shared generator
    min_tokens_banned_ids: list[int]     # EOS / stop tokens masked until min_tokens are out


@dataclass
class ScheduledRequest:
    request_id: str
    token_ids: list[int]                 # the tokens whose KV this step computes
    num_computed_tokens: int             # tokens already in the cache before this step
    new_block_ids: list[int]             # appended to the request's block table
    sample: bool                         # this step reaches the end of the sequence: sample a token
    # speculative decoding: the last num_spec_tokens of token_ids are drafts (unverified), each
    # position sampled and compared; 0 = a plain step for this request
    num_spec_tokens: int = 0


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # requests whose per-request state the workers drop (finished, aborted or preempted)
    finished_request_ids: list[str] = field(default_factory=list)
    num_scheduled_tokens: int = 0
    # requests with a grammar that sample this step: the runner waits for their bitmask
    # (`GrammarOutput`, sent with `sample_tokens`) before it samples; empty = sample at once
    structured_request_ids: list[str] = field(default_factory=list)
    num_spec_tokens: int = 0             # drafts over all requests (0: nothing to verify)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class GrammarOutput:
    """The token bitmask of one step's constrained rows, filled by the engine core while the
    forward pass runs; the driver rank applies it to the logits before sampling."""

    request_ids: list[str]               # = SchedulerOutput.structured_request_ids
    bitmask: np.ndarray                  # (len(request_ids), ceil(vocab / 32)) int32; bit j of word w allows 32w + j


@dataclass
class ModelRunnerOutput:
    """Rank 0's answer for one step: one entry per request that sampled."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)
    # a request that verified drafts (num_spec_tokens > 0) answers here instead: the accepted drafts
    # then the target's own next token (1 to 1 + num_spec_tokens ids), and their logprobs if asked
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    spec_logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)
    # request id -> (prompt index of the first entry, entries); entry i predicted prompt token i
    prompt_logprobs: dict[str, tuple[int, list[Optional[dict[int, float]]]]] = field(default_factory=dict)


class StepHandle:
    """A launched step whose output may not be on the host yet; `result()` waits for it (once)."""

    def __init__(self, resolve: Callable[[], ModelRunnerOutput]) -> None:
        self._resolve: Optional[Callable[[], ModelRunnerOutput]] = resolve
        self._output: Optional[ModelRunnerOutput] = None

    @classmethod
    def done(cls, output: ModelRunnerOutput) -> "StepHandle":
        handle = cls(lambda: output)
        handle.result()
        return handle

    def result(self) -> ModelRunnerOutput:
        if self._resolve is not None:
            self._output, self._resolve = self._resolve(), None
        assert self._output is not None
        return self._output
