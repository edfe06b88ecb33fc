"""Vocabulary-parallel embedding and LM head.

Each rank holds a contiguous slice of the (padded) vocabulary. The embedding looks up the ids in
its slice, zeroes the rest and all-reduces; the LM head computes logits for its slice and
all-gathers them (the result is cut back to the true vocabulary size).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // self.tp_size)       # padded so every rank has equal rows
        self.vocab_start = self.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        length = max(0, min(self.shard_size, self.vocab_size - self.vocab_start))
        if weight.shape[0] != self.vocab_size:
            raise ValueError(f"checkpoint tensor {weight.name} has {weight.shape[0]} rows, expected "
                             f"vocab_size={self.vocab_size}")
        if length:
            param.data[:length].copy_(weight.load(dim=0, start=self.vocab_start, length=length, dtype=param.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:     # (T,) -> (T, hidden)
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        in_shard = (local >= 0) & (local < self.shard_size)
        out = F.embedding(local.clamp(0, self.shard_size - 1), self.weight)
        out = out * in_shard.unsqueeze(-1).to(out.dtype)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:   # (S, hidden) -> (S, vocab)
        logits = F.linear(hidden, self.weight)
        if self.tp_size > 1:
            logits = tp_all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size]

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:           # (S, hidden) -> (S,) int64 token ids
        """argmax over the whole vocabulary without gathering the logits: each rank takes the max of
        its shard, the ranks exchange (value, id) pairs and keep the best; ties go to the lowest id,
        as `torch.argmax` of the gathered logits would. A collective: every rank calls it."""
        logits = F.linear(hidden, self.weight)                          # (S, shard)
        real = self.vocab_size - self.vocab_start                       # this shard's real (unpadded) rows
        if real < self.shard_size:
            logits[:, max(real, 0):] = float("-inf")
        values, ids = logits.max(dim=-1)                                # first max within the shard
        if self.tp_size == 1:
            return ids
        # NOTE: ids < 2^24 are exact in fp32; values are the model dtype's, exact in fp32 too
        pairs = torch.stack([values.float(), (ids + self.vocab_start).float()], dim=-1)   # (S, 2)
        everyone = tp_all_gather(pairs[None], dim=0)                    # (tp, S, 2), rank order = id order
        best_rank = everyone[..., 0].argmax(dim=0)                      # first (lowest-id) rank with the max
        return everyone[..., 1].gather(0, best_rank[None]).squeeze(0).long()
