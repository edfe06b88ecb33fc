"""Turns the logits of the sampling rows into next tokens (and logprobs), all on the logits' device.

Order of operations (as in vLLM): raw logprobs for reporting -> logit_bias, min_tokens ban,
penalties -> grammar mask -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> sample.

Sampling uses the "exponential race" `argmax(p / q), q ~ Exp(1)`, equivalent to drawing from p.
A row with its own seed draws q from a generator seeded by (seed, output position), so its tokens
do not depend on what else is in the batch, nor on preemptions; other rows share one generator.

Speculative decoding samples one row per draft position (engine/spec_decode): each row is a
position of its own here, with its own output position and output ids; `target_probs` gives the
processed distribution for rejection sampling against a draft distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from pagoda.kernels.token_bitmask import apply_token_bitmask_


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row (one request that samples this step)."""

    temperature: float
    top_k: int                                   # 0 = off
    top_p: float
    min_p: float
    seed: Optional[int]
    num_output_tokens: int                       # position of the token being sampled
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    prompt_token_ids: Optional[list[int]] = None     # given only when penalties are on
    output_token_ids: Optional[list[int]] = None
    logit_bias: Optional[dict[int, float]] = None
    banned_token_ids: list[int] = field(default_factory=list)   # min_tokens not reached yet
    num_logprobs: Optional[int] = None


@dataclass
class TokenMask:
    """Grammar bitmasks for some rows: tokens outside them are never sampled."""

    bitmask: torch.Tensor          # (R, ceil(V / 32)) int32 on the logits' device
    rows: torch.Tensor             # (R,) int64: the sampling row each bitmask row constrains


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Optional[dict[int, float]]]


