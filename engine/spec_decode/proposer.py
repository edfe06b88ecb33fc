"""The host-side proposer interface: draft tokens from what the engine core knows of a request.

A proposer is called once per speculating step, after the previous step's tokens are known, with
the requests that may speculate; it answers at most `num_speculative_tokens` drafts for each (none
for a request where it has no guess). It must be cheap next to a forward pass: it sits on the
step's critical path. A proposer that needs the target's hidden states or a model of its own runs on
the worker instead (see this package's docstring).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import SpeculativeConfig
    from ..core.request import Request


class Proposer(ABC):
    def __init__(self, config: "SpeculativeConfig") -> None:
        self.config = config
        self.num_speculative_tokens = config.num_speculative_tokens

    @abstractmethod
    def propose(self, requests: list["Request"]) -> dict[str, list[int]]:
        """request id -> draft token ids (at most num_speculative_tokens; requests without a guess
        may be left out). Reads each request's prompt and output token ids; changes nothing.
        What a proposer keeps per request it may drop for any request absent from a call."""
