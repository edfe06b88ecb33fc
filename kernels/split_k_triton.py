"""Split-K in one launch, shared by the small-M GEMMs (weight-only, FP8): the epilogue each program
calls with its float32 sums, and the scratch it goes through.

Where a GEMM splits K over several programs per output tile, each split stores its partial sums in a
float32 scratch buffer (splits, M, N) and bumps the tile's arrival counter (acquire-release); the split
that arrives last adds the partials in split order (the same sum on every run, whichever split is
last), applies the epilogue (per-row and per-column scales where the GEMM has them, the bias, the cast)
and writes the output, then sets its counter back to 0. No zero-filled accumulator, no second kernel:
inside a CUDA graph every extra kernel costs microseconds, and a decode step runs several GEMMs per layer.

The counters are zeroed once, when allocated, and every launch leaves them at 0. Every launched split
must arrive: the launchers size the split so that no K range is empty.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store(acc, out_ptr, stride_om, row_scale_ptr, col_scale_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n,
           HAS_BIAS: tl.constexpr, HAS_SCALES: tl.constexpr):
    """out = acc (* row_scale per row * col_scale per column) (+ bias), cast to the output's dtype."""
    if HAS_SCALES:
        row_scale = tl.load(row_scale_ptr + offs_m, mask=mask_m, other=0.0)
        col_scale = tl.load(col_scale_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc * row_scale[:, None] * col_scale[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def finish(acc, out_ptr, partial_ptr, counter_ptr, bias_ptr, row_scale_ptr, col_scale_ptr,
           offs_m, offs_n, mask_m, mask_n, M, N, stride_om, tile_id, pid_k, splits,
           HAS_BIAS: tl.constexpr, HAS_SCALES: tl.constexpr, SPLIT: tl.constexpr):
    """Writes the (BLOCK_M, BLOCK_N) float32 sums `acc` of rows offs_m, columns offs_n to the output
    (row stride stride_om), through the epilogue; with SPLIT, through the partial buffer (splits, M, N)
    and the counter of `tile_id`, the last split of the tile adding them (module docstring)."""
    if not SPLIT:
        _store(acc, out_ptr, stride_om, row_scale_ptr, col_scale_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n,
               HAS_BIAS, HAS_SCALES)
    else:
        out_mask = mask_m[:, None] & mask_n[None, :]
        part_offs = offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial_ptr + pid_k * M * N + part_offs, acc, mask=out_mask)
        # NOTE: every thread's partial is stored before one thread's acquire-release increment
        # publishes them; the last split reads them past L1 (.cg), which may hold an older call's lines
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            total = tl.zeros(acc.shape, tl.float32)
            for split in range(splits):                   # in split order: the same sum on every run
                total += tl.load(partial_ptr + split * M * N + part_offs, mask=out_mask, other=0.0,
                                 cache_modifier=".cg")
            _store(total, out_ptr, stride_om, row_scale_ptr, col_scale_ptr, bias_ptr, offs_m, offs_n, mask_m,
                   mask_n, HAS_BIAS, HAS_SCALES)
            tl.atomic_xchg(counter_ptr + tile_id, 0)      # ready for the next call


def split_count(k_tiles: int, split_k: int) -> tuple[int, int]:
    """(K tiles per split, splits) for `split_k` requested splits of `k_tiles` K tiles: the splits
    without an empty K range (each launched split must arrive at its tile's counter)."""
    per_split = triton.cdiv(k_tiles, max(1, split_k))
    return per_split, triton.cdiv(k_tiles, per_split)


# ---- scratch, once per device --------------------------------------------------------------------

_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}
_PARTIALS: dict[torch.device, list[torch.Tensor]] = {}


def _held(buffers: dict[torch.device, list[torch.Tensor]], device: torch.device, numel: int, dtype: torch.dtype,
          minimum: int) -> torch.Tensor:
    # NOTE: one set per device, shared by every split GEMM: the engine runs its forward pass on one
    # stream, so no two split GEMMs overlap (GEMMs on concurrent streams would need a set each).
    # Grown by replacement; older sets stay alive because CUDA graphs captured earlier point at them.
    held = buffers.setdefault(device, [])
    if not held or held[-1].numel() < numel:
        held.append(torch.zeros(max(numel, minimum), dtype=dtype, device=device))
    return held[-1]


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-output-tile arrival counters (int32), all 0 between calls (the last split of each tile resets its own)."""
    return _held(_COUNTERS, device, tiles, torch.int32, 1 << 14)


def partials(device: torch.device, splits: int, m: int, n: int) -> torch.Tensor:
    """The float32 (splits, M, N) partial-sum buffer, a view of the device's scratch (contents undefined)."""
    return _held(_PARTIALS, device, splits * m * n, torch.float32, 1 << 20)[:splits * m * n].view(splits, m, n)
