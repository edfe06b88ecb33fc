"""Decode attention at W256's own mix of context lengths, per context-split count, per TP shard.

    python -m bench.decode_splits [--steps 100 300 600]

At decode step s of W256 the live sequences are those with output_len > s, each with context
prompt_len + s. Each shape is one rank's share of heads: llama3-8b (32 query / 8 KV heads) at TP 1,
2, 4 and llama3-70b (64 / 8) at TP 4. Times the flash-decoding kernel (`decode_attention`,
CUDA-graph free, L2 flushed by do_bench) for splits 1, 2, 4, 8 and reports the best GB/s of K/V read;
`*` marks the split count the engine picks (`num_decode_splits`, with the graph's max_seq_len).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workloads import make_w256  # noqa: E402

SHAPES = {"8b tp1": (32, 8), "8b tp2": (16, 4), "8b tp4": (8, 2), "70b tp4": (16, 2)}
HEAD_DIM, BLOCK_SIZE, GRAPH_MAX_SEQ_LEN = 128, 16, 8192


def main() -> None:
    import triton

    from pagoda.kernels import attention_triton as at
    from pagoda.kernels.metadata import AttentionMetadata

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300, 600])
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--order", choices=("workload", "longest-first"), default="workload",
                        help="sequence order in the batch (the block scheduler launches programs in it)")
    parser.add_argument("--tune", action="store_true",
                        help="also time one-split launches over tile width x warps x stages, best 3 per shape")
    args = parser.parse_args()
    device = torch.device("cuda")
    requests = make_w256()
    print(f"{'shape':8} {'step':>5} {'seqs':>5} {'ctx tok':>8} " + " ".join(f"{f'sp{s} us':>10}" for s in args.splits)
          + "  best GB/s")
    for step in args.steps:
        lengths = [len(r.prompt_token_ids) + step for r in requests if r.output_len > step]
        if args.order == "longest-first":
            lengths.sort(reverse=True)
        batch = len(lengths)
        blocks = [-(-n // BLOCK_SIZE) for n in lengths]
        for name, (heads, kv_heads) in SHAPES.items():
            num_blocks = sum(blocks)
            key_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, HEAD_DIM, device=device, dtype=torch.bfloat16)
            value_cache = torch.randn_like(key_cache)
            ids = torch.randperm(num_blocks, device=device, dtype=torch.int32)
            table = torch.zeros(batch, max(blocks), dtype=torch.int32, device=device)
            offset = 0
            for i, n in enumerate(blocks):
                table[i, :n] = ids[offset:offset + n]
                offset += n
            metadata = AttentionMetadata(
                slot_mapping=torch.zeros(batch, dtype=torch.int64, device=device),
                query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
                seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
                block_tables=table, max_query_len=1, max_seq_len=max(lengths))
            query = torch.randn(batch, heads, HEAD_DIM, device=device, dtype=torch.bfloat16)
            kv_bytes = sum(lengths) * kv_heads * HEAD_DIM * 2 * 2
            picked = at.num_decode_splits(batch, kv_heads, GRAPH_MAX_SEQ_LEN, device)
            reference = torch.empty_like(query)
            at.decode_attention(query, key_cache, value_cache, metadata, HEAD_DIM ** -0.5, out=reference, num_splits=1)
            cells, best = [], 0.0
            for splits in args.splits:
                out = torch.empty_like(query)

                def launch(splits=splits, out=out):
                    at.decode_attention(query, key_cache, value_cache, metadata, HEAD_DIM ** -0.5, out=out,
                                        num_splits=splits)
                launch()
                error = (out.float() - reference.float()).abs().max().item()
                if error > 2e-2:
                    raise SystemExit(f"{name} step {step} splits {splits}: max|diff| {error} vs one split")
                ms = triton.testing.do_bench(launch, warmup=10, rep=50, return_mode="median")
                best = max(best, kv_bytes / ms / 1e6)
                cells.append(f"{ms * 1000:9.1f}{'*' if splits == picked else ' '}")
            print(f"{name:8} {step:5d} {batch:5d} {sum(lengths):8d} " + " ".join(cells) + f"  {best:8.0f}")
            if args.tune:
                print("    " + "; ".join(tune(at, query, key_cache, value_cache, metadata, kv_bytes)))


def tune(at, query, key_cache, value_cache, metadata, kv_bytes: float) -> list[str]:
    """One-split launches of the decode kernel over BLOCK_N x num_warps x num_stages (through the
    shipped wrapper, `decode_attention(..., launch=)`); the best three."""
    import itertools

    import triton

    results = []
    for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
        out = torch.empty_like(query)
        variant = at.DecodeLaunch(block_n, num_warps=warps, num_stages=stages)

        def launch():
            at.decode_attention(query, key_cache, value_cache, metadata, HEAD_DIM ** -0.5, out=out, num_splits=1,
                                launch=variant)
        try:
            ms = triton.testing.do_bench(launch, warmup=5, rep=30, return_mode="median")
        except Exception:  # noqa: BLE001 - a variant that does not compile (shared memory) is skipped
            continue
        results.append((ms, f"BN{block_n} w{warps} s{stages} {ms * 1000:.1f} us {kv_bytes / ms / 1e6:.0f} GB/s"))
    return [line for _, line in sorted(results)[:3]]

if __name__ == "__main__":
    main()
