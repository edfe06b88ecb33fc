"""Sweep the decode attention kernel's launch (tile width, warps, pipeline stages, context splits) on
a GPU at the shapes that matter for W256 and batch-1 decode, llama3-8b heads, for a bf16 or an FP8
KV cache.

    python -m bench.sweep_decode                       # bf16 cache
    python -m bench.sweep_decode --kv-cache-dtype fp8  # FP8 (e4m3) cache, per-layer scales

Every variant runs through the shipped wrapper (`decode_attention(..., num_splits=, launch=)`), so
what is timed is what the engine would launch. Reports achieved GB/s of K/V bytes read (the kernel's
compulsory traffic: 1 byte an element for FP8) per variant, best first per shape, and checks every
variant's output against the shipped launch's (`decode_launch` in kernels/attention_triton.py).
Without a GPU it runs a tiny space in the Triton interpreter: a check that the sweep works, not a
measurement.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import kernel_timer  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
SHAPES = "256x1024,128x2048,32x2048,1x512,1x4096"                  # batch x context
# (BLOCK_N, num_warps, num_stages, splits); splits beside the default count
SPACE = ((32, 64, 128), (2, 4, 8), (1, 2, 3, 4), (1, 2, 4, 8))
TINY_SPACE = ((16, 32), (4,), (1,), (1, 2))
KV_SCALE = 0.02                                                      # FP8: stored values of ~N(0, 2) read as ~N(0, 0.04)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="auto: a bf16 cache (the model dtype); fp8: float8_e4m3fn with per-layer scales")
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated BATCHxCONTEXT decode shapes")
    parser.add_argument("--top", type=int, default=6, help="variants printed per shape")
    args = parser.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes must be BATCHxCONTEXT pairs such as 256x1024, got {args.shapes!r}")
    if any(len(shape) != 2 or min(shape) < 1 for shape in args.shapes):
        parser.error(f"--shapes must be positive BATCHxCONTEXT pairs, got {args.shapes}")
    return args


def main(argv: Optional[list[str]] = None) -> list[dict]:
    from pagoda.kernels import attention_triton as at
    from pagoda.kernels.metadata import AttentionMetadata

    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seconds = kernel_timer(device)
    space = SPACE if device.type == "cuda" else TINY_SPACE
    fp8 = args.kv_cache_dtype == "fp8"
    cache_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    scales = dict(k_scale=torch.full((1,), KV_SCALE, device=device),
                  v_scale=torch.full((1,), KV_SCALE, device=device)) if fp8 else {}
    results = []
    for batch, ctx in args.shapes:
        blocks_per_seq = -(-ctx // BLOCK_SIZE)
        num_blocks = batch * blocks_per_seq + 8
        key_cache = (torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=device) * 2).to(cache_dtype)
        value_cache = (torch.randn(key_cache.shape, device=device) * 2).to(cache_dtype)
        block_tables = torch.randperm(num_blocks - 8, device=device)[: batch * blocks_per_seq].to(torch.int32)
        block_tables = block_tables.view(batch, blocks_per_seq)
        query = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        metadata = AttentionMetadata(
            slot_mapping=torch.zeros(batch, dtype=torch.int64, device=device),
            query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
            seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=device),
            block_tables=block_tables, max_query_len=1, max_seq_len=ctx)
        scale = HEAD_DIM ** -0.5
        out = torch.empty_like(query)

        def run(splits: Optional[int] = None, launch: Optional[at.DecodeLaunch] = None) -> torch.Tensor:
            at.decode_attention(query, key_cache, value_cache, metadata, scale, out=out, num_splits=splits,
                                launch=launch, **scales)
            return out

        reference = run().clone()
        kv_bytes = batch * ctx * KV_HEADS * HEAD_DIM * 2 * key_cache.element_size()
        default_splits = at.num_decode_splits(batch, KV_HEADS, ctx, device)
        shipped_s = seconds(run)
        rows = []
        block_ns, warps_, stages_, splits_ = space
        for block_n, warps, stages, splits in itertools.product(
                block_ns, warps_, stages_, sorted(set(splits_) | {default_splits})):
            if batch >= 128 and splits > 2:
                continue
            variant = at.DecodeLaunch(block_n, num_warps=warps, num_stages=stages)
            name = f"BN{block_n:<3} w{warps} s{stages} sp{splits}"
            try:
                error = (run(splits, variant).float() - reference.float()).abs().max().item()
                elapsed = seconds(lambda: run(splits, variant))
            except Exception as exc:  # noqa: BLE001 - a variant that fails to compile is skipped
                print(f"  {name}: failed {type(exc).__name__}", file=sys.stderr)
                continue
            rows.append(dict(launch=variant._asdict(), splits=splits, us=elapsed * 1e6,
                             gb_s=kv_bytes / elapsed / 1e9, max_diff=error, name=name))
        rows.sort(key=lambda row: row["us"])
        print(f"\n{args.kv_cache_dtype} cache, batch {batch} x ctx {ctx}: shipped launch "
              f"{tuple(at.decode_launch(HEAD_DIM, query.dtype))} splits {default_splits}: {shipped_s * 1e6:.1f} us = "
              f"{kv_bytes / shipped_s / 1e9:.0f} GB/s")
        for row in rows[:args.top]:
            print(f"  {row['name']}: {row['us']:8.1f} us  {row['gb_s']:7.0f} GB/s  max|diff| {row['max_diff']:.1e}")
        results.append(dict(batch=batch, context=ctx, kv_cache_dtype=args.kv_cache_dtype,
                            shipped_us=shipped_s * 1e6, variants=rows))
    return results


if __name__ == "__main__":
    main()