def _seeded_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + position) % (2**63 - 1))
    return generator


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.shared_generator = torch.Generator(device=device)
        self.shared_generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        sampled, raw_logprobs = self.sample(logits, rows)
        return self.to_output(sampled, raw_logprobs, rows)

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow],
               mask: Optional[TokenMask] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Device work only (no host sync): (sampled token ids (S,), raw logprobs (S, V) or None)."""
        # logits: (S, V) float32
        want_logprobs = any(r.num_logprobs is not None for r in rows)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        logits = self._adjusted(logits, rows, mask)
        greedy_mask = [r.temperature < 1e-5 for r in rows]
        if all(greedy_mask):
            return logits.argmax(dim=-1), raw_logprobs
        return self._sample(logits, rows, greedy_mask), raw_logprobs

    def target_probs(self, logits: torch.Tensor, rows: list[SamplingRow],
                     mask: Optional[TokenMask] = None) -> torch.Tensor:
        """(S, V) the distribution `sample` draws each row from (greedy rows: one-hot on the argmax)."""
        logits = self._adjusted(logits, rows, mask)
        greedy_mask = [r.temperature < 1e-5 for r in rows]
        probs = self._processed_probs(logits, rows, greedy_mask)
        greedy = torch.tensor(greedy_mask, device=logits.device)
        one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        return torch.where(greedy[:, None], one_hot, probs)

    def _adjusted(self, logits: torch.Tensor, rows: list[SamplingRow], mask: Optional[TokenMask]) -> torch.Tensor:
        adjusted = self._apply_biases_and_penalties(logits, rows)
        if mask is not None:
            adjusted = adjusted.clone() if adjusted is logits else adjusted     # the caller's logits stay raw
            apply_token_bitmask_(adjusted, mask.bitmask, mask.rows)
        return adjusted

    def to_output(self, sampled: torch.Tensor, raw_logprobs: Optional[torch.Tensor],
                  rows: list[SamplingRow], token_ids: Optional[list[int]] = None) -> SamplerOutput:
        """Host side: token ids and the requested logprobs as Python values.

        token_ids: the sampled ids already on the host. NOTE: pass them whenever they are: reading
        `sampled` here waits for everything queued on the device since, e.g. the next step's forward
        pass under async scheduling; without logprobs nothing else is read from the device."""
        num_rows = len(rows)
        if token_ids is None:
            token_ids = sampled.tolist()
        logprobs: list[Optional[dict[int, float]]] = [None] * num_rows
        if raw_logprobs is not None:
            max_k = max((r.num_logprobs or 0) for r in rows)
            top_vals, top_ids = raw_logprobs.topk(max(max_k, 1), dim=-1) if max_k else (None, None)
            chosen = raw_logprobs.gather(1, sampled[:, None]).squeeze(1).tolist()
            top_vals_l = top_vals.tolist() if top_vals is not None else None
            top_ids_l = top_ids.tolist() if top_ids is not None else None
            for i, row in enumerate(rows):
                if row.num_logprobs is None:
                    continue
                entry: dict[int, float] = {}
                if top_ids_l is not None:
                    for j in range(row.num_logprobs):
                        entry[top_ids_l[i][j]] = top_vals_l[i][j]
                entry[token_ids[i]] = chosen[i]
                logprobs[i] = entry
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def _apply_biases_and_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        needs = [bool(r.logit_bias or r.banned_token_ids or r.prompt_token_ids is not None) for r in rows]
        if not any(needs):
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i, row in enumerate(rows):
            if row.logit_bias:
                ids = torch.tensor(list(row.logit_bias.keys()), device=logits.device)
                vals = torch.tensor(list(row.logit_bias.values()), device=logits.device, dtype=logits.dtype)
                logits[i].index_add_(0, ids, vals)
            if row.prompt_token_ids is not None:
                output_ids = torch.tensor(row.output_token_ids or [], dtype=torch.long, device=logits.device)
                counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
                counts.index_add_(0, output_ids, torch.ones_like(output_ids, dtype=logits.dtype))
                if row.repetition_penalty != 1.0:
                    seen = counts > 0
                    prompt_ids = torch.tensor(row.prompt_token_ids, dtype=torch.long, device=logits.device)
                    seen[prompt_ids] = True
                    penalised = torch.where(logits[i] > 0, logits[i] / row.repetition_penalty,
                                            logits[i] * row.repetition_penalty)
                    logits[i] = torch.where(seen, penalised, logits[i])
                logits[i] -= row.frequency_penalty * counts
                logits[i] -= row.presence_penalty * (counts > 0).to(logits.dtype)
            if row.banned_token_ids:
                logits[i, row.banned_token_ids] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow], greedy_mask: list[bool]) -> torch.Tensor:
        device = logits.device
        greedy_tokens = logits.argmax(dim=-1)
        probs = self._processed_probs(logits, rows, greedy_mask)
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty((len(unseeded), probs.shape[1]), device=device,
                                          dtype=probs.dtype).exponential_(generator=self.shared_generator)
        for i, row in enumerate(rows):
            if row.seed is not None:
                generator = _seeded_generator(row.seed, row.num_output_tokens, device)
                noise[i].exponential_(generator=generator)
        sampled = (probs / noise).argmax(dim=-1)
        greedy = torch.tensor(greedy_mask, device=device)
        return torch.where(greedy, greedy_tokens, sampled)

    @staticmethod
    def _processed_probs(logits: torch.Tensor, rows: list[SamplingRow], greedy_mask: list[bool]) -> torch.Tensor:
        """temperature -> top-k -> top-p -> min-p: (S, V) unnormalised probabilities (greedy rows at
        temperature 1, their values unused)."""
        device = logits.device
        temperature = torch.tensor([1.0 if g else r.temperature for r, g in zip(rows, greedy_mask)],
                                   device=device, dtype=logits.dtype)
        scaled = logits / temperature[:, None]

        top_k = [r.top_k for r in rows]
        if any(k > 0 for k in top_k):
            k_tensor = torch.tensor([k if k > 0 else scaled.shape[1] for k in top_k], device=device)
            k_tensor = k_tensor.clamp(max=scaled.shape[1])
            sorted_vals = scaled.sort(dim=-1, descending=True).values
            kth = sorted_vals.gather(1, (k_tensor - 1)[:, None])
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = scaled.softmax(dim=-1)
        top_p = [r.top_p for r in rows]
        if any(p < 1.0 for p in top_p):
            p_tensor = torch.tensor(top_p, device=device, dtype=probs.dtype)
            sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
            cumulative = sorted_probs.cumsum(dim=-1)
            # keep the smallest prefix whose mass reaches top_p (the top token always survives)
            remove_sorted = (cumulative - sorted_probs) >= p_tensor[:, None]
            remove = torch.zeros_like(remove_sorted).scatter(1, sorted_idx, remove_sorted)
            probs = probs.masked_fill(remove, 0.0)
        min_p = [r.min_p for r in rows]
        if any(m > 0.0 for m in min_p):
            m_tensor = torch.tensor(min_p, device=device, dtype=probs.dtype)
            threshold = probs.max(dim=-1, keepdim=True).values * m_tensor[:, None]
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs
