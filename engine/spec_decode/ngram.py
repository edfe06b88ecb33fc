"""N-gram (prompt lookup) proposer: the request's own text predicts its continuation.

Copying is common (code edits, quoting the prompt, summaries, a model looping): if the last n tokens
appeared before in the prompt + output, the tokens that followed them then are good drafts now.

    tokens  ... a b c d e ... x a b c          suffix "a b c" (n = 3) matched earlier at "a b c"
    drafts                                     d e ... (up to K tokens that followed it)

For n from prompt_lookup_max down to prompt_lookup_min the longest matching suffix wins; among the
matches of that length, the one with the most continuation available (up to K), then the latest.
NOTE: preferring a full K continuation over the very latest match matters for loops: in "x x x x"
the latest earlier "x" is followed by one token only, an older one by K.

The scan is numpy over a per-request token buffer that grows as tokens arrive (no Python loop over
positions): the candidates are the earlier positions holding the last token, and each further
suffix token narrows them with one vectorised comparison.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .proposer import Proposer

if TYPE_CHECKING:
    from ..config import SpeculativeConfig
    from ..core.request import Request


class _TokenBuffer:
    """A request's prompt + output token ids as a growing int64 array (tokens are only ever appended)."""

    def __init__(self, request: "Request") -> None:
        self.request = request
        self.data = np.empty(max(64, 2 * request.num_tokens), dtype=np.int64)
        self.length = 0

    def sync(self) -> np.ndarray:
        request = self.request
        total = request.num_tokens
        if total > self.data.size:
            grown = np.empty(2 * total, dtype=np.int64)
            grown[:self.length] = self.data[:self.length]
            self.data = grown
        if self.length < total:
            self.data[self.length:total] = request.token_ids_slice(self.length, total)
            self.length = total
        return self.data[:total]


class NgramProposer(Proposer):
    def __init__(self, config: "SpeculativeConfig") -> None:
        super().__init__(config)
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self._buffers: dict[str, _TokenBuffer] = {}

    def propose(self, requests: list["Request"]) -> dict[str, list[int]]:
        buffers: dict[str, _TokenBuffer] = {}
        drafts: dict[str, list[int]] = {}
        for request in requests:
            buffer = self._buffers.get(request.request_id)
            if buffer is None or buffer.request is not request:
                buffer = _TokenBuffer(request)
            buffers[request.request_id] = buffer
            found = propose_from_tokens(buffer.sync(), self.min_n, self.max_n, self.num_speculative_tokens)
            if found:
                drafts[request.request_id] = found
        # NOTE: only the requests of this call are kept: a request that stops speculating (finished,
        # preempted, backed off) costs one rebuild if it comes back, and nothing leaks.
        self._buffers = buffers
        return drafts


def propose_from_tokens(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Drafts (at most k) continuing `tokens` by its longest earlier suffix match of min_n..max_n tokens."""
    length = tokens.size
    if length < 2 or k < 1:
        return []
    # candidates: end positions c < length - 1 of earlier occurrences of the last token
    ends = np.flatnonzero(tokens[:length - 1] == tokens[length - 1])
    if ends.size == 0:
        return []
    match_len = np.ones(ends.size, dtype=np.int64)
    alive = np.ones(ends.size, dtype=bool)
    for back in range(1, min(max_n, length - 1)):
        positions = ends - back
        alive &= positions >= 0
        if not alive.any():
            break
        alive[alive] = tokens[positions[alive]] == tokens[length - 1 - back]
        match_len += alive
    eligible = match_len >= min_n
    if not eligible.any():
        return []
    available = np.minimum(length - 1 - ends, k)
    # the longest match, then the most continuation (up to k), then the latest
    key = (match_len * (k + 1) + available) * length + ends
    best = int(np.argmax(np.where(eligible, key, -1)))
    start = int(ends[best]) + 1
    return tokens[start:start + int(available[best])].tolist()
