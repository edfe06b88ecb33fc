"""The per-step attention metadata that the model runner builds and every attention kernel reads.

One flattened batch holds `num_seqs` sequences; sequence i contributes the new tokens
`query[query_start_loc[i]:query_start_loc[i+1]]` (a whole prompt, a prefill chunk, or one decode
token) and attends to its first `seq_lens[i]` tokens of context, which live in the paged KV cache
at the blocks listed in `block_tables[i]`. The new tokens are the *last* `q_len_i` tokens of that
context, so token j of sequence i sits at position `seq_lens[i] - q_len_i + j`.

    block_tables[i] = [7, 2, 9]      block_size = 4, seq_lens[i] = 10
    context slots   = 7*4+0..3 | 2*4+0..3 | 9*4+0..1
                      tok 0..3   tok 4..7   tok 8..9
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # (num_tokens,) int64: cache slot of each new token; -1 = skip (padding)
    query_start_loc: torch.Tensor   # (num_seqs + 1,) int32: prefix sums of new-token counts
    seq_lens: torch.Tensor          # (num_seqs,) int32: context length including the new tokens
    block_tables: torch.Tensor      # (num_seqs, max_blocks_per_seq) int32; unused entries are 0
    max_query_len: int              # max new tokens of one sequence in this step (1 = pure decode)
    max_seq_len: int                # max of seq_lens
    # decode only: fixed context partitions per sequence (CUDA graphs need a grid that does not
    # depend on the current lengths); None = let the kernel choose from max_seq_len
    num_decode_splits: Optional[int] = None
    # what a host-side kernel derived from the fields above, kept for the step's other layers
    # (`attention_cpu.plan_for`); never set by the runner, never read on the GPU
    host_plan: Any = field(default=None, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
