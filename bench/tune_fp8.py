"""Sweeps the small-M FP8 GEMM's tiles (kernels/fp8_triton.py) on this GPU, prints per layer shape and
M the fastest tiles next to what the heuristics (`small_m_config`) pick, with the weight bandwidth each
reaches, and writes the fastest into the GPU's tuned table (kernels/fp8_configs/<GPU name>.json,
{"N=..,K=..": {M: tiles}}), which `fp8_triton.pick_small_m_config` reads; other entries of the file are kept.

    python -m bench.tune_fp8                       # llama3-8b's four linear shapes, M = 1 and 16
    python -m bench.tune_fp8 --shapes 4096x14336 --m 1,2,4,8,16

Shapes nobody tuned keep the heuristics, so the table's lessons belong in `small_m_config` too.
Timing: triton.testing.do_bench medians (L2 flushed). Under TRITON_INTERPRET=1 it runs the same loop on
tiny sizes with wall-clock timing: a check that the sweep works, not a measurement
(tests/bench/test_tune_fp8.py, which writes to a temporary --output-dir).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import kernel_timer  # noqa: E402

LLAMA3_8B_SHAPES = "6144x4096,4096x4096,28672x4096,4096x14336"      # (N, K): qkv, o, gate_up, down
SPACE = dict(BLOCK_N=(16, 32, 64), BLOCK_K=(128, 256), SPLIT_K=(1, 2, 4, 8), num_warps=(4, 8), num_stages=(4,))
TINY_SPACE = dict(BLOCK_N=(16,), BLOCK_K=(32,), SPLIT_K=(1, 2), num_warps=(4,), num_stages=(1,))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=LLAMA3_8B_SHAPES, help="comma-separated NxK weight shapes")
    parser.add_argument("--m", default="1,16", help="comma-separated batch rows M (<= 16)")
    parser.add_argument("--top", type=int, default=3, help="fastest tiles printed per case")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the JSON goes (default: the folder the kernel reads, kernels/fp8_configs)")
    parser.add_argument("--device-name", default=None, help="the GPU name in the file name (default: this GPU's)")
    args = parser.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        args.m = [int(v) for v in args.m.split(",")]
    except ValueError:
        parser.error(f"--shapes must look like 4096x14336,... and --m like 1,16; got {args.shapes!r}, {args.m!r}")
    if any(len(s) != 2 or min(s) < 1 for s in args.shapes) or not all(1 <= m <= 16 for m in args.m):
        parser.error(f"shapes must be NxK with N, K >= 1 and M in 1..16, got {args.shapes}, {args.m}")
    return args


def main(argv: Optional[list[str]] = None) -> list[dict]:
    from pagoda.kernels import fp8_triton, tuned_configs
    from pagoda.kernels.fp8 import fp8_linear_ref, quantize_weight_per_channel

    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    space = SPACE if device.type == "cuda" else TINY_SPACE
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    measure = kernel_timer(device)
    results = []
    name = args.device_name or tuned_configs.device_name(device)
    path = fp8_triton.config_file(name, args.output_dir)
    table = json.loads(path.read_text()) if path.is_file() else {}
    print(f"device: {name}{'' if device.type == 'cuda' else ' (interpreter)'} -> {path}")
    for (n, k), m in itertools.product(args.shapes, args.m):
        w_q, w_scale = quantize_weight_per_channel(torch.randn(n, k, device=device, dtype=dtype))
        x = torch.randn(m, k, device=device, dtype=dtype)
        x_q, x_scale = fp8_triton.quantize(x)
        out = torch.empty(m, n, device=device, dtype=dtype)
        expected = fp8_linear_ref(x, w_q, w_scale)
        picked = fp8_triton.small_m_config(m, n, k, num_sms)
        timings = []
        configs = [dict(zip(space, values), BLOCK_M=16) for values in itertools.product(*space.values())]
        for config in [picked] + configs:
            try:
                run = lambda: fp8_triton._launch_gemm(out, x_q, x_scale, w_q, w_scale.reshape(-1), None, config)  # noqa: E731
                seconds = measure(run)
            except Exception as error:          # a tile that does not fit (shared memory, registers)
                print(f"  skipped {config}: {type(error).__name__}")
                continue
            if not torch.allclose(out.float(), expected.float(), rtol=5e-2, atol=5e-2 * expected.abs().max().item()):
                raise RuntimeError(f"tiles {config} give a wrong result for {n}x{k}, M={m}")
            timings.append((seconds, config))
        picked_s = timings[0][0]
        ranked = sorted(timings[1:], key=lambda t: t[0])
        gbps = lambda s: n * k / s / 1e9                                                                # noqa: E731
        print(f"{n}x{k} M={m}: small_m_config {picked_s * 1e6:.1f} us ({gbps(picked_s):.0f} GB/s) {picked}")
        for seconds, config in ranked[:args.top]:
            print(f"    {seconds * 1e6:7.1f} us ({gbps(seconds):5.0f} GB/s)  {config}")
        results.append(dict(n=n, k=k, m=m, picked_us=picked_s * 1e6, picked=picked,
                            best_us=ranked[0][0] * 1e6, best=ranked[0][1]))
        best = {key: ranked[0][1][key] for key in fp8_triton.CONFIG_KEYS}
        table.setdefault(fp8_triton.shape_key(n, k), {})[str(m)] = best
        tuned_configs.write_table(path, table)        # after every case: an interrupted run keeps its work
    fp8_triton._small_m.cache_clear()
    print(f"wrote {len(results)} entries to {path}")
    return results


if __name__ == "__main__":
    main()
