"""The host side of a worker-side proposer: it reserves the drafts' slots, the worker fills them.

With `method: "draft_model"` the drafts are made on the worker, inside the verifying step, right
before the target's forward pass (engine/spec_decode/draft_model.py). The engine core still decides
who speculates (the controller's gating, back-off and metrics) and the scheduler still schedules and
allocates 1 + K slots per speculating request, exactly as for n-gram drafts: this proposer answers K
placeholder drafts (token 0) per request, and the scheduler trims them to the room the request has
(max_tokens, max_model_len, the step's token budget). The runner overwrites the placeholders on the
device and verifies the real drafts; the host never sees the placeholders again.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .proposer import Proposer

if TYPE_CHECKING:
    from ..core.request import Request

# NOTE: any id >= 0 will do (a negative one marks an input the previous step sampled on the device)
PLACEHOLDER_TOKEN_ID = 0


class DraftSlotsProposer(Proposer):
    def propose(self, requests: list["Request"]) -> dict[str, list[int]]:
        drafts = [PLACEHOLDER_TOKEN_ID] * self.num_speculative_tokens
        return {request.request_id: drafts for request in requests}
