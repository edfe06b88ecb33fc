"""The card's two ceilings, measured in the same run, and the ideal floor of a workload (bench/README.md).

Ceilings (`measure_ceilings`):
- copy bandwidth: a device-to-device copy of a 2 GiB buffer, counting bytes read + written, median
  of `repeats`;
- matmul rate: a bf16 8192 x 8192 x 8192 `torch.matmul`, 2 * 8192^3 FLOPs, median of 20.
Random data, never zeros (zeros run faster than real data on Hopper). On CUDA, timed with events.

The ideal floor (`ideal_floor`) is the time of a perfect schedule:

    all requests admitted at once
    prefill:  every prompt token at the matmul rate
              flops = 2 * params * prompt_tokens + attention (causal pairs)
              -> each request's first output token
    decode:   one step per further output position t = 1 .. max(output_len) - 1; live = requests with
              output_len > t; each step costs max(bytes / bandwidth, flops / matmul rate)
              bytes = all weights + KV of every live sequence ((prompt_len + t) tokens each)
              flops = live * 2 * params + attention (each live query x its prompt_len + t keys)
    requests leave as they finish.

Conventions, chosen to match the reference figures (W256, llama3-8b shape, H100 at 3,023 GB/s and
804 TFLOP/s: 14.1 s = ~10,000 output tok/s; batch-1 roofline 188 tok/s):
- "params" and "weights" are every parameter (`ModelShape.num_params`), the embedding table included,
  although a step reads only a few of its rows and it does no matmul; for llama3-8b that table is
  6.5% of the bytes, so an engine could in principle land a little above 100% of the floor.
- The prefill produces each request's first output token, so a request of output_len o needs o - 1
  decode steps.
- Attention FLOPs count q.k and p.v (4 * layers * heads * head_dim per query-key pair); softmax,
  norms, activations and sampling are free; the KV cache must hold everything at once (its size is
  not checked).

Shared prefix (`shared_prefix_len > 0`, the shared-prefix workload with prefix caching): the prefix
is prefilled once; its KV is still read once per sequence per decode step (pagoda's paged attention
reads each sequence's blocks; a cascade kernel that reads shared blocks once would go lower).

Mixture of experts (`ModelShape.num_experts > 0`): FLOPs use the active params only (2 * active
params per token: the dense parts and each token's top-k experts); a step over B tokens reads the
dense weights (everything but the experts, embedding and LM head whole as above) plus, per sparse
layer, the experts its tokens hit, E (1 - (1 - k / E)^B) of E experts in expectation under uniform
random routing (1 token: k experts; a large batch: all E). For a dense model both are the same as
above. The prefill stays arithmetic only (its FLOPs at the matmul rate), as above.

Sliding-window layers (`ModelShape.sliding_window`): a query attends to at most the last `window`
keys on those layers, so per sequence a decode step reads min(keys, window) tokens of their KV and
computes as many pairs; a prompt of p tokens has sum_i min(i, window) causal pairs there
(p (p + 1) / 2 when p <= window, else window (window + 1) / 2 + (p - window) window). The
full-attention layers read and compute everything as above.

    bytes = step weight bytes(live) + KV_full * keys + KV_sliding * windowed keys
    flops = 2 * active params * live + A_full * keys + A_sliding * windowed keys

Tensor parallelism (`tp > 1`): weights, KV heads and FLOPs split evenly over `tp` ranks (KV heads
replicate when there are fewer than ranks); every layer adds two all-reduces of the step's
activations, (tokens x hidden x dtype bytes) each, costing 2 (tp - 1) / tp x bytes / bus bandwidth
(the ring all-reduce's traffic; NCCL's `busbw` is defined so). They are added to the step's time:
in Megatron-style TP they sit on the critical path between layers. The LM head's gather is free.
"""
from __future__ import annotations

import math
import os
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .models import ModelShape
from .workloads import BenchRequest

COPY_BYTES = 2 << 30
MATMUL_SIZE = 8192


@dataclass(frozen=True)
class Ceilings:
    copy_bandwidth_Bps: float        # bytes read + written per second
    matmul_flops: float              # FLOP/s
    device_name: str = ""
    allreduce_bus_bandwidth_Bps: Optional[float] = None   # NCCL-style bus bandwidth, for tp > 1


@dataclass(frozen=True)
class FloorResult:
    seconds: float
    output_tok_per_s: float
    prefill_seconds: float
    decode_seconds: float
    num_decode_steps: int
    memory_bound_steps: int          # decode steps where bytes / bandwidth >= flops / matmul rate
    allreduce_seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def _median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median time of `fn()` over `repeats` calls after `warmup` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


