"""When to speculate, and what came of it: the engine core's side of speculative decoding.

Two switches, both cheap, both on the host:

- per step, by batch size: with measured step costs (`use_step_costs`, the default where the engine
  can time its graphs: step_costs.py), a step speculates only while the acceptance observed so far
  pays for what verifying costs at this batch size; otherwise once `disable_by_batch_size` requests
  run, the step runs without drafts. A larger batch makes a decode step compute-bound, where the
  rejected drafts' work is no longer free.
- per request, by acceptance: each speculating step of a request yields accepted / proposed
  drafts (0 when the proposer found nothing: it gained nothing and, under async scheduling, cost
  the step its overlap). A moving average (weight ACCEPTANCE_EMA_WEIGHT) below MIN_ACCEPTANCE
  after WARMUP_OBSERVATIONS steps pauses the request's speculation for a number of steps that
  doubles with each pause (FIRST_PAUSE_STEPS .. MAX_PAUSE_STEPS); then it retries with a fresh
  average. A warm-up that ends above the threshold resets the pause length.

`observe` also keeps the counters exported as vLLM's spec_decode metrics: verifications (drafts),
draft tokens, accepted tokens, and accepted tokens per draft position.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .draft_slots import DraftSlotsProposer
from .ngram import NgramProposer
from .proposer import Proposer
from .step_costs import ACCEPTED_EMA_WEIGHT, StepCosts, speculation_pays

if TYPE_CHECKING:
    from ..config import SpeculativeConfig
    from ..core.request import Request
    from ..step import ModelRunnerOutput, SchedulerOutput

ACCEPTANCE_EMA_WEIGHT = 0.25
MIN_ACCEPTANCE = 0.15
WARMUP_OBSERVATIONS = 8
FIRST_PAUSE_STEPS = 8
MAX_PAUSE_STEPS = 256


def build_proposer(config: "SpeculativeConfig") -> Proposer:
    if config.method == "ngram":
        return NgramProposer(config)
    if config.method == "draft_model":
        return DraftSlotsProposer(config)      # the worker makes the drafts (draft_model.py)
    raise ValueError(f"speculative_config.method {config.method!r} has no proposer")


class SpecDecodeController:
    def __init__(self, config: "SpeculativeConfig", max_model_len: int,
                 proposer: Optional[Proposer] = None) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = proposer if proposer is not None else build_proposer(config)
        self.step = 0                      # engine steps seen (pauses are counted in these)
        self.num_drafts = 0                # verifications: requests x steps that carried drafts
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_accepted_tokens_per_pos = [0] * config.num_speculative_tokens
        self.step_costs: Optional[StepCosts] = None
        # mean drafts accepted per verification (step_costs.py): every draft until observed
        self.accepted_per_verification = float(config.num_speculative_tokens)

    def use_step_costs(self, costs: Optional[StepCosts]) -> None:
        """The measured verify / decode costs (None: none measured): with them, and no
        disable_by_batch_size from the user, each step decides by step_costs.speculation_pays."""
        self.step_costs = costs if self.config.measured_cutoff else None

    # -- before a step --------------------------------------------------------------------------------
    def step_speculates(self, running: list["Request"]) -> bool:
        """Called once per engine step, before anything is drained or scheduled: may this step
        speculate? (Some running request could, and it pays at this batch size: measured, or below
        the limit.) Requests whose last step is still in flight count as if its token were known."""
        self.step += 1
        costs = self.step_costs
        limit = costs.max_batch + 1 if costs is not None else self.config.disable_by_batch_size
        if not running or (limit is not None and len(running) >= limit):
            return False
        if costs is None:
            return any(self._may_speculate(request, request.num_pending_tokens) for request in running)
        speculating = sum(self._may_speculate(request, request.num_pending_tokens) for request in running)
        return speculation_pays(costs, len(running), speculating, self.accepted_per_verification)

    def propose(self, running: list["Request"]) -> dict[str, list[int]]:
        """Drafts for this step's speculating requests (every token of theirs known on the host)."""
        candidates = [r for r in running if r.num_pending_tokens == 0 and self._may_speculate(r, 0)]
        if not candidates:
            return {}
        drafts = self.proposer.propose(candidates)
        for request in candidates:
            if not drafts.get(request.request_id):
                self._record(request, 0.0)        # an opportunity that gained nothing
        return drafts

    def _may_speculate(self, request: "Request", num_pending: int) -> bool:
        """Decoding (its prompt computed), unconstrained, not paused, with room for a draft."""
        if request.grammar is not None or request.speculation.paused_until > self.step:
            return False
        if request.num_computed_tokens < request.num_prompt_tokens:
            return False                          # still in prefill
        num_tokens = request.num_tokens + num_pending
        room = min(request.max_tokens - request.num_output_tokens - num_pending, self.max_model_len - num_tokens)
        return room >= 2                          # one draft and the target's own token

    # -- after a step --------------------------------------------------------------------------------
    def observe(self, scheduler_output: "SchedulerOutput", runner_output: "ModelRunnerOutput",
                requests: dict[str, "Request"]) -> None:
        """Counts the step's verifications and updates each speculating request's acceptance."""
        if not scheduler_output.num_spec_tokens:
            return
        verifications, accepted_in_step = 0, 0
        for item in scheduler_output.scheduled:
            if not item.num_spec_tokens:
                continue
            tokens = runner_output.spec_token_ids.get(item.request_id)
            if tokens is None:
                continue                          # finished or aborted while the step ran
            accepted = len(tokens) - 1
            verifications += 1
            accepted_in_step += accepted
            self.num_drafts += 1
            self.num_draft_tokens += item.num_spec_tokens
            self.num_accepted_tokens += accepted
            for position in range(accepted):
                self.num_accepted_tokens_per_pos[position] += 1
            request = requests.get(item.request_id)
            if request is not None:
                self._record(request, accepted / item.num_spec_tokens)
        if verifications:
            mean = accepted_in_step / verifications
            self.accepted_per_verification += ACCEPTED_EMA_WEIGHT * (mean - self.accepted_per_verification)

    def _record(self, request: "Request", acceptance: float) -> None:
        state = request.speculation
        state.acceptance += ACCEPTANCE_EMA_WEIGHT * (acceptance - state.acceptance)
        state.num_observed += 1
        if state.num_observed < WARMUP_OBSERVATIONS:
            return
        if state.acceptance >= MIN_ACCEPTANCE:
            if state.num_observed == WARMUP_OBSERVATIONS:
                state.pause_steps = 0             # it pays again: the next pause starts short
            return
        state.pause_steps = min(MAX_PAUSE_STEPS, 2 * state.pause_steps or FIRST_PAUSE_STEPS)
        state.paused_until = self.step + state.pause_steps + 1     # sits out the next pause_steps steps
        state.acceptance, state.num_observed = 1.0, 0
