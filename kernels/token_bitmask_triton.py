"""Triton grammar mask: same contract as `token_bitmask.apply_token_bitmask_ref_`.

Grid (R, cdiv(V, BLOCK)): each program takes BLOCK tokens of one constrained row, reads their
BLOCK / 32 bitmask words (a word serves 32 neighbouring tokens, so the loads coalesce) and writes
-inf only where a token is forbidden; allowed logits are never touched.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _apply_token_bitmask_kernel(
    logits_ptr,          # (S, V), row stride stride_logits
    bitmask_ptr,         # (R, W) int32, contiguous
    rows_ptr,            # (R,) int64
    vocab_size,
    num_words,           # W
    stride_logits,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)          # (BLOCK,) token ids
    in_vocab = offs < vocab_size
    word_index = offs // 32
    words = tl.load(bitmask_ptr + r * num_words + word_index, mask=in_vocab & (word_index < num_words), other=0)
    allowed = ((words >> (offs % 32)) & 1) != 0
    row = tl.load(rows_ptr + r)
    tl.store(logits_ptr + row * stride_logits + offs, float("-inf"), mask=in_vocab & ~allowed)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    bitmask = bitmask.to(logits.device).contiguous()
    rows = rows.to(device=logits.device, dtype=torch.int64).contiguous()
    num_rows, num_words = bitmask.shape
    vocab = logits.shape[1]
    grid = (num_rows, triton.cdiv(vocab, _BLOCK))
    _apply_token_bitmask_kernel[grid](logits, bitmask, rows, vocab, num_words, logits.stride(0), BLOCK=_BLOCK)
