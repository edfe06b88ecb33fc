"""`enable_fast_all_reduce`: the switch and its refusals (the all-reduce itself needs 2+ GPUs:
bench/allreduce.py checks it against NCCL on a multi-GPU machine)."""
from __future__ import annotations

import pytest
import torch

from pagoda.engine.distributed import parallel_state as distributed


def test_bad_mode_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("PAGODA_ALL_REDUCE", "fastest")
    with pytest.raises(ValueError, match=r"PAGODA_ALL_REDUCE must be one of \('auto', 'nccl'\), got 'fastest'"):
        distributed.enable_fast_all_reduce(torch.bfloat16, 1 << 20)


@pytest.mark.parametrize("mode", ["auto", "nccl"])
def test_single_rank_needs_none(monkeypatch, mode):
    monkeypatch.setenv("PAGODA_ALL_REDUCE", mode)
    assert distributed.enable_fast_all_reduce(torch.bfloat16, 1 << 20) is False
    x = torch.ones(3)
    assert distributed.tp_all_reduce(x) is x and x.tolist() == [1.0, 1.0, 1.0]
