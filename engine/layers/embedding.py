"""Vocabulary-parallel embedding and LM head.

Each rank holds a contiguous slice of the (padded) vocabulary. The embedding looks up the ids in
its slice, zeroes the rest and all-reduces; the LM head computes logits for its slice and
all-gathers them (the result is cut back to the true vocabulary size).

The weight is a (shard, hidden) matrix in the model dtype, or, where the quantization scheme keeps
embeddings quantized (GGUF files: `QuantizationConfig.embedding_method`), an `EmbeddingMethod`'s:
the lookup dequantizes only the rows it reads, the LM head multiplies through the method's `apply`
(a weight-only GEMM). Rows are whole in every format, so the vocabulary split is the same. A tied LM
head (`tie_word_embeddings`) shares the embedding's weight, quantized or not.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from ..quantization.base import LinearMethod, QuantizationConfig
from .linear import ShardSlice


class EmbeddingMethod(LinearMethod):
    """A quantized embedding / LM head weight: `LinearMethod`'s API over the layer's (shard, hidden)
    matrix (`apply` computes the LM head's logits), plus the row lookup and the loader of its
    parameters (rows `layer.shard_slice()` of the checkpoint tensor)."""

    @abstractmethod
    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """(T,) shard-local ids -> (T, hidden) in the model dtype."""

    @abstractmethod
    def weight_loader(self, layer: nn.Module, param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        """Loads this rank's rows of checkpoint tensor `weight` into `param`."""


def embedding_method_for(quant_config: Optional[QuantizationConfig], prefix: str) -> Optional[EmbeddingMethod]:
    """The method of the embedding or LM head at `prefix` (`model.embed_tokens`, `lm_head`); None keeps
    it in the model dtype. Only schemes that quantize embeddings define `embedding_method(prefix)`."""
    factory = getattr(quant_config, "embedding_method", None)
    return None if factory is None else factory(prefix)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 quant_method: Optional[EmbeddingMethod] = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.shard_size = -(-vocab_size // self.tp_size)       # padded so every rank has equal rows
        self.vocab_start = self.tp_rank * self.shard_size
        self.quant_method = quant_method
        if quant_method is None:
            self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size, dtype=dtype), requires_grad=False)
        else:
            quant_method.create_weights(self, hidden_size, [self.shard_size], dtype)
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def shard_slice(self, shard_id: Any = None) -> ShardSlice:
        """This rank's real rows of the checkpoint tensor (the padding rows past the vocabulary excluded)."""
        length = max(0, min(self.shard_size, self.vocab_size - self.vocab_start))
        return ShardSlice(0, self.vocab_start, length, 0, 0, self.hidden_size)

    def weight_loader(self, param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        if weight.shape[0] != self.vocab_size:
            raise ValueError(f"checkpoint tensor {weight.name} has {weight.shape[0]} rows, expected "
                             f"vocab_size={self.vocab_size}")
        if self.quant_method is not None:
            self.quant_method.weight_loader(self, param, weight, shard_id)
            return
        length = self.shard_slice(shard_id).out_len
        if length:
            param.data[:length].copy_(weight.load(dim=0, start=self.vocab_start, length=length, dtype=param.dtype))

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant_method is None:
            return F.embedding(ids, self.weight)
        return self.quant_method.embed(self, ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:     # (T,) -> (T, hidden)
        if self.tp_size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.vocab_start
        in_shard = (local >= 0) & (local < self.shard_size)
        out = self._lookup(local.clamp(0, self.shard_size - 1))
        out = out * in_shard.unsqueeze(-1).to(out.dtype)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """tied_to: the embedding whose weight this head shares (then it has no weight of its own)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 quant_method: Optional[EmbeddingMethod] = None,
                 tied_to: Optional[VocabParallelEmbedding] = None) -> None:
        if tied_to is None:
            super().__init__(vocab_size, hidden_size, dtype, quant_method)
            self._tied: tuple[VocabParallelEmbedding, ...] = ()
            return
        nn.Module.__init__(self)
        self.tp_rank, self.tp_size = tied_to.tp_rank, tied_to.tp_size
        self.vocab_size, self.hidden_size = tied_to.vocab_size, tied_to.hidden_size
        self.shard_size, self.vocab_start = tied_to.shard_size, tied_to.vocab_start
        self.quant_method = None
        # NOTE: a tuple, not an attribute holding the module: the embedding stays out of this head's
        # submodules, so its parameters keep the one name `model.embed_tokens.weight`
        self._tied = (tied_to,)
        if tied_to.quant_method is None:
            self.weight = tied_to.weight         # the same Parameter (named twice, loaded once)

    def _local_logits(self, hidden: torch.Tensor) -> torch.Tensor:   # (S, hidden) -> (S, shard)
        owner = self._tied[0] if self._tied else self
        if owner.quant_method is None:
            return F.linear(hidden, owner.weight)
        return owner.quant_method.apply(owner, hidden, None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:   # (S, hidden) -> (S, vocab)
        logits = self._local_logits(hidden)
        if self.tp_size > 1:
            logits = tp_all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size]

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:           # (S, hidden) -> (S,) int64 token ids
        """argmax over the whole vocabulary without gathering the logits: each rank takes the max of
        its shard, the ranks exchange (value, id) pairs and keep the best; ties go to the lowest id,
        as `torch.argmax` of the gathered logits would. A collective: every rank calls it."""
        logits = self._local_logits(hidden)                             # (S, shard)
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
