"""Grammar masks on the logits: every token a request's grammar forbids gets -inf, in place.

    logits   (S, V) float        the sampling rows of one step
    bitmask  (R, W) int32        W = ceil(V' / 32) words per row; bit j of word w allows token 32*w + j
    rows     (R,) int64          the logits row each bitmask row constrains (R <= S, distinct)

Tokens past the bitmask's 32*W (a model vocabulary padded beyond the tokenizer's) are forbidden.
Rows of `logits` not named in `rows` are left alone, so a batch mixes constrained and free requests.
"""
from __future__ import annotations

import torch

from .backend import use_triton

BITS_PER_WORD = 32


def bitmask_width(vocab_size: int) -> int:
    """Words per bitmask row for a vocabulary of `vocab_size` tokens."""
    return -(-vocab_size // BITS_PER_WORD)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    _check(logits, bitmask, rows)
    if bitmask.shape[0] == 0:
        return
    if use_triton(logits):
        from . import token_bitmask_triton

        token_bitmask_triton.apply_token_bitmask_(logits, bitmask, rows)
        return
    apply_token_bitmask_ref_(logits, bitmask, rows)


def apply_token_bitmask_ref_(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    vocab = logits.shape[1]
    shifts = torch.arange(BITS_PER_WORD, device=bitmask.device, dtype=torch.int32)
    # (R, W, 32) -> (R, 32 * W): bit j of word w is token 32 * w + j
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)
    if allowed.shape[1] >= vocab:
        allowed = allowed[:, :vocab]
    else:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    logits[rows] = logits[rows].masked_fill(~allowed.to(logits.device), float("-inf"))


def _check(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 2-D float tensor (S, V), got {tuple(logits.shape)} {logits.dtype}")
    if bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError(f"bitmask must be a 2-D int32 tensor (R, W), got {tuple(bitmask.shape)} {bitmask.dtype}")
    if rows.dim() != 1 or rows.shape[0] != bitmask.shape[0]:
        raise ValueError(f"rows must name one logits row per bitmask row: {tuple(rows.shape)} rows for "
                         f"{bitmask.shape[0]} bitmask rows")
