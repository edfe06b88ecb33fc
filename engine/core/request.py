"""A request as the scheduler sees it: token ids, progress counters and status.

Counters follow vLLM v1: `num_computed_tokens` tokens of `all_token_ids` have their KV in the cache;
`num_tokens - num_computed_tokens` still need a forward pass (the whole prompt at first, one token
per decode step, everything again after a preemption by recompute). A step verifying K drafts
(speculative decoding) counts them at schedule time too; verification takes back the rejected ones.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from ..sampling_params import SamplingParams

if TYPE_CHECKING:
    from ..structured_output.manager import RequestGrammar


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2      # EOS, a stop token or (reported by the output processor) a stop string
    FINISHED_LENGTH = 3       # max_tokens or max_model_len
    FINISHED_ABORTED = 4
    FINISHED_ERROR = 5        # could never run (e.g. larger than the whole KV cache)

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass
class SpeculationState:
    """A request's standing with speculative decoding (engine/spec_decode/controller.py): whether
    its drafts have been paying off, and the pause that follows when they have not."""

    acceptance: float = 1.0          # moving average of accepted / proposed drafts per speculating step
    num_observed: int = 0            # steps observed since it last (re)started speculating
    paused_until: int = 0            # the controller's step from which it may speculate again
    pause_steps: int = 0             # length of its last pause (0 = never paused)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_tokens: int                          # already clamped to max_model_len - prompt length
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0                        # lower runs first (vLLM's convention)
    arrival_seq: int = 0                     # tie-breaker: FCFS among equal priorities
    cache_salt: Optional[str] = None         # isolates prefix-cache hits (n-siblings share one salt)
    seed: Optional[int] = None               # the request's own sampling seed (None = shared generator)

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0             # advanced when a step is scheduled (its KV is being computed)
    num_pending_tokens: int = 0              # sampled by a step in flight, value not yet known here
    num_cached_tokens: int = -1              # prefix-cache hit length at first schedule (-1 = not yet)
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: Optional[int | str] = None
    error: Optional[str] = None
    block_hashes: list[int] = field(default_factory=list)   # chained hashes of full blocks, in order
    min_tokens_banned_ids: list[int] = field(default_factory=list)  # EOS/stop ids masked before min_tokens
    first_scheduled_time: Optional[float] = None
    grammar: Optional["RequestGrammar"] = None   # set by the engine core for structured output
    speculation: SpeculationState = field(default_factory=SpeculationState)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_id_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def finishes_with_pending(self, max_model_len: int) -> bool:
        """True when the tokens in flight already reach max_tokens / max_model_len: nothing more
        to schedule, the request ends once they arrive."""
        pending = self.num_pending_tokens
        return pending > 0 and (self.num_output_tokens + pending >= self.max_tokens
                                or self.num_tokens + pending >= max_model_len)

    @property
    def finish_reason(self) -> Optional[str]:
        return FINISH_REASONS.get(self.status)

    def check_stop(self, max_model_len: int) -> bool:
        """Sets a finished status after a token was appended; returns True when finished.

        min_tokens holds back EOS and stop tokens (not max_tokens).
        """
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= self.sampling_params.min_tokens:
            if not self.sampling_params.ignore_eos and last in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in self.sampling_params.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return True
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
