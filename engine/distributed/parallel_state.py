"""Tensor-parallel process group: setup, rank/size helpers and the collectives the layers use.

One process per TP rank. NCCL on CUDA, gloo on CPU. Without `init_tensor_parallel` the helpers
describe a single rank and the collectives are no-ops, so single-process code needs no branches.
The rendezvous is TCP (`tcp://host:port`, rank 0 hosts the store); `get_open_port` picks the port.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class TPGroup:
    rank: int = 0
    world_size: int = 1
    group: Optional[dist.ProcessGroup] = None


_TP = TPGroup()
# the symmetric-memory all-reduce for small messages, once `enable_fast_all_reduce` set it up
_FAST_ALL_REDUCE = None
# PAGODA_ALL_REDUCE: "auto" (symmetric memory for messages up to its buffer where every rank reaches
# its peers over NVLink/P2P, NCCL otherwise) or "nccl" (NCCL for everything)
ALL_REDUCE_MODES = ("auto", "nccl")


def get_open_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now, for the rendezvous.

    NOTE: the port is released before rank 0 binds it, so another process could take it in between;
    the window is milliseconds and the loser fails loudly in `init_process_group`, never silently.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device: torch.device,
                         timeout_s: float = 600.0) -> None:
    """Joins this process to the TP group (rank 0 .. world_size-1) at `init_method` (tcp://host:port).

    `timeout_s` bounds the rendezvous and every collective: a collective stuck longer (a peer hung
    or gone) raises in this process instead of blocking it forever.
    """
    global _TP
    if _TP.world_size > 1 or dist.is_initialized():
        raise RuntimeError("this process already belongs to a tensor-parallel group")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _TP = TPGroup(rank=rank, world_size=world_size, group=dist.group.WORLD)


def enable_fast_all_reduce(dtype: torch.dtype, max_bytes: int) -> bool:
    """Sets up the symmetric-memory all-reduce for `dtype` messages up to `max_bytes` (a collective:
    every rank calls it, after `init_tensor_parallel`). Returns whether it is in use."""
    global _FAST_ALL_REDUCE
    mode = os.environ.get("PAGODA_ALL_REDUCE", "auto")
    if mode not in ALL_REDUCE_MODES:
        raise ValueError(f"PAGODA_ALL_REDUCE must be one of {ALL_REDUCE_MODES}, got {mode!r}")
    if _TP.world_size == 1 or mode == "nccl" or _TP.group is None:
        return False
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if dist.get_backend(_TP.group) != "nccl":
        return False
    from .symm_all_reduce import try_symm_all_reduce

    _FAST_ALL_REDUCE = try_symm_all_reduce(_TP.group, device, dtype, max_bytes)
    return _FAST_ALL_REDUCE is not None


def destroy_tensor_parallel() -> None:
    global _TP, _FAST_ALL_REDUCE
    _FAST_ALL_REDUCE = None
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP = TPGroup()


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_size() -> int:
    return _TP.world_size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (returns x)."""
    if _TP.world_size > 1:
        if _FAST_ALL_REDUCE is not None and _FAST_ALL_REDUCE.can_run(x):
            return _FAST_ALL_REDUCE(x)
        dist.all_reduce(x, group=_TP.group)
    return x


def tp_partial_output(x: torch.Tensor, out_features: int, slot: int) -> Optional[torch.Tensor]:
    """Where a bias-free row-parallel layer should write its unreduced (T, out_features) share, to be
    summed by `tp_all_reduce_add_rms_norm(..., slot)`: the fused kernel's symmetric-memory `slot` (0 or
    1; the two row-parallel layers of a decoder layer alternate) where that kernel runs, else None."""
    fused = _FAST_ALL_REDUCE.norm if _FAST_ALL_REDUCE is not None else None
    if fused is not None and x.dim() == 2 and x.dtype == fused.dtype:
        return fused.slot_view(slot, x.shape[0], out_features)
    return None


def tp_all_reduce_add_rms_norm(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                               slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(sum over ranks of partial + residual), that sum + residual): the all-reduce after a
    row-parallel layer fused with the residual add and norm that follow it where possible."""
    if _TP.world_size > 1:
        fused = _FAST_ALL_REDUCE.norm if _FAST_ALL_REDUCE is not None else None
        # NOTE: rank-independent: every rank's partial is in its slot or none is (same shapes, same code)
        if fused is not None and fused.owns(partial, slot) and residual.dtype == fused.dtype:
            return fused.add_rms_norm(partial, residual, weight, eps, slot)
        partial = tp_all_reduce(partial)
    from pagoda.kernels.norm import fused_add_rms_norm

    return fused_add_rms_norm(partial, residual, weight, eps)


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenates every rank's x along `dim`, in rank order."""
    if _TP.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.world_size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=dim)


def tp_broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Every rank's x becomes rank `src`'s, in place (returns x); x must be contiguous, of the same
    shape and dtype on every rank."""
    if _TP.world_size > 1:
        dist.broadcast(x, src=src, group=_TP.group)
    return x


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor parallel size ({denominator})")
    return numerator // denominator
