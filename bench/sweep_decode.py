"""Sweep the decode attention kernel's launch parameters on a GPU (tile width, warps, pipeline
stages, context splits) at the shapes that matter for W256 and batch-1 decode, llama3-8b heads.

    python -m bench.sweep_decode

Reports achieved GB/s of K/V bytes read (the kernel's compulsory traffic) per variant, best first
per shape, and checks every variant's output against the shipped launch's.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import triton

    from pagoda.kernels import attention_triton as at
    from pagoda.kernels.metadata import AttentionMetadata

    device = torch.device("cuda")
    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    group = heads // kv_heads
    shapes = [(256, 1024), (128, 2048), (32, 2048), (1, 512), (1, 4096)]
    for batch, ctx in shapes:
        blocks_per_seq = ctx // block_size
        num_blocks = batch * blocks_per_seq + 8
        key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
        value_cache = torch.randn_like(key_cache)
        block_tables = torch.randperm(num_blocks - 8, device=device, dtype=torch.int32)[: batch * blocks_per_seq]
        block_tables = block_tables.view(batch, blocks_per_seq)
        query = torch.randn(batch, heads, head_dim, device=device, dtype=torch.bfloat16)
        metadata = AttentionMetadata(
            slot_mapping=torch.zeros(batch, dtype=torch.int64, device=device),
            query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
            seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=device),
            block_tables=block_tables, max_query_len=1, max_seq_len=ctx)
        scale = head_dim ** -0.5
        reference = torch.empty_like(query)
        at.decode_attention(query, key_cache, value_cache, metadata, scale, out=reference)
        kv_bytes = batch * ctx * kv_heads * head_dim * 2 * 2
        default_splits = at.num_decode_splits(batch, kv_heads, ctx, device)
        results = []
        for block_n, warps, stages, splits in itertools.product(
                (32, 64, 128), (2, 4, 8), (1, 2, 3, 4), sorted({1, 2, 4, 8, default_splits})):
            if batch >= 128 and splits > 2:
                continue
            out = torch.empty_like(query)

            def launch():
                if splits > 1:
                    partial_out = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=device)
                    partial_max = torch.empty(batch, heads, splits, dtype=torch.float32, device=device)
                    partial_sum = torch.empty_like(partial_max)
                else:
                    partial_out = partial_max = partial_sum = out
                at._decode_kernel[(batch, kv_heads, splits)](
                    out, partial_out, partial_max, partial_sum, query, key_cache, value_cache,
                    block_tables, metadata.seq_lens, metadata.query_start_loc, scale * at._LOG2E, heads,
                    query.stride(0), query.stride(1), out.stride(0), out.stride(1),
                    key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
                    GROUP=group, BLOCK_H=16, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, BLOCK_SIZE=block_size,
                    BLOCK_N=block_n, NUM_SPLITS=splits, UPCAST=False, DOT_PRECISION="tf32",
                    num_warps=warps, num_stages=stages)
                if splits > 1:
                    at._decode_reduce_kernel[(batch, heads)](
                        out, partial_out, partial_max, partial_sum, metadata.query_start_loc, heads,
                        out.stride(0), out.stride(1), HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim,
                        NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), num_warps=4)
            try:
                launch()
                error = (out.float() - reference.float()).abs().max().item()
                ms = triton.testing.do_bench(launch, warmup=10, rep=40, return_mode="median")
            except Exception as exc:  # noqa: BLE001 - a variant that fails to compile is skipped
                results.append((0.0, f"BN{block_n} w{warps} s{stages} sp{splits}: failed {type(exc).__name__}"))
                continue
            results.append((kv_bytes / ms / 1e6,
                            f"BN{block_n:<3} w{warps} s{stages} sp{splits}: {ms * 1000:8.1f} us  "
                            f"{kv_bytes / ms / 1e6:7.0f} GB/s  max|diff| {error:.1e}"))
        shipped = triton.testing.do_bench(
            lambda: at.decode_attention(query, key_cache, value_cache, metadata, scale, out=torch.empty_like(query)),
            warmup=10, rep=40, return_mode="median")
        print(f"\nbatch {batch} x ctx {ctx}: shipped launch {shipped * 1000:.1f} us = {kv_bytes / shipped / 1e6:.0f} GB/s "
              f"(splits {default_splits})")
        for _, line in sorted(results, reverse=True)[:6]:
            print("  " + line)


if __name__ == "__main__":
    main()
