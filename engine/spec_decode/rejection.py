"""Verifying drafts against the target model's distribution, exactly.

Two rules, one result: the tokens emitted are distributed as if the target had sampled them one
by one.

`accepted_prefix` (what the engine runs for n-gram drafts): the target's own sample at each draft
position (the sampler's full pipeline and the request's seed stream, as a plain step) is compared
with the draft; drafts are accepted while they match, and the first mismatch emits the target's
sample. With a point-mass draft q = one-hot(d) that is the rejection rule below: the exponential
race picks d with probability p(d), and given it did not, picks v != d with p(v) / (1 - p(d)).

`rejection_sample` (for drafts that come with a distribution q, e.g. from a draft model): accept d
with probability min(1, p(d) / q(d)); on rejection draw from max(p - q, 0), renormalised. With q a
point mass it reduces to: accept with p(d), else draw from p with d removed, renormalised.
"""
from __future__ import annotations

from typing import Optional

import torch


def accepted_prefix(drafts: list[int], target: list[int]) -> int:
    """How many leading drafts the target's samples confirm (target has one more entry: the token
    that follows the last accepted draft)."""
    accepted = 0
    for draft, token in zip(drafts, target):
        if draft != token:
            break
        accepted += 1
    return accepted


def rejection_sample(target_probs: torch.Tensor, draft_token_ids: torch.Tensor,
                     draft_probs: Optional[torch.Tensor], uniform: torch.Tensor,
                     noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decision per draft position (rows are independent; the caller stops at a request's
    first rejection and then emits that row's recovered token).

    target_probs (R, V): p at each draft's position, after all of the sampler's processing
    draft_token_ids (R,) int64; draft_probs (R, V) the distribution each draft was drawn from, or
    None for a point mass (an n-gram draft); uniform (R,) in [0, 1); noise (R, V) ~ Exp(1).
    Returns (accepted (R,) bool, recovered (R,) int64: the token to emit where the draft is rejected).
    """
    index = draft_token_ids[:, None]
    p_draft = target_probs.gather(1, index).squeeze(1)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
        residual = target_probs.scatter(1, index, 0.0)
    else:
        q_draft = draft_probs.gather(1, index).squeeze(1)
        residual = (target_probs - draft_probs).clamp_min(0.0)
    accepted = uniform * q_draft < p_draft              # u < p(d) / q(d), without dividing by q(d)
    # NOTE: the residual is all zeros only where p <= q everywhere, i.e. p == q: then every draft is
    # accepted and the recovered token (argmax of zeros: token 0) is never used.
    recovered = (residual / noise).argmax(dim=-1)       # the exponential race draws from residual / sum
    return accepted, recovered
