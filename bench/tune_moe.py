"""Tunes the fused MoE kernels' block sizes for one expert shape on this GPU and writes them where
`kernels/moe_triton.get_config` reads them (kernels/moe_configs/E=..,N=..,H=..,device=<GPU>.json).

For each token count T (the table's key is M = T * top_k pairs) and each BLOCK_M that fits it, the
gate-up and the down GEMM are timed separately over their own tiles (BLOCK_N, BLOCK_K, GROUP_M,
num_warps, num_stages; both share BLOCK_M, the alignment's row tile); the BLOCK_M whose two best
tiles sum to the least time wins. Uniform random routing, bf16, medians of triton.testing.do_bench
(L2 flushed between runs). The winner is checked against the torch reference and timed end to end
next to the untuned `default_config`. Entries already in the file for other M are kept, and the
file is rewritten after every T, so a long search can be split over several runs (`--tokens`).

    python -m bench.tune_moe                                  # Qwen3-30B-A3B: E=128 N=768 H=2048 top-8
    python -m bench.tune_moe --experts 128 --n 2880 --hidden 2880 --top-k 4 --activation swigluoai --bias
    python -m bench.tune_moe --tokens 1,16,256 --space quick  # a few buckets, a smaller search

Under TRITON_INTERPRET=1 (no GPU) it runs the same loop with wall-clock timing: a check that the
search works, not a measurement (tests/bench/test_tune_moe.py).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

if __package__ in (None, ""):                       # run as `python bench/tune_moe.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import kernel_timer  # noqa: E402

DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SHARED_MEMORY_BYTES = 227 * 1024                    # per block on H100 / H200 (sm_90); A100 has 163 KiB
# (BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) per search space; small and large row tiles differ
SPACES = {
    "full": {"small": ([32, 64, 128], [64, 128, 256], [1, 4], [4, 8], [3, 4, 5]),
             "large": ([64, 128, 256], [32, 64, 128], [1, 8, 16], [4, 8], [2, 3, 4])},
    "quick": {"small": ([32, 64], [128, 256], [1], [4], [3, 4]),
              "large": ([64, 128], [64], [8], [4, 8], [3, 4])},
    "tiny": {"small": ([16, 32], [16], [1], [4], [2]), "large": ([16], [16], [4], [4], [2])},
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=128, help="experts on this rank (E_local)")
    parser.add_argument("--n", type=int, default=768, help="expert intermediate size on this rank (N)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (H)")
    parser.add_argument("--top-k", type=int, default=8, help="experts per token (K)")
    parser.add_argument("--activation", default="silu", choices=("silu", "swigluoai"))
    parser.add_argument("--bias", action="store_true", help="with w13 / w2 biases (gpt-oss)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)),
                        help="comma-separated token counts T; each becomes the table entry M = T * top_k")
    parser.add_argument("--space", default="full", choices=sorted(SPACES), help="search space size")
    parser.add_argument("--block-m", default="16,32,64,128", help="BLOCK_M candidates (powers of 2, >= 16)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the JSON goes (default: the folder get_config reads, kernels/moe_configs)")
    parser.add_argument("--device-name", default=None, help="the GPU name in the file name (default: this GPU's)")
    parser.add_argument("--warmup-ms", type=int, default=10, help="do_bench warmup budget per config")
    parser.add_argument("--rep-ms", type=int, default=40, help="do_bench measurement budget per config")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.tokens = sorted({int(t) for t in args.tokens.split(",") if t.strip()})
        args.block_m = sorted({int(b) for b in args.block_m.split(",") if b.strip()})
    except ValueError:
        parser.error(f"--tokens and --block-m take comma-separated integers, got {args.tokens!r} / {args.block_m!r}")
    if not args.tokens or min(args.tokens) < 1:
        parser.error(f"--tokens must be positive integers, got {args.tokens}")
    if not args.block_m or any(b < 16 or b & (b - 1) for b in args.block_m):
        parser.error(f"--block-m must be powers of 2 >= 16, got {args.block_m}")
    if args.n < 1 or args.hidden < 1 or args.experts < 1 or not 1 <= args.top_k <= args.experts:
        parser.error("--experts, --n, --hidden must be positive and 1 <= --top-k <= --experts")
    return args


def block_m_candidates(num_pairs: int, num_experts: int, allowed: list[int]) -> list[int]:
    """Row tiles worth trying: up to twice the average rows per expert (larger tiles are mostly padding)."""
    rows = max(1, num_pairs // num_experts)
    fitting = [b for b in allowed if b <= max(16, 2 * rows)]
    return fitting or [min(allowed)]


def tiles(block_m: int, space: str, n_out: int, k_dim: int, two_accumulators: bool, itemsize: int) -> Iterator:
    """The GemmTiles to try for one GEMM (n_out output columns, k_dim reduced) at this BLOCK_M,
    skipping those whose pipelined operand tiles exceed the shared memory."""
    from pagoda.kernels.moe_triton import GemmTile

    block_ns, block_ks, groups, warps, stages = SPACES[space]["small" if block_m <= 32 else "large"]
    seen = set()
    for bn, bk, group, warp, stage in itertools.product(block_ns, block_ks, groups, warps, stages):
        bn, bk = max(16, min(bn, _pow2(n_out))), max(16, min(bk, _pow2(k_dim)))   # what the launch would use
        per_stage = (block_m * bk + (2 if two_accumulators else 1) * bk * bn) * itemsize
        if per_stage * stage > SHARED_MEMORY_BYTES or (bn, bk, group, warp, stage) in seen:
            continue
        seen.add((bn, bk, group, warp, stage))
        yield GemmTile(bn, bk, group, warp, stage)


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def make_inputs(args: argparse.Namespace, tokens: int, device: torch.device, weights: dict) -> dict:
    dtype = getattr(torch, args.dtype)
    ids = torch.rand(tokens, args.experts, device=device).argsort(dim=1)[:, :args.top_k].to(torch.int32)
    return dict(hidden=torch.randn(tokens, args.hidden, device=device, dtype=dtype),
                topk_weights=torch.rand(tokens, args.top_k, device=device).softmax(dim=-1), topk_ids=ids, **weights)


def tune_bucket(args: argparse.Namespace, tokens: int, inputs: dict, bench: Callable) -> tuple:
    """The best MoeConfig for T = tokens and its two GEMMs' summed time (ms), with the number of
    configs that failed to compile or run (out of registers / shared memory)."""
    from pagoda.kernels import moe_triton
    from pagoda.kernels.moe_triton import MoeConfig

    top_k, num_pairs = args.top_k, tokens * args.top_k
    hidden, w13, w2 = inputs["hidden"], inputs["w13"], inputs["w2"]
    inter = torch.empty(num_pairs, args.n, dtype=hidden.dtype, device=hidden.device)
    out = torch.empty(num_pairs, args.hidden, dtype=hidden.dtype, device=hidden.device)
    weights = inputs["topk_weights"].reshape(-1).contiguous()
    best, failures = None, 0
    for block_m in block_m_candidates(num_pairs, args.experts, args.block_m):
        align = moe_triton.moe_align(inputs["topk_ids"], args.experts, block_m)
        choice = {}
        for gemm in ("gate_up", "down"):
            timings = []
            n_out, k_dim = (args.n, args.hidden) if gemm == "gate_up" else (args.hidden, args.n)
            for tile in tiles(block_m, args.space, n_out, k_dim, gemm == "gate_up", hidden.element_size()):
                if gemm == "gate_up":
                    fn = lambda tile=tile: moe_triton.gate_up(hidden, w13, inputs["w13_bias"], align, top_k,
                                                              args.activation, tile, inter)
                else:
                    fn = lambda tile=tile: moe_triton.down(inter, w2, inputs["w2_bias"], weights, align, tile, out)
                try:
                    timings.append((bench(fn), tile))
                except Exception as error:          # noqa: BLE001 - out of resources, compile failures
                    failures += 1
                    print(f"    skipped {gemm} block_m={block_m} {tile}: {type(error).__name__}", file=sys.stderr)
            if not timings:
                break
            choice[gemm] = min(timings, key=lambda pair: pair[0])
        if len(choice) == 2:
            total = choice["gate_up"][0] + choice["down"][0]
            if best is None or total < best[1]:
                best = (MoeConfig(block_m, choice["gate_up"][1], choice["down"][1]), total)
    if best is None:
        raise RuntimeError(f"no config ran for T={tokens}")
    return best[0], best[1], failures


def main(argv: Optional[list[str]] = None) -> Path:
    args = parse_args(argv)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpreted:
        sys.exit("bench.tune_moe needs a CUDA GPU (or TRITON_INTERPRET=1 to dry-run the search on CPU)")
    from pagoda.kernels import moe_triton, tuned_configs
    from pagoda.kernels.moe import fused_moe_ref

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    E, N, H = args.experts, args.n, args.hidden
    weights = dict(w13=torch.randn(E, 2 * N, H, device=device, dtype=dtype) * H ** -0.5,
                   w2=torch.randn(E, H, N, device=device, dtype=dtype) * N ** -0.5,
                   w13_bias=torch.randn(E, 2 * N, device=device, dtype=dtype) if args.bias else None,
                   w2_bias=torch.randn(E, H, device=device, dtype=dtype) if args.bias else None)
    seconds = kernel_timer(device, args.warmup_ms, args.rep_ms)
    bench = lambda fn: seconds(fn) * 1e3                    # noqa: E731 - milliseconds
    name = args.device_name or moe_triton.device_name(device)
    path = moe_triton.config_file(E, N, H, name, args.output_dir or moe_triton.CONFIG_DIR)
    table = json.loads(path.read_text()) if path.is_file() else {}
    print(f"tuning E={E} N={N} H={H} top-{args.top_k} {args.activation} {args.dtype} on {name} -> {path}")
    for tokens in args.tokens:
        inputs = make_inputs(args, tokens, device, weights)
        config, gemm_ms, failures = tune_bucket(args, tokens, inputs, bench)
        default = moe_triton.default_config(E, N, H, tokens * args.top_k, moe_triton.num_sms(device))
        tuned, untuned = (functools.partial(moe_triton.fused_moe, **inputs, activation=args.activation, config=c)
                          for c in (config, default))
        got, expected = tuned(), fused_moe_ref(**inputs, activation=args.activation)
        scale = expected.float().abs().max().item()
        error = (got.float() - expected.float()).abs().max().item()
        if error > 0.05 * scale + 1e-3:
            raise RuntimeError(f"T={tokens}: {config} is off the reference by {error:.3g} (scale {scale:.3g})")
        if device.type == "cuda":                # end to end as decode runs it: launch overhead excluded
            from bench.kernels import cuda_graphed

            tuned, untuned = cuda_graphed(tuned), cuda_graphed(untuned)
        tuned_ms, default_ms = bench(tuned), bench(untuned)
        table[str(tokens * args.top_k)] = config.to_json()
        print(f"  T={tokens:<5} M={tokens * args.top_k:<6} tuned {tuned_ms * 1e3:8.1f} us (GEMMs "
              f"{gemm_ms * 1e3:.1f})  default {default_ms * 1e3:8.1f} us  block_m {config.block_m}  "
              f"gate_up {config.gate_up}  down {config.down}" + (f"  ({failures} configs failed)" if failures else ""))
        tuned_configs.write_table(path, table)       # after every T: an interrupted run keeps its work
    moe_triton.get_config.cache_clear()
    print(f"wrote {len(args.tokens)} entries ({len(table)} in all) to {path}")
    return path


if __name__ == "__main__":
    main()
