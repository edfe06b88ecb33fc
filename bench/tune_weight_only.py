"""Tunes the weight-only INT4/INT8 GEMM's launch configs (kernels/weight_only_triton.py) for small M on
this GPU and writes the best ones where `weight_only_triton.pick_config` reads them
(kernels/weight_only_configs/<GPU name>.json, one entry per weight shape and M).

    python -m bench.tune_weight_only                     # llama3-8b's four linears, INT4 g128, M = 1..16
    python -m bench.tune_weight_only --shapes 4096x14336 --m 1 --space quick

For each (N, K) and M it times every config of the space (the GEMV for M <= 8, the tensor-core GEMM
for M >= 2; block sizes, split-K, warps, stages), skipping configs that leave fewer programs than SMs,
and prints the best next to the untuned heuristic: time, weight GB/s, % of this GPU's copy bandwidth
and the speed-up over bf16 `F.linear` of the same shape. Timing as decode runs it: each call is
replayed from a CUDA graph that holds one call per copy of the weight, with enough copies (> 128 MiB)
that no call finds its weight in L2; medians of triton.testing.do_bench. Every config is checked
against the torch reference once. Kernels are compiled first by a pool of processes (Triton's disk
cache then serves the timing process), which keeps the whole default sweep to a few minutes.

Under TRITON_INTERPRET=1 (no GPU) it runs the same loop on the given (tiny) shapes with wall-clock
timing: a check that the sweep works, not a measurement (tests/bench/test_tune_weight_only.py).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

if __package__ in (None, ""):                       # run as `python bench/tune_weight_only.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import kernel_timer  # noqa: E402

LLAMA3_8B_SHAPES = "6144x4096,4096x4096,28672x4096,4096x14336"      # (N, K): qkv, o, gate_up, down
DEFAULT_M = "1,2,4,8,16"
ROTATION_BYTES = 128 << 20          # weight copies per graph: more than any L2
# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) per kernel and search space. The GEMV loads are
# not software-pipelined (no tensor-core operand), so its num_stages is fixed; split counts are a
# runtime argument (one compile serves 2, 4, 8).
SPACES = {
    "full": {"gemv": ((16, 32, 64), (128, 256), (1, 2, 4, 8), (4, 8), (1,)),
             "gemm": ((32, 64), (128, 256), (1, 2, 4, 8), (4,), (4,))},
    "quick": {"gemv": ((16, 32), (128, 256), (1, 2, 4), (4,), (1,)),
              "gemm": ((64,), (128,), (1, 2, 4), (4,), (4,))},
    "tiny": {"gemv": ((16,), (32, 64), (1, 2), (4,), (1,)),
             "gemm": ((16,), (32,), (1, 2), (4,), (1,))},
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=LLAMA3_8B_SHAPES, help="comma-separated NxK weight shapes")
    parser.add_argument("--m", default=DEFAULT_M, help="comma-separated batch rows M (1..64)")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 6, 8))
    parser.add_argument("--group-size", type=int, default=128, help="values per scale (GPTQ's g128 by default)")
    parser.add_argument("--space", default="full", choices=sorted(SPACES), help="search space size")
    parser.add_argument("--top", type=int, default=3, help="fastest configs printed per case")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the JSON goes (default: the folder pick_config reads, kernels/weight_only_configs)")
    parser.add_argument("--device-name", default=None, help="the GPU name in the file name (default: this GPU's)")
    parser.add_argument("--compile-workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes compiling kernels ahead of the timing (0: compile while timing)")
    parser.add_argument("--warmup-ms", type=int, default=5, help="do_bench warmup budget per config")
    parser.add_argument("--rep-ms", type=int, default=15, help="do_bench measurement budget per config")
    args = parser.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        args.m = sorted({int(v) for v in args.m.split(",")})
    except ValueError:
        parser.error(f"--shapes must look like 4096x14336,... and --m like 1,2,4; got {args.shapes!r}, {args.m!r}")
    if any(len(s) != 2 or min(s) < 1 for s in args.shapes) or not all(1 <= m <= 64 for m in args.m):
        parser.error(f"shapes must be NxK with N, K >= 1 and M in 1..64, got {args.shapes}, {args.m}")
    if args.group_size < 16 or any(k % args.group_size for _, k in args.shapes):
        parser.error(f"--group-size must be >= 16 and divide every K, got {args.group_size}")
    return args


def candidates(m: int, n: int, k: int, bits: int, group: int, space: str, sms: int) -> list:
    """The GemmConfigs worth timing for (M, N, K): the GEMV (M <= GEMV_MAX_M, BLOCK_M the next power of 2)
    and the 16-row tensor-core GEMM (M >= 2) whose tiles fit the groups, with at least 2 K tiles per split,
    and whose programs (output tiles x splits) cover every SM (where none does: those with the most)."""
    import triton

    from pagoda.kernels.weight_only_triton import GEMV_MAX_M, GemmConfig, _fit_block_k

    kinds = (["gemv"] if m <= GEMV_MAX_M else []) + (["gemm"] if m >= 2 else [])
    valid = []
    for kind in kinds:
        block_m = triton.next_power_of_2(m) if kind == "gemv" else max(16, triton.next_power_of_2(m))
        for block_n, block_k, split, warps, stages in itertools.product(*SPACES[space][kind]):
            if _fit_block_k(block_k, group, k) != block_k:
                continue
            if split > 1 and triton.cdiv(triton.cdiv(k, block_k), split) < 2:
                continue
            programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m) * split
            valid.append((programs, GemmConfig(block_m, block_n, block_k, split, warps, stages)))
    filling = [config for programs, config in valid if programs >= sms]
    most = max((programs for programs, _ in valid), default=0)
    return filling or [config for programs, config in valid if programs == most]


def make_weight(n: int, k: int, bits: int, group: int, device: torch.device, copies: int = 1) -> list:
    """`copies` random GPTQ-style weights: symmetric (zero 2^(bits-1)), float16 scales; 6 bits in the
    two planes of GGUF's Q6_K format."""
    from pagoda.kernels.weight_only import GroupQuantWeight

    weights = []
    for _ in range(copies):
        high = None
        if bits == 6:
            qweight = torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8)
            high = torch.randint(0, 256, (n, k // 4), device=device, dtype=torch.uint8)
        else:
            qweight = torch.randint(0, 256, (n, k * bits // 8), device=device, dtype=torch.uint8)
        scales = (torch.rand(n, k // group, device=device) * 2e-3 + 1e-3).half()
        weights.append(GroupQuantWeight(qweight, bits, group, scales, zero=1 << (bits - 1), qweight_high=high))
    return weights


def rotated(calls: list[Callable[[], object]], device: torch.device) -> Callable[[], object]:
    """One callable running every call of `calls` (one per weight copy): a CUDA graph replay on a GPU."""
    def run() -> None:
        for call in calls:
            call()
    if device.type != "cuda":
        return run
    from bench.kernels import cuda_graphed

    return cuda_graphed(lambda: (run(), torch.empty(0, device=device))[1])


def _compile_worker(job: tuple) -> int:
    """Runs each config once on tiny inputs of the same specialization (fills Triton's disk cache)."""
    n, k, m, bits, group, configs = job
    from pagoda.kernels import weight_only_triton

    device = torch.device("cuda")
    weight = make_weight(n, k, bits, group, device)[0]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    failed = 0
    for config in configs:
        try:
            weight_only_triton.weight_only_linear(x, weight, config=config)
        except Exception:                   # noqa: BLE001 - out of resources: skipped again when timed
            failed += 1
    return failed


def precompile(jobs: list[tuple], workers: int) -> None:
    if workers < 1 or not jobs:
        return
    import multiprocessing

    started = time.perf_counter()
    chunks = [job[:5] + (job[5][i::4],) for job in jobs for i in range(4)]      # 4 chunks per case
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_compile_worker, [c for c in chunks if c[5]])
    print(f"compiled {sum(len(job[5]) for job in jobs)} configs with {workers} processes in "
          f"{time.perf_counter() - started:.0f} s", flush=True)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpreted:
        sys.exit("bench.tune_weight_only needs a CUDA GPU (or TRITON_INTERPRET=1 to dry-run the sweep on CPU)")
    import torch.nn.functional as F

    from pagoda.kernels import tuned_configs
    from pagoda.kernels import weight_only_triton as wt
    from pagoda.kernels.weight_only import dequantize

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sms = wt.num_sms(device)
    name = args.device_name or tuned_configs.device_name(device)
    path = wt.config_file(name, args.output_dir or wt.CONFIG_DIR)
    table = json.loads(path.read_text()) if path.is_file() else {}
    bench = kernel_timer(device, args.warmup_ms, args.rep_ms)
    copy_bw = None
    if device.type == "cuda":
        from bench.ceilings import measure_ceilings

        copy_bw = measure_ceilings("cuda").copy_bandwidth_Bps
        cases = [(n, k, m, list(candidates(m, n, k, args.bits, args.group_size, args.space, sms)))
                 for (n, k), m in itertools.product(args.shapes, args.m)]
        precompile([(n, k, m, args.bits, args.group_size, configs) for n, k, m, configs in cases],
                   args.compile_workers)
    print(f"device: {name}  SMs {sms}  copy {copy_bw / 1e9 if copy_bw else 0:.0f} GB/s  -> {path}")
    header = f"{'shape':>12} {'M':>3}  {'best config':<44} {'us':>7} {'GB/s':>6} {'%copy':>5} {'vs bf16':>7}  heuristic us"
    print(header)
    results = []
    for (n, k), m in itertools.product(args.shapes, args.m):
        weight_bytes = n * k * args.bits // 8 + n * (k // args.group_size) * 2           # 6 bits: 4 + 2 planes
        copies = max(1, min(32, -(-ROTATION_BYTES // weight_bytes))) if device.type == "cuda" else 1
        weights = make_weight(n, k, args.bits, args.group_size, device, copies)
        x = torch.randn(m, k, device=device, dtype=dtype)
        outs = [torch.empty(m, n, device=device, dtype=dtype) for _ in weights]
        expected = F.linear(x.float(), dequantize(weights[0])).to(dtype)
        tolerance = 2e-2 * expected.float().abs().max().item()

        def timed(config) -> float:
            got = wt.weight_only_linear(x, weights[0], out=outs[0], config=config)
            error = (got.float() - expected.float()).abs().max().item()
            if error > tolerance:
                raise RuntimeError(f"{config} is off the reference by {error:.3g} for {n}x{k}, M={m}")
            return bench(rotated([lambda w=w, o=o: wt.weight_only_linear(x, w, out=o, config=config)
                                  for w, o in zip(weights, outs)], device)) / copies

        timings, failures = [], 0
        for config in candidates(m, n, k, args.bits, args.group_size, args.space, sms):
            try:
                timings.append((timed(config), config))
            except RuntimeError:
                raise
            except Exception as error:      # noqa: BLE001 - a config that does not fit (registers, shared memory)
                failures += 1
                print(f"    skipped {config}: {type(error).__name__}", file=sys.stderr)
        if not timings:
            raise RuntimeError(f"no config ran for {n}x{k}, M={m}")
        timings.sort(key=lambda t: t[0])
        best_s, best = timings[0]
        heuristic = wt.default_config(m, n, k, args.bits, args.group_size, sms)
        heuristic_s = timed(heuristic)
        bf16_s = None
        if device.type == "cuda":
            dense = [dequantize(w).to(dtype) for w in weights[:max(1, -(-ROTATION_BYTES // (n * k * 2)))]]
            bf16_s = bench(rotated([lambda d=d: F.linear(x, d) for d in dense], device)) / len(dense)
            del dense
        gbps = weight_bytes / best_s / 1e9
        pct = f"{100 * gbps * 1e9 / copy_bw:.0f}%" if copy_bw else "-"
        speedup = f"{bf16_s / best_s:.2f}x" if bf16_s else "-"
        described = f"{'gemv' if best.gemv else 'gemm'} m{best.block_m} n{best.block_n} k{best.block_k} " \
                    f"s{best.split_k} w{best.num_warps} st{best.num_stages}"
        print(f"{n:>6}x{k:<5} {m:>3}  {described:<44} {best_s * 1e6:7.1f} {gbps:6.0f} {pct:>5} {speedup:>7}  "
              f"{heuristic_s * 1e6:.1f}" + (f"  ({failures} failed)" if failures else ""), flush=True)
        for seconds, config in timings[1:args.top]:
            print(f"{'':>17}  {str(config):<60} {seconds * 1e6:7.1f}")
        table.setdefault(wt.shape_key(n, k, args.bits, args.group_size), {})[str(m)] = wt.config_json(best)
        results.append(dict(n=n, k=k, m=m, best=wt.config_json(best), best_us=best_s * 1e6,
                            heuristic_us=heuristic_s * 1e6, bf16_us=bf16_s * 1e6 if bf16_s else None,
                            gbps=gbps, configs=len(timings)))
        del weights, outs
        tuned_configs.write_table(path, table)        # after every case: an interrupted run keeps its work
    wt._pick.cache_clear()
    print(f"wrote {len(results)} entries to {path}")
    return results


if __name__ == "__main__":
    main()
