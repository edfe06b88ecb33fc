"""One-shot all-reduce through symmetric memory, for the small activations of decode steps.

A decode step all-reduces (tokens, hidden) activations twice per layer: 2 MB at 256 tokens of a
4096-wide model, 160 times per step for an 80-layer one. At that size NCCL's ring is latency-bound.
Here every rank copies its input into a buffer that all ranks mapped at start-up (torch's
symmetric memory, peer-to-peer over NVLink, no multicast), and one kernel per rank reads the
peers' buffers and sums them (`symm_mem::one_shot_all_reduce_out`, barriers before and after the
reads, so the buffer is free again when it returns). Bigger messages (prefill) stay on NCCL.

    rank r:  x_r ──copy──> buf_r ─┐ barrier; out = sum over peers p of buf_p (NVLink loads); barrier
                                   └──> x_r (in place)

Where the sum of a row-parallel layer's partial products feeds a residual add + RMSNorm (between
decoder sub-layers), `FusedNormSlots` does all three in one kernel, the GEMM writing its partial
straight into a symmetric slot (`use_fused_norm`: PAGODA_FUSED_ALL_REDUCE_NORM).

Invariant: every rank calls it with the same size in the same order (as any collective), and the
calls are stream-ordered, so they may be captured in CUDA graphs like the NCCL ones.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class SymmAllReduce:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, max_bytes: int) -> None:
        from torch.distributed import _symmetric_memory as symm_mem

        if device.type != "cuda":
            raise ValueError(f"symmetric-memory all-reduce needs a CUDA device, got {device}")
        self.group_name = group.group_name
        self.dtype = dtype
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, group)
        # one shot reads (n-1) x the message from peers, two shots 2 (n-1)/n x with one more barrier.
        # Measured on H200 (bench/allreduce.py, in CUDA graphs): one shot wins at 0.5 MiB (11 vs 13 us
        # on 2 ranks, 13 vs 15 on 4), two shots from 2 MiB (19.5 vs 21.5 us on 2, 25 vs 30.5 on 4).
        # PAGODA_SYMM_TWO_SHOT_MIN_BYTES overrides the cut.
        self.two_shot_min_bytes = int(os.environ.get("PAGODA_SYMM_TWO_SHOT_MIN_BYTES", 1 << 20))
        self.norm = FusedNormSlots(group, device, dtype, self.max_numel) \
            if use_fused_norm(dist.get_world_size(group)) else None

    @property
    def max_numel(self) -> int:
        return self.buffer.numel()

    def can_run(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.is_cuda and x.is_contiguous() and x.numel() <= self.max_numel

    def __call__(self, x: torch.Tensor, algorithm: Optional[str] = None) -> torch.Tensor:
        """Sum over ranks, in place (returns x). algorithm: "one" or "two" shot (None = by size)."""
        flat = x.view(-1)
        staged = self.buffer[: flat.numel()]
        if algorithm is None:
            algorithm = "two" if flat.numel() * flat.element_size() >= self.two_shot_min_bytes else "one"
        if algorithm == "one":
            # the kernel copies x into this rank's buffer, barriers, then sums every rank's buffer
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(staged, flat, "sum", self.group_name, flat)
        elif algorithm == "two":
            # reduce-scatter then all-gather through the buffers: each rank reads 2 (n-1)/n of x
            staged.copy_(flat)
            torch.ops.symm_mem.two_shot_all_reduce_out(staged, "sum", self.group_name, flat)
        else:
            raise ValueError(f"algorithm must be 'one' or 'two', got {algorithm!r}")
        return x


# PAGODA_FUSED_ALL_REDUCE_NORM: "auto" (default: fused up to FUSED_NORM_MAX_WORLD ranks), "1", "0"
FUSED_NORM_MODES = ("auto", "1", "0")
FUSED_NORM_MAX_WORLD = 2


def use_fused_norm(world_size: int) -> bool:
    mode = os.environ.get("PAGODA_FUSED_ALL_REDUCE_NORM", "auto")
    if mode not in FUSED_NORM_MODES:
        raise ValueError(f"PAGODA_FUSED_ALL_REDUCE_NORM must be one of {FUSED_NORM_MODES}, got {mode!r}")
    return mode == "1" or (mode == "auto" and world_size <= FUSED_NORM_MAX_WORLD)


class FusedNormSlots:
    """The buffers of the fused all-reduce + residual add + RMSNorm (kernels/all_reduce_norm_triton.py).

    Two partial-product slots, used alternately by the two row-parallel layers of a decoder layer
    (attention's o_proj: slot 0, the MLP's down_proj: slot 1), so consecutive fused calls never
    share a slot (the kernel's invariant), and int32 barrier flags, all in symmetric memory.

        slot s on rank r: its (rows, hidden) partial; the kernel overwrites rank r's own rows with
        the reduced sums, which the peers then read
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, max_numel: int) -> None:
        from torch.distributed import _symmetric_memory as symm_mem

        from pagoda.kernels.all_reduce_norm_triton import signal_slots

        self.dtype = dtype
        self.max_numel = max_numel
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.max_programs = torch.cuda.get_device_properties(device).multi_processor_count
        self.slots = symm_mem.empty(2 * max_numel, dtype=dtype, device=device)
        slots_handle = symm_mem.rendezvous(self.slots, group)
        self.signals = symm_mem.empty(signal_slots(self.max_programs, self.world_size), dtype=torch.int32,
                                      device=device)
        self.signals.zero_()
        signals_handle = symm_mem.rendezvous(self.signals, group)

        def peer_addresses(handle, tensor: torch.Tensor, byte_offset: int) -> torch.Tensor:
            # the tensor may sit at an offset inside its symmetric allocation: the same on every rank
            within = tensor.data_ptr() - handle.buffer_ptrs[self.rank] + byte_offset
            return torch.tensor([ptr + within for ptr in handle.buffer_ptrs], dtype=torch.int64, device=device)

        slot_bytes = max_numel * dtype.itemsize
        self.buf_ptrs = [peer_addresses(slots_handle, self.slots, s * slot_bytes) for s in (0, 1)]
        self.sig_ptrs = peer_addresses(signals_handle, self.signals, 0)
        torch.cuda.synchronize(device)
        dist.barrier(group, device_ids=[device.index])   # every rank's flags are zero before anyone signals

    def slot_view(self, slot: int, rows: int, cols: int) -> Optional[torch.Tensor]:
        if rows * cols > self.max_numel:
            return None
        start = slot * self.max_numel
        return self.slots[start:start + rows * cols].view(rows, cols)

    def owns(self, partial: torch.Tensor, slot: int) -> bool:
        view = self.slot_view(slot, *partial.shape) if partial.dim() == 2 else None
        return view is not None and partial.data_ptr() == view.data_ptr() and partial.is_contiguous()

    def add_rms_norm(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, new residual) from `partial` (this rank's, in `slot`), summed over ranks."""
        from pagoda.kernels.all_reduce_norm_triton import all_reduce_add_rms_norm

        return all_reduce_add_rms_norm(residual.contiguous(), weight, eps, self.buf_ptrs[slot], self.sig_ptrs,
                                       self.rank, self.world_size, self.max_programs)


def try_symm_all_reduce(group: Optional[dist.ProcessGroup], device: torch.device, dtype: torch.dtype,
                        max_bytes: int) -> Optional[SymmAllReduce]:
    """The symmetric-memory all-reduce, or None (NCCL for everything) where it cannot run.

    A collective: every rank calls it. The ranks first agree (an all-reduce of "I can reach every
    peer's memory") so that all of them take the same path; a failure after that raises.
    """
    if group is None or device.type != "cuda":
        return None
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
        available = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out")
    except (ImportError, AttributeError, RuntimeError):
        available = False
    world = dist.get_world_size(group)
    count = torch.cuda.device_count()
    # NOTE: a process that sees fewer devices than ranks (e.g. one GPU per Ray actor) cannot check
    # peer access here: it says no, and the group stays on NCCL.
    reachable = available and count >= world and all(
        torch.cuda.can_device_access_peer(device.index, peer) for peer in range(world) if peer != device.index)
    agreed = torch.tensor([1 if reachable else 0], dtype=torch.int32, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    if not int(agreed.item()):
        logger.info("symmetric-memory all-reduce not used (a rank cannot reach its peers' memory); NCCL only")
        return None
    return SymmAllReduce(group, device, dtype, max_bytes)
