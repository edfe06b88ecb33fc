"""Triton FP8 W8A8 linear layers. Same contract as `fp8.fp8_linear_ref`.

    x --quantize (one program per token)--> x_q (M, K) e4m3, x_scale (M, 1) float32
      M <= SMALL_M   our GEMM: each program streams BLOCK_N weight rows over all of K (or over one of
                     SPLIT_K ranges of it, the last range's program adding them: one launch), widens
                     the FP8 weights (and x_q) to fp16 in registers and multiplies on the tensor cores
                     with float32 accumulation; the scales, the bias and the cast are its epilogue.
                     Tiles from the GPU's tuned table (fp8_configs/<GPU>.json, bench/tune_fp8.py)
                     where it has the shape, else `small_m_config`
      M >  SMALL_M   torch._scaled_mm with row-wise scales (cuBLAS FP8 tensor cores) where the GPU
                     has them (compute capability >= 8.9) and the output is bf16; else our GEMM
                     with taller tiles

Why a GEMM of our own for small M: there every weight byte is read once for 2*M FLOPs, far below
any tensor-core ridge, so only the weight stream's bandwidth counts, and cuBLAS's FP8 kernels reach
about half the copy bandwidth at M=1. SMALL_M = 16: up to there one 16-row MMA tile holds the whole
batch, so the weight is read exactly once (the padding rows cost MMA issue slots the stream hides).

Why fp16 operands: every e4m3 value is exact in fp16 (as in bf16), so is the product of two, and
the sums are float32; e4m3 -> fp16 is one hardware conversion for two values (sm_89+), and the
Triton interpreter's dot mishandles bf16 operands. FP8 needs compute capability >= 8.9 on CUDA.

Quantization matches the reference bit for bit: float32 `amax / 448` and `x / scale` as IEEE
divisions (tl.div_rn), clamping to +-448, round-to-nearest-even to e4m3. NOTE: the Triton
interpreter's float32 -> fp8 conversion truncates, loses its mantissa carry and flushes subnormals,
so under TRITON_INTERPRET=1 the value is first rounded exactly in float32 arithmetic
(`e4m3_triton.round_to_e4m3`) and the cast only re-encodes it; a GPU uses its round-to-nearest-even cast.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import torch
import triton
import triton.language as tl

from . import split_k_triton, tuned_configs
from .e4m3_triton import round_to_e4m3
from .kv_quant import FP8_DTYPE

# NOTE: fp8.py's MIN_AMAX, restated rather than imported: fp8.py imports this module (its dispatch),
# and kernels/ keeps its imports one way. A test checks they agree.
MIN_AMAX = 1e-12

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SMALL_M = 16
# decided when the module is imported, as @triton.jit itself decides interpreter or compiler then
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_QUANT_BLOCK = 8192        # elements of one token the quantization kernel holds at a time
CONFIG_DIR = tuned_configs.config_dir("fp8")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")   # a GEMM launch's config


@triton.jit
def _quantize_kernel(
    out_ptr,        # (M, K) float8_e4m3fn contiguous
    scale_ptr,      # (M,) float32: the token's scale (the static one repeated, in static mode)
    x_ptr,          # (M, K), row stride stride_xm
    static_ptr,     # one float32 (STATIC) or unused
    stride_xm,
    K,
    BLOCK_K: tl.constexpr,
    STATIC: tl.constexpr,
    EXACT_ROUND: tl.constexpr,
    MIN_AMAX_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    if STATIC:
        scale = tl.load(static_ptr)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)          # elementwise; one reduction at the end
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), MIN_AMAX_C), 448.0)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(tl.div_rn(x, scale), -448.0, 448.0)
        if EXACT_ROUND:
            q = round_to_e4m3(q)
        tl.store(out_ptr + row * K + cols, q.to(tl.float8e4nv), mask=mask)


@triton.jit
def _fp8_gemm_kernel(
    out_ptr,        # (M, N) x's dtype, row stride stride_om
    x_ptr,          # (M, K) float8_e4m3fn contiguous
    x_scale_ptr,    # (M,) float32
    w_ptr,          # (N, K) float8_e4m3fn, row stride stride_wn
    w_scale_ptr,    # (N,) float32
    bias_ptr,       # (N,) or unused
    partial_ptr,    # with SPLIT: (splits, M, N) float32 scratch; else unused
    counter_ptr,    # with SPLIT: int32 arrival counters, one per (M, N) tile, 0 between calls; else unused
    M, N, K,
    k_tiles_per_split, splits,  # BLOCK_K steps per K range; ranges (grid dim 2), none of them empty
    stride_wn, stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,        # splits > 1 (a runtime count: one compiled kernel serves every split)
    HAS_BIAS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < M
    col_mask = cols < N
    k_start = pid_k * k_tiles_per_split * BLOCK_K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(K, k_start + k_tiles_per_split * BLOCK_K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)            # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None],
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)            # (BLOCK_K, BLOCK_N)
        acc = tl.dot(x.to(tl.float16), w.to(tl.float16), acc)
    # epilogue: acc * x_scale (per row) * w_scale (per column) (+ bias), cast; split: the last range's program
    split_k_triton.finish(acc, out_ptr, partial_ptr, counter_ptr, bias_ptr, x_scale_ptr, w_scale_ptr, rows, cols,
                          row_mask, col_mask, M, N, stride_om, pid_m * tl.num_programs(0) + pid_n, pid_k, splits,
                          HAS_BIAS, True, SPLIT)


# ---- launch configuration ------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _device_info(device_index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(device_index)
    return (props.major, props.minor), props.multi_processor_count


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def small_m_config(m: int, n: int, k: int, num_sms: int) -> dict:
    """Heuristic tiles for M <= SMALL_M (where the GPU has no tuned table entry): all M rows in one
    16-row tile, so every weight byte is read once.

    The weight stream needs many programs in flight on every SM (each keeps num_stages cp.async
    loads going), and a program that walks all of a long K is a long chain of dependent steps.
    BLOCK_N: the widest of 64, 32, 16 weight rows that still gives every SM about 4 programs.
    SPLIT_K: where even 16-row tiles give fewer programs than that (N = 4096: 256 programs on 132
    SMs), K is split into ranges of at least 1024 until there are ~4 programs an SM; the ranges'
    float32 partial sums are added by the last range's program (`split_k_triton.finish`).
    BLOCK_K: 256 bytes of each weight row per step."""
    block_n = 16
    for candidate in (64, 32):
        if triton.cdiv(n, candidate) >= 4 * num_sms:
            block_n = candidate
            break
    split_k = 1
    while (triton.cdiv(n, block_n) * split_k < 4 * num_sms and split_k < 16
           and k // (2 * split_k) >= 1024):
        split_k *= 2
    block_k = min(256, max(16, triton.next_power_of_2(k)))
    return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4, num_stages=4)


def shape_key(n: int, k: int) -> str:
    """A tuned table's key for one weight shape."""
    return f"N={n},K={k}"


