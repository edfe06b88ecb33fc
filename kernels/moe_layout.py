"""What the MoE dispatch (moe.py) and its Triton kernels (moe_triton.py) share: the expert-sorted
layout of (token, k) pairs and gpt-oss's activation constants. A module below both, so that neither
imports the other for them (the dispatch imports the kernels lazily, on the first CUDA call)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# gpt-oss's clamped SwiGLU (transformers' GptOssExperts; its config's swiglu_alpha / swiglu_limit)
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


@dataclass
class MoeAlignment:
    """(token, k) pairs grouped by local expert, each expert's run padded to `block_m` rows.

    sorted_ids    (num_blocks * block_m,) int32: pair index t * K + k per row; padding rows hold
                  num_pairs (= T * K), which no pair has. Within an expert the order is unspecified.
    block_expert  (num_blocks,) int32: the local expert of each block of block_m rows, -1 for the
                  blocks past the last expert's run (the layout is sized for the worst case).
    """
    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    block_m: int
    num_pairs: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.numel()


def max_aligned_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The padded layout's size for the worst case: every pair is real and each non-empty expert
    (at most min(E, pairs) of them) wastes up to block_m - 1 rows; rounded up to whole blocks."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m
