"""All-reduce of row-parallel partial sums fused with the residual add and RMSNorm that follow it.

Between two sub-layers of a tensor-parallel decoder, every rank holds a partial product (o_proj or
down_proj over its slice of the inputs) that must be summed over ranks, added to the residual and
normalised. Unfused that is a two-shot all-reduce (barrier, reduce-scatter, barrier, all-gather,
barrier) and then a norm kernel. Here one kernel does it, reading the peers' partials straight from
their symmetric-memory buffers (peer-to-peer over NVLink, no multicast):

    rank r owns a contiguous block of rows ((row * W) // rows == r); program p handles rows
    p, p + P, ... (P <= the SM count, so all programs are resident at once)
    phase 1  barrier with the peers; for each of its rows this rank owns: new residual =
             round(sum over ranks of the partial row) + residual, rounded; written over this
             rank's own partial row
    phase 2  barrier with the peers; for each of its rows, from the owner's buffer: the new
             residual -> residual_out, RMSNorm(new residual) * weight -> out

Each rank reads (W-1)/W of the message per phase, as a two-shot all-reduce does, and the norm costs
no extra pass. Barriers pair program p of every rank (the grid and the row-to-program map are the
same on all ranks; the rows program p reads from a peer in phase 2 are the ones that peer's program
p reduced in phase 1) through flags in a symmetric int32 buffer: a sender sets its slot on the peer
from 0 to 1 (release, system scope; it retries while the peer has not consumed its last signal), a
receiver sets it back from 1 to 0 (acquire); one lane per peer.

Invariants the caller keeps (engine/distributed/symm_all_reduce.py):
- the partials live in one of two buffer slots that alternate call by call, so a rank writing the
  next-but-one call's partial into a slot knows every peer is done reading it (a peer starting the
  call in between has finished this one: calls are stream-ordered);
- every rank calls with the same shapes, in the same order; the grid never exceeds the signal
  slots and stays small enough (<= the SM count) for all programs to be resident at once.

Numerics follow `norm_triton.fused_add_rms_norm` applied to the all-reduced partials: the fp32 sum of
the partials is rounded to the input dtype (an all-reduce's output), added to the residual in fp32,
rounded (the new residual), and normalised. Reference: `all_reduce_add_rms_norm_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .norm_triton import _rms_norm_row


@triton.jit
def _cas_each_once(targets, pending, scratch, expect, new, SEM: tl.constexpr):
    """Compare-and-swap expect -> new (system scope) at each pending lane's target, retrying a lane
    until its swap succeeded; lanes not pending swap a scratch flag with compare 2, a value it never
    holds, so they write nothing."""
    while tl.max(pending.to(tl.int32), 0) > 0:
        old = tl.atomic_cas(tl.where(pending, targets, scratch), tl.where(pending, expect, 2),
                            tl.where(pending, new, 2), sem=SEM, scope="sys")
        pending = pending & (old != expect)


@triton.jit
def _signal_and_wait(sig_ptrs, rank, slot_base, WORLD: tl.constexpr, WORLD_PAD: tl.constexpr):
    """Barrier of this program with the same program on every peer (slot_base: this (phase,
    program)'s W slots; slot slot_base + r on a rank is written by rank r). One lane per peer, so
    the W - 1 signals travel at once; a sender retries while its peer has not consumed its last one."""
    tl.debug_barrier()               # this program's earlier stores happen before the release below
    peers = tl.arange(0, WORLD_PAD)
    is_peer = (peers < WORLD) & (peers != rank)
    my_sig = tl.load(sig_ptrs + rank).to(tl.pointer_type(tl.int32))
    scratch = my_sig + slot_base + rank                # this rank's own slot: nobody ever signals it
    peer_sig = tl.load(sig_ptrs + peers, mask=is_peer, other=0).to(tl.pointer_type(tl.int32))
    _cas_each_once(tl.where(is_peer, peer_sig + slot_base + rank, scratch), is_peer, scratch, 0, 1, "release")
    _cas_each_once(tl.where(is_peer, my_sig + slot_base + peers, scratch), is_peer, scratch, 1, 0, "acquire")
    tl.debug_barrier()               # every thread's later loads happen after the acquire


@triton.jit
def _all_reduce_add_rms_norm_kernel(
    out_ptr,            # (num_rows, hidden) contiguous: RMSNorm(new residual) * weight
    residual_out_ptr,   # (num_rows, hidden) contiguous: the new residual
    residual_ptr,       # (num_rows, hidden) contiguous: the residual before this sub-layer (same on all ranks)
    weight_ptr,         # (hidden,)
    buf_ptrs,           # (WORLD,) int64: address of each rank's partial (num_rows, hidden), mapped here
    sig_ptrs,           # (WORLD,) int64: address of each rank's int32 signal flags, mapped here
    rank,
    num_rows,
    hidden,
    eps,
    WORLD: tl.constexpr,
    WORLD_PAD: tl.constexpr,      # next power of 2 of WORLD
    BLOCK: tl.constexpr,          # next power of 2 of hidden
):
    # program p handles rows p, p + P, p + 2P, ...; row r belongs to rank (r * W) // num_rows
    # (contiguous blocks, so every program's rows spread over the ranks)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    dtype = residual_out_ptr.dtype.element_ty
    my_buf = tl.load(buf_ptrs + rank).to(tl.pointer_type(dtype))

    # phase 1: this program's rows that this rank owns: sum the ranks' partials, add the residual
    _signal_and_wait(sig_ptrs, rank, (pid * 2) * WORLD, WORLD, WORLD_PAD)
    for row in range(pid, num_rows, programs):        # (int32: the wrapper keeps rows * hidden < 2**31)
        if (row * WORLD) // num_rows == rank:
            acc = tl.zeros([BLOCK], tl.float32)
            for peer in tl.static_range(WORLD):
                buf = tl.load(buf_ptrs + peer).to(tl.pointer_type(dtype))
                acc += tl.load(buf + row * hidden + offs, mask=mask, other=0.0).to(tl.float32)
            reduced = acc.to(dtype).to(tl.float32)                      # the all-reduce's output
            residual = tl.load(residual_ptr + row * hidden + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(my_buf + row * hidden + offs, (reduced + residual).to(dtype), mask=mask)

    # phase 2: every row of this program from its owner: copy out the new residual and normalise it
    _signal_and_wait(sig_ptrs, rank, (pid * 2 + 1) * WORLD, WORLD, WORLD_PAD)
    for row in range(pid, num_rows, programs):
        owner = (row * WORLD) // num_rows
        buf = tl.load(buf_ptrs + owner).to(tl.pointer_type(dtype))
        summed = tl.load(buf + row * hidden + offs, mask=mask, other=0.0)
        tl.store(residual_out_ptr + row * hidden + offs, summed, mask=mask)
        normed = _rms_norm_row(summed.to(tl.float32), weight_ptr, offs, mask, hidden, eps,
                               dtype, out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * hidden + offs, normed, mask=mask)


def signal_slots(max_programs: int, world_size: int) -> int:
    """int32 flags a rank's signal buffer needs for grids of up to max_programs programs."""
    return 2 * max_programs * world_size


def all_reduce_add_rms_norm(
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    buf_ptrs: torch.Tensor,
    sig_ptrs: torch.Tensor,
    rank: int,
    world_size: int,
    max_programs: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(sum of partials + residual) * weight, sum of partials + residual), new tensors.

    residual: (rows, hidden), identical on every rank. buf_ptrs / sig_ptrs: (world_size,) int64
    device tensors with each rank's partial (rows, hidden) of residual's dtype and signal flags
    (`signal_slots(max_programs, world_size)` int32, zero before the first call). Overwrites this
    rank's owned rows of its partial. A collective: every rank calls it with the same shapes.
    """
    rows, hidden = residual.shape
    if not residual.is_contiguous() or weight.shape != (hidden,):
        raise ValueError(f"residual must be contiguous (rows, hidden) and weight ({hidden},), got "
                         f"{tuple(residual.shape)} / {tuple(weight.shape)}")
    if buf_ptrs.shape != (world_size,) or sig_ptrs.shape != (world_size,) or not 0 <= rank < world_size:
        raise ValueError(f"need one buffer and one signal address per rank ({world_size}) and 0 <= rank < "
                         f"world_size, got {tuple(buf_ptrs.shape)}, {tuple(sig_ptrs.shape)}, rank {rank}")
    if rows * hidden >= 2**31:
        raise ValueError(f"{rows} x {hidden} elements exceed the kernel's int32 offsets")
    out = torch.empty(rows, hidden, dtype=torch.promote_types(residual.dtype, weight.dtype), device=residual.device)
    residual_out = torch.empty_like(residual)
    if rows == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden)
    _all_reduce_add_rms_norm_kernel[(min(rows, max_programs),)](
        out, residual_out, residual, weight, buf_ptrs, sig_ptrs, rank, rows, hidden, eps,
        WORLD=world_size, WORLD_PAD=triton.next_power_of_2(world_size), BLOCK=block,
        num_warps=max(4, min(16, block // 512)))
    return out, residual_out


def all_reduce_add_rms_norm_ref(
    partials: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same with every rank's partial given: all-reduce (fp32 sum, rounded), then the fused
    residual add + RMSNorm of `norm.fused_add_rms_norm_ref`."""
    from .norm import fused_add_rms_norm_ref

    reduced = torch.stack([p.float() for p in partials]).sum(0).to(residual.dtype)
    return fused_add_rms_norm_ref(reduced, residual, weight, eps)