def config_file(device_name: str, config_dir: Optional[Path] = None) -> Path:
    """Where one GPU model's tuned small-M tiles live: {shape_key: {M: config}}, a config being
    `small_m_config`'s dict (fp8_configs/<GPU>.json, written by bench/tune_fp8.py, or under `config_dir`)."""
    return tuned_configs.table_file("fp8", device_name, directory=config_dir)


def tuned_config(m: int, n: int, k: int, device_name: str, config_dir: Optional[Path] = None) -> Optional[dict]:
    """The table's tiles of the smallest tuned M >= m for this shape, or None: no file, shape or M that
    large, or an entry that is not a launch shape (the heuristics then decide)."""
    per_m = tuned_configs.read_table(config_file(device_name, config_dir)).get(shape_key(n, k))
    entry = tuned_configs.at_or_above(per_m, m)
    if entry is None or set(entry) != set(CONFIG_KEYS):
        return None
    config = {key: int(entry[key]) for key in CONFIG_KEYS}
    blocks = [config[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")]
    if any(b < 16 or b & (b - 1) for b in blocks) or min(config["SPLIT_K"], config["num_warps"],
                                                           config["num_stages"]) < 1:
        return None                             # tl.dot takes power-of-2 tiles of at least 16
    return config


@functools.lru_cache(maxsize=4096)
def _small_m(m: int, n: int, k: int, device: torch.device) -> tuple:
    config = tuned_config(m, n, k, tuned_configs.device_name(device))
    if config is None:
        num_sms = _device_info(_cuda_index(device))[1] if device.type == "cuda" else 132
        config = small_m_config(m, n, k, num_sms)
    return tuple(config.items())


def pick_small_m_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """The tiles for M <= SMALL_M: the GPU's tuned table's where it has the shape, else `small_m_config`'s.
    Cached per shape (a fresh dict each call: callers may change it)."""
    return dict(_small_m(m, n, k, device))


def large_m_config(m: int, n: int, k: int) -> dict:
    """Our GEMM where _scaled_mm cannot run (an fp16 or fp32 model, N or K not a multiple of 16)."""
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    return dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=1, num_warps=4, num_stages=3)


def scaled_mm_supported(x: torch.Tensor, n: int, k: int) -> bool:
    """cuBLAS row-wise-scaled FP8 GEMM: compute capability >= 8.9, bf16 output, K and N multiples of 16."""
    if not x.is_cuda or x.dtype != torch.bfloat16 or n % 16 or k % 16:
        return False
    return _device_info(_cuda_index(x.device))[0] >= (8, 9)


# ---- entry points --------------------------------------------------------------------------------

def quantize(x: torch.Tensor, input_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (x_q float8_e4m3fn (M, K), scale float32 (M, 1)): per token, or with the static
    scale (then repeated per token, as _scaled_mm's row-wise scales want)."""
    if x.dtype not in _DTYPES or x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be a (M, K) tensor of {_DTYPES} contiguous in its last dim, got "
                         f"{x.dtype} {tuple(x.shape)} strides {x.stride()}")
    if input_scale is not None and (input_scale.dtype != torch.float32 or input_scale.numel() != 1):
        raise ValueError(f"input_scale must be one float32 value, got {input_scale.dtype} {tuple(input_scale.shape)}")
    m, k = x.shape
    x_q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m > 0 and k > 0:
        # the whole token in one step up to 8192 features (a decode step's latency is one load)
        block_k = min(_MAX_QUANT_BLOCK, triton.next_power_of_2(k))
        static = input_scale is not None
        _quantize_kernel[(m,)](x_q, scale, x, input_scale if static else scale, x.stride(0), k,
                               BLOCK_K=block_k, STATIC=static, EXACT_ROUND=_INTERPRETED, MIN_AMAX_C=MIN_AMAX,
                               num_warps=max(1, min(16, block_k // 512)))
    return x_q, scale


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               input_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., K) -> (..., N) in x's dtype; written into `out` ((M, N), rows contiguous) when given."""
    if w_q.dtype != FP8_DTYPE or w_q.dim() != 2 or w_q.stride(1) != 1:
        raise ValueError(f"w_q must be a row-major (N, K) {FP8_DTYPE} tensor, got {w_q.dtype} {tuple(w_q.shape)}")
    if x.shape[-1] != w_q.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} input features, w_q {w_q.shape[1]}")
    n, k = w_q.shape
    if w_scale.dtype != torch.float32 or w_scale.numel() != n or not w_scale.is_contiguous():
        raise ValueError(f"w_scale must be {n} contiguous float32 values, got {w_scale.dtype} {tuple(w_scale.shape)}")
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    if out is not None and (tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.stride(1) != 1):
        raise ValueError(f"out must be a ({m}, {n}) {x.dtype} tensor with contiguous rows, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    result = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m > 0:
        x_q, x_scale = quantize(x2d, input_scale)
        w_scale = w_scale.reshape(-1)
        if m <= SMALL_M:
            _launch_gemm(result, x_q, x_scale, w_q, w_scale, bias, pick_small_m_config(m, n, k, x.device))
        elif scaled_mm_supported(x2d, n, k):
            _scaled_mm(x_q, x_scale, w_q, w_scale, bias, result)
        else:
            _launch_gemm(result, x_q, x_scale, w_q, w_scale, bias, large_m_config(m, n, k))
    return result.reshape(*x.shape[:-1], n)


def _launch_gemm(out: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor,
                 w_scale: torch.Tensor, bias: Optional[torch.Tensor], config: dict) -> None:
    """One launch of _fp8_gemm_kernel with `config` (CONFIG_KEYS); SPLIT_K > 1 splits K in the same launch
    (fewer splits where K has fewer BLOCK_K steps than that: every split must have a K range)."""
    m, k = x_q.shape
    n = w_q.shape[0]
    per_split, splits = split_k_triton.split_count(triton.cdiv(k, config["BLOCK_K"]), config["SPLIT_K"])
    tiles_n, tiles_m = triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(m, config["BLOCK_M"])
    if splits > 1:
        partial = split_k_triton.partials(out.device, splits, m, n)
        counters = split_k_triton.tile_counters(out.device, tiles_n * tiles_m)
    else:
        partial = counters = w_scale                    # unused
    launch = {key: value for key, value in config.items() if key != "SPLIT_K"}
    _fp8_gemm_kernel[(tiles_n, tiles_m, splits)](
        out, x_q, x_scale, w_q, w_scale, bias if bias is not None else w_scale, partial, counters,
        m, n, k, per_split, splits, w_q.stride(0), out.stride(0),
        SPLIT=splits > 1, HAS_BIAS=bias is not None, **launch)


def _scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """cuBLAS FP8 GEMM with row-wise scales: x_scale (M, 1) per token, w_scale (1, N) per channel.
    w_q (N, K) row-major is the column-major (K, N) operand cuBLAS wants, so `.t()` copies nothing."""
    scale_b = w_scale.reshape(1, -1)
    # NOTE: fast accumulation (no periodic promotion of the FP8 tensor-core partial sums) is Hopper's
    # faster FP8 GEMM; the products are of per-token / per-channel scaled values, as in vLLM's default
    if out.is_contiguous():
        torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=scale_b, out_dtype=out.dtype, out=out,
                         use_fast_accum=True)
    else:
        out.copy_(torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=scale_b, out_dtype=out.dtype,
                                   use_fast_accum=True))
    if bias is not None:
        # NOTE: added after the GEMM, in the output dtype: cuBLAS's row-wise-scaled FP8 GEMM does not
        # take a bias in every version, and an (M, N) add is small next to the GEMM.
        out.add_(bias)
    return out
