"""Triton grammar mask vs the torch reference, and the reference vs a per-token definition."""
from __future__ import annotations

import pytest
import torch

from pagoda.kernels import token_bitmask_triton
from pagoda.kernels.token_bitmask import apply_token_bitmask_, apply_token_bitmask_ref_, bitmask_width


def _random_case(num_rows: int, vocab: int, mask_vocab: int, device: torch.device):
    logits = torch.randn(num_rows, vocab, device=device)
    allowed = torch.rand(num_rows, mask_vocab) < 0.3                      # (S, V') bool
    words = bitmask_width(mask_vocab)
    bits = torch.zeros(num_rows, words * 32, dtype=torch.int64)
    bits[:, :mask_vocab] = allowed.long()
    weights = (1 << torch.arange(32, dtype=torch.int64))
    packed = (bits.view(num_rows, words, 32) * weights).sum(-1)          # (S, W) in [0, 2^32)
    bitmask = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return logits, allowed, bitmask.to(device)


def _expected(logits, allowed, rows):
    expected = logits.clone()
    vocab = logits.shape[1]
    for i, row in enumerate(rows.tolist()):
        for token in range(vocab):
            if token >= allowed.shape[1] or not allowed[i, token]:
                expected[row, token] = float("-inf")
    return expected


@pytest.mark.parametrize("vocab,mask_vocab", [(64, 64), (100, 100), (130, 100), (96, 128)])
def test_reference_matches_definition(vocab, mask_vocab):
    logits, allowed, bitmask = _random_case(4, vocab, mask_vocab, torch.device("cpu"))
    rows = torch.tensor([3, 0], dtype=torch.int64)
    expected = _expected(logits, allowed[:2], rows)
    apply_token_bitmask_ref_(logits, bitmask[:2], rows)
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("vocab,mask_vocab", [(64, 64), (1000, 1000), (2100, 2048), (3000, 3007)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_matches_reference(vocab, mask_vocab, dtype, device):
    logits, _, bitmask = _random_case(5, vocab, mask_vocab, device)
    logits = logits.to(dtype)
    rows = torch.tensor([4, 1, 2], dtype=torch.int64, device=device)
    expected = logits.clone()
    apply_token_bitmask_ref_(expected, bitmask[:3], rows)
    token_bitmask_triton.apply_token_bitmask_(logits, bitmask[:3], rows)
    assert torch.equal(logits, expected)


def test_unconstrained_rows_untouched_and_bad_shapes_named(device):
    logits, _, bitmask = _random_case(3, 70, 70, device)
    before = logits.clone()
    apply_token_bitmask_(logits, bitmask[:1], torch.tensor([1], device=device))
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert torch.isinf(logits[1]).any() and not torch.equal(logits[1], before[1])
    with pytest.raises(ValueError, match="bitmask must be a 2-D int32"):
        apply_token_bitmask_(logits, bitmask.long(), torch.tensor([0, 1, 2], device=device))
    with pytest.raises(ValueError, match="rows must name one logits row per bitmask row"):
        apply_token_bitmask_(logits, bitmask, torch.tensor([0], device=device))
