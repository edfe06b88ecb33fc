"""`ParallelLMHead.greedy`: the argmax without gathered logits (TP itself: test_tensor_parallel)."""
from __future__ import annotations

import torch

from pagoda.engine.layers.embedding import ParallelLMHead


def test_greedy_equals_argmax_of_the_logits():
    torch.manual_seed(0)
    head = ParallelLMHead(vocab_size=37, hidden_size=8)
    head.weight.data.normal_()
    hidden = torch.randn(5, 8)
    assert torch.equal(head.greedy(hidden), head.compute_logits(hidden).argmax(dim=-1))


def test_padding_rows_of_the_last_shard_never_win():
    """A rank whose shard runs past the vocabulary (padded rows hold zeros) must not pick a padding
    row even when every real logit is negative."""
    head = ParallelLMHead(vocab_size=10, hidden_size=4)
    # pretend to be rank 1 of 2: shard of 8 rows starting at id 8, only ids 8 and 9 are real
    head.shard_size, head.vocab_start = 8, 8
    head.weight.data = torch.zeros(8, 4)
    head.weight.data[:2] = -1.0                        # real rows: logits -4 * hidden, all negative
    hidden = torch.ones(3, 4)
    ids = head.greedy(hidden)                          # single process: shard-local ids
    assert ids.tolist() == [0, 0, 0]
