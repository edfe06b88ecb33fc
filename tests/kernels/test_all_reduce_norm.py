"""The fused all-reduce + residual add + RMSNorm kernel, one rank of a simulated group.

One process plays rank `rank` of W (under the Triton interpreter on CPU, compiled on one GPU,
where the barrier's system-scope atomics run for real): the peers' buffers are plain tensors holding what they would hold when this rank reads them (their partials for this rank's
rows, and their own rows already reduced, as after their phase 1), and the peers' signals to this
rank are pre-set. The real multi-GPU run is bench/allreduce.py (checked there against NCCL).
"""
from __future__ import annotations

import pytest
import torch

from pagoda.kernels.all_reduce_norm_triton import all_reduce_add_rms_norm, all_reduce_add_rms_norm_ref, signal_slots


def owned_rows(rank: int, rows: int, world: int) -> torch.Tensor:
    return torch.tensor([r for r in range(rows) if r * world // rows == rank], dtype=torch.long)


def simulate(world: int, rank: int, rows: int, hidden: int, max_programs: int, dtype=torch.bfloat16,
             device: torch.device = torch.device("cpu")):
    torch.manual_seed(world * 100 + rank * 10 + rows)
    partials = [torch.randn(rows, hidden, dtype=dtype, device=device) for _ in range(world)]
    residual = torch.randn(rows, hidden, dtype=dtype, device=device)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    expected_out, expected_residual = all_reduce_add_rms_norm_ref(partials, residual, weight, 1e-5)
    buffers = []
    for r in range(world):
        buf = partials[r].clone()
        if r != rank:                                   # the peer has done its phase 1 already
            owned = owned_rows(r, rows, world).to(device)
            buf[owned] = expected_residual[owned]
        buffers.append(buf)
    slots = signal_slots(max_programs, world)
    signals = [torch.zeros(slots, dtype=torch.int32, device=device) for _ in range(world)]
    programs = min(rows, max_programs)
    for p in range(programs):                           # the peers' signals to this rank, both phases
        for phase in range(2):
            for peer in range(world):
                if peer != rank:
                    signals[rank][(p * 2 + phase) * world + peer] = 1
    buf_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=device)
    sig_ptrs = torch.tensor([s.data_ptr() for s in signals], dtype=torch.int64, device=device)
    out, residual_out = all_reduce_add_rms_norm(residual, weight, 1e-5, buf_ptrs, sig_ptrs, rank, world, max_programs)
    return locals()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("world,rank,rows,max_programs", [
    (2, 0, 6, 8), (2, 1, 7, 8), (4, 3, 9, 2), (4, 0, 1, 4), (3, 1, 10, 1)])
def test_matches_reference_and_signals(world, rank, rows, max_programs, dtype, device):
    s = simulate(world, rank, rows, 96, max_programs, dtype, device)
    # fp32: to rounding; bf16: within one unit in the last place of values up to ~8 (the
    # interpreter's float -> bf16 conversion rounds differently from torch's)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0.07)
    torch.testing.assert_close(s["residual_out"], s["expected_residual"], **tol)
    torch.testing.assert_close(s["out"], s["expected_out"], **tol)
    owned = owned_rows(rank, rows, world).to(device)
    torch.testing.assert_close(s["buffers"][rank][owned], s["expected_residual"][owned], **tol)   # phase 1's rows
    assert int(s["signals"][rank].sum()) == 0                                       # every signal consumed
    for peer in range(world):
        if peer != rank:                        # this rank signalled each peer once per phase and program
            sent = s["signals"][peer].view(-1, world)[: 2 * s["programs"], rank]
            assert sent.tolist() == [1] * (2 * s["programs"])


def test_rejects_bad_shapes():
    s = torch.zeros(4, 8, dtype=torch.bfloat16)
    ptrs = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="weight"):
        all_reduce_add_rms_norm(s, torch.ones(7, dtype=torch.bfloat16), 1e-5, ptrs, ptrs, 0, 2, 4)
    with pytest.raises(ValueError, match="one buffer and one signal address per rank"):
        all_reduce_add_rms_norm(s, torch.ones(8, dtype=torch.bfloat16), 1e-5, ptrs, ptrs, 2, 2, 4)


def test_fused_norm_mode(monkeypatch):
    from pagoda.engine.distributed.symm_all_reduce import FUSED_NORM_MAX_WORLD, use_fused_norm

    monkeypatch.delenv("PAGODA_FUSED_ALL_REDUCE_NORM", raising=False)
    assert use_fused_norm(2) and not use_fused_norm(FUSED_NORM_MAX_WORLD + 1)     # auto: measured faster on 2
    monkeypatch.setenv("PAGODA_FUSED_ALL_REDUCE_NORM", "1")
    assert use_fused_norm(8)
    monkeypatch.setenv("PAGODA_FUSED_ALL_REDUCE_NORM", "0")
    assert not use_fused_norm(2)
    monkeypatch.setenv("PAGODA_FUSED_ALL_REDUCE_NORM", "yes")
    with pytest.raises(ValueError, match="PAGODA_FUSED_ALL_REDUCE_NORM must be one of"):
        use_fused_norm(2)