@torch.inference_mode()
def measure_ceilings(
    device: torch.device | str = "cuda",
    copy_bytes: int = COPY_BYTES,
    matmul_size: int = MATMUL_SIZE,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 20,
) -> Ceilings:
    """Copy bandwidth (bytes read + written / s) and matmul FLOP/s on `device`, medians of `repeats`.

    Defaults are the benchmarks' (2 GiB copy, bf16 8192^3). On CPU pass small sizes and float32: the
    numbers are only indicative there.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    generator = torch.Generator(device=device)
    generator.manual_seed(0)

    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device)
    src.uniform_(-1.0, 1.0, generator=generator)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), device, warmup=3, repeats=repeats)
    copy_bandwidth = 2 * src.numel() * src.element_size() / copy_s
    del src, dst

    a = torch.empty(matmul_size, matmul_size, dtype=dtype, device=device).uniform_(-1, 1, generator=generator)
    b = torch.empty_like(a).uniform_(-1, 1, generator=generator)
    out = torch.empty_like(a)
    matmul_s = _median_seconds(lambda: torch.matmul(a, b, out=out), device, warmup=3, repeats=repeats)
    matmul_flops = 2 * matmul_size**3 / matmul_s
    del a, b, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    return Ceilings(copy_bandwidth_Bps=copy_bandwidth, matmul_flops=matmul_flops, device_name=name)


def _allreduce_worker(rank: int, world_size: int, init_method: str, nbytes: int, repeats: int,
                      use_cuda: bool, results) -> None:
    import torch.distributed as dist

    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method, rank=rank,
                            world_size=world_size)
    try:
        x = torch.ones(nbytes // 2, dtype=torch.bfloat16 if use_cuda else torch.float16, device=device)
        seconds = _median_seconds(lambda: dist.all_reduce(x), device, warmup=3, repeats=repeats)
        if rank == 0:
            results.put(seconds)
    finally:
        dist.destroy_process_group()


def measure_allreduce_bus_bandwidth(world_size: int, nbytes: int = 256 << 20, repeats: int = 10,
                                    use_cuda: Optional[bool] = None) -> float:
    """NCCL-style bus bandwidth (bytes/s) of an all-reduce of `nbytes` over `world_size` processes
    (one GPU each on CUDA, gloo on CPU): 2 (n - 1) / n x nbytes / median time.

    Spawns the processes itself, so call it before the engine takes the GPUs.
    """
    import torch.multiprocessing as mp

    if world_size < 2:
        raise ValueError(f"world_size must be >= 2 to measure an all-reduce, got {world_size!r}")
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if use_cuda and torch.cuda.device_count() < world_size:
        raise ValueError(f"all-reduce over {world_size} GPUs needs {world_size}, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")   # never NVLink multicast on shared hosts
    processes = [
        context.Process(target=_allreduce_worker,
                        args=(rank, world_size, f"tcp://127.0.0.1:{port}", nbytes, repeats, use_cuda, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    if any(process.exitcode != 0 for process in processes):
        raise RuntimeError(f"all-reduce measurement failed: exit codes {[p.exitcode for p in processes]}")
    seconds = results.get(timeout=10)
    return 2 * (world_size - 1) / world_size * nbytes / seconds


# --------------------------------------------------------------------------------------------------
# The ideal floor
# --------------------------------------------------------------------------------------------------


def ideal_floor(
    workload: Sequence[BenchRequest],
    model_shape: ModelShape,
    ceilings: Ceilings,
    tp: int = 1,
    allreduce_bus_bandwidth_Bps: Optional[float] = None,
    shared_prefix_len: int = 0,
) -> FloorResult:
    """The time of the perfect schedule for `workload` (see the module docstring for the model)."""
    if not workload:
        raise ValueError("workload must hold at least one request")
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp!r}")
    if tp > 1:
        allreduce_bus_bandwidth_Bps = allreduce_bus_bandwidth_Bps or ceilings.allreduce_bus_bandwidth_Bps
        if not allreduce_bus_bandwidth_Bps:
            raise ValueError("tp > 1 needs allreduce_bus_bandwidth_Bps (measure_allreduce_bus_bandwidth)")
    shape = model_shape
    prompt_lens = np.array([r.prompt_len for r in workload], dtype=np.float64)
    output_lens = np.array([r.output_len for r in workload], dtype=np.int64)
    if shared_prefix_len > prompt_lens.min():
        raise ValueError(f"shared_prefix_len={shared_prefix_len} exceeds the shortest prompt ({int(prompt_lens.min())})")

    params = float(shape.active_params)                     # = num_params for a dense model
    pair_flops = float(shape.attention_flops_per_pair_full)  # = the total without sliding layers
    window_pair_flops = float(shape.attention_flops_per_pair_sliding)
    window = shape.sliding_window if shape.sliding_layers else None
    # per rank
    weight_bytes = shape.weight_bytes / tp
    kv_heads_per_rank = max(shape.num_kv_heads / tp, 1.0)
    kv_bytes_per_token = shape.kv_bytes_per_token_full * kv_heads_per_rank / shape.num_kv_heads
    window_kv_bytes_per_token = shape.kv_bytes_per_token_sliding * kv_heads_per_rank / shape.num_kv_heads
    bandwidth, matmul_rate = ceilings.copy_bandwidth_Bps, ceilings.matmul_flops * shape.matmul_rate_factor

    def allreduce_seconds(num_tokens: float) -> float:
        if tp == 1:
            return 0.0
        nbytes = num_tokens * shape.hidden_size * shape.dtype_bytes
        return 2 * shape.num_layers * 2 * (tp - 1) / tp * nbytes / allreduce_bus_bandwidth_Bps

    # prefill: causal pairs are p (p + 1) / 2 per prompt (windowed: see _windowed_pairs); a shared
    # prefix is computed once
    prefill_tokens = prompt_lens.sum()
    pairs = (prompt_lens * (prompt_lens + 1) / 2).sum()
    window_pairs = _windowed_pairs(prompt_lens, window).sum() if window else 0.0
    if shared_prefix_len:
        prefix = float(shared_prefix_len)
        prefill_tokens -= (len(workload) - 1) * prefix
        pairs -= (len(workload) - 1) * prefix * (prefix + 1) / 2
        if window:
            window_pairs -= (len(workload) - 1) * float(_windowed_pairs(np.array([prefix]), window)[0])
    prefill_flops = (2 * params * prefill_tokens + pair_flops * pairs + window_pair_flops * window_pairs) / tp
    prefill_allreduce = allreduce_seconds(prefill_tokens)
    prefill_s = prefill_flops / matmul_rate + prefill_allreduce

    # decode: step t = 1 .. max_out - 1 serves the requests with output_len > t, each with p + t keys
    decode_s = total_allreduce = 0.0
    memory_bound = 0
    dense = shape.sparse_layers == 0
    num_steps = int(output_lens.max()) - 1
    order = np.argsort(output_lens)
    sorted_out, sorted_prompt = output_lens[order], prompt_lens[order]
    suffix_prompt_sum = np.cumsum(sorted_prompt[::-1])[::-1]      # sum of prompt_lens from index i on
    for t in range(1, num_steps + 1):
        first_live = int(np.searchsorted(sorted_out, t, side="right"))   # output_len > t
        live = len(sorted_out) - first_live
        context_tokens = suffix_prompt_sum[first_live] + t * live       # keys attended this step
        # the sliding layers' keys: each live sequence's, up to the window
        window_tokens = np.minimum(sorted_prompt[first_live:] + t, window).sum() if window else 0.0
        step_weight_bytes = weight_bytes if dense else shape.step_weight_bytes(live) / tp
        step_bytes = step_weight_bytes + kv_bytes_per_token * context_tokens + window_kv_bytes_per_token * window_tokens
        step_flops = (2 * params * live + pair_flops * context_tokens + window_pair_flops * window_tokens) / tp
        memory_s, compute_s = step_bytes / bandwidth, step_flops / matmul_rate
        memory_bound += int(memory_s >= compute_s)
        step_allreduce = allreduce_seconds(live)
        total_allreduce += step_allreduce
        decode_s += max(memory_s, compute_s) + step_allreduce

    seconds = float(prefill_s + decode_s)
    return FloorResult(
        seconds=seconds,
        output_tok_per_s=float(output_lens.sum()) / seconds,
        prefill_seconds=float(prefill_s),
        decode_seconds=float(decode_s),
        num_decode_steps=num_steps,
        memory_bound_steps=int(memory_bound),
        allreduce_seconds=float(prefill_allreduce + total_allreduce),
    )


def _windowed_pairs(prompt_lens: np.ndarray, window: int) -> np.ndarray:
    """Causal (query, key) pairs of each prompt on a layer whose queries see at most the last `window`
    keys: sum over positions i = 1 .. p of min(i, window)."""
    inside = np.minimum(prompt_lens, window)
    return inside * (inside + 1) / 2 + np.maximum(prompt_lens - window, 0) * window


def batch1_roofline(model_shape: ModelShape, ceilings: Ceilings, tp: int = 1) -> float:
    """Batch-1 decode tokens per second if every step only streams the weights a token reads:
    bandwidth / weight bytes (a mixture of experts: the dense weights + top-k experts per sparse layer,
    `ModelShape.step_weight_bytes(1)`)."""
    return ceilings.copy_bandwidth_Bps / (model_shape.step_weight_bytes(1) / tp)


def percent_of(achieved: float, floor: float) -> float:
    return 100.0 * achieved / floor if floor and math.isfinite(floor) else float("nan")
