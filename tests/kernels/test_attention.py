"""Triton paged attention vs the torch reference (`paged_attention_ref`, run in fp32 as the oracle).

Every batch is built the way the engine builds it: block ids shuffled across sequences, block tables
with spare columns, and every cache slot that no sequence owns (including the tail of each
sequence's last block and the blocks the spare columns point at) filled with NaN in the copy the
kernel reads, so any read past `seq_lens[i]` shows up as NaN. The reference reads a clean copy.

Tolerances (max abs / rel error vs the fp32 reference; outputs are O(1)):
  fp32 1e-4 (3xTF32 dots on GPU), fp16 4e-3, bf16 2.5e-2 (P is rounded to the input dtype before the
  P @ V MMA, and the CPU interpreter truncates instead of rounding to nearest).
CPU runs use the Triton interpreter, so sizes there are tiny; the `gpu` tests use llama3-8b shapes.

FP8 caches (`to_fp8`): the oracle is the fp32 reference over the dequantized caches (stored * scale);
the kernels read the very same e4m3 values, so the tolerances above hold unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch

from pagoda.kernels import attention_triton
from pagoda.kernels.attention import paged_attention
from pagoda.kernels.attention_ref import paged_attention_ref
from pagoda.kernels.backend import use_backend
from pagoda.kernels.kv_quant import dequantize, quantize
from pagoda.kernels.metadata import AttentionMetadata

ON_CUDA = torch.cuda.is_available()

TOLERANCES = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
HEADS = [(4, 4), (8, 2), (4, 1)]                    # (num_heads, num_kv_heads): MHA, GQA 4, MQA
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (query_len, seq_len) per sequence.
MIXED = [(1, 33), (20, 52), (13, 13)]               # decode token, chunk after a cached prefix, fresh prompt
PREFILL = [(17, 17), (40, 40), (5, 5)]
PREFIX_HIT = [(5, 37), (16, 64), (1, 16)]
DECODE = [(1, 1), (1, 70), (1, 33)]

gpu = pytest.mark.skipif(not ON_CUDA, reason="real sizes need CUDA")


@dataclasses.dataclass
class PagedBatch:
    query: torch.Tensor             # (num_tokens, num_heads, head_dim)
    key_cache: torch.Tensor         # (num_blocks, block_size, num_kv_heads, head_dim), unowned slots 0
    value_cache: torch.Tensor
    poisoned_key_cache: torch.Tensor    # the same, unowned slots NaN
    poisoned_value_cache: torch.Tensor
    metadata: AttentionMetadata
    scale: float
    k_scale: Optional[torch.Tensor] = None      # (1,) fp32 when the caches are FP8
    v_scale: Optional[torch.Tensor] = None


def make_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    spare_columns: int = 3,
) -> PagedBatch:
    blocks_per_seq = [-(-seq_len // block_size) for _, seq_len in seqs]
    num_blocks = sum(blocks_per_seq) + 2                       # 2 blocks nobody owns
    block_ids = torch.randperm(num_blocks)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.zeros(cache_shape, dtype=dtype, device=device)
    value_cache = torch.zeros_like(key_cache)
    poisoned_key_cache = torch.full_like(key_cache, float("nan"))
    poisoned_value_cache = torch.full_like(key_cache, float("nan"))
    # Spare columns point at an unowned (NaN) block: they must never be read.
    block_tables = torch.full((len(seqs), max(blocks_per_seq) + spare_columns), int(block_ids[-1]),
                              dtype=torch.int32)
    next_block = 0
    for i, (_, seq_len) in enumerate(seqs):
        ids = block_ids[next_block:next_block + blocks_per_seq[i]]
        next_block += blocks_per_seq[i]
        block_tables[i, :len(ids)] = ids.int()
        positions = torch.arange(seq_len)
        slots = (ids[positions // block_size] * block_size + positions % block_size).to(device)
        keys = torch.randn(seq_len, num_kv_heads, head_dim, device=device).to(dtype)
        values = torch.randn(seq_len, num_kv_heads, head_dim, device=device).to(dtype)
        for cache, new in ((key_cache, keys), (poisoned_key_cache, keys),
                           (value_cache, values), (poisoned_value_cache, values)):
            cache.view(-1, num_kv_heads, head_dim)[slots] = new
    query_lens = torch.tensor([q for q, _ in seqs], dtype=torch.int32)
    query_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    query_start_loc[1:] = query_lens.cumsum(0)
    num_tokens = int(query_start_loc[-1])
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(num_tokens, dtype=torch.int64, device=device),   # unused by attention
        query_start_loc=query_start_loc.to(device),
        seq_lens=torch.tensor([s for _, s in seqs], dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        max_query_len=int(query_lens.max()),
        max_seq_len=max(s for _, s in seqs),
    )
    query = torch.randn(num_tokens, num_heads, head_dim, device=device).to(dtype)
    return PagedBatch(query, key_cache, value_cache, poisoned_key_cache, poisoned_value_cache,
                      metadata, head_dim ** -0.5)


def to_fp8(batch: PagedBatch, k_scale: float, v_scale: float) -> PagedBatch:
    """The same batch with FP8 caches holding K / k_scale and V / v_scale (NaN slots stay NaN)."""
    device = batch.query.device
    ks, vs = torch.tensor([k_scale], device=device), torch.tensor([v_scale], device=device)
    return dataclasses.replace(
        batch, key_cache=quantize(batch.key_cache, ks), value_cache=quantize(batch.value_cache, vs),
        poisoned_key_cache=quantize(batch.poisoned_key_cache, ks),
        poisoned_value_cache=quantize(batch.poisoned_value_cache, vs), k_scale=ks, v_scale=vs)


def reference(batch: PagedBatch) -> torch.Tensor:
    if batch.k_scale is not None:           # FP8: the real values the cache stands for, in fp32
        key_cache = dequantize(batch.key_cache, batch.k_scale, torch.float32)
        value_cache = dequantize(batch.value_cache, batch.v_scale, torch.float32)
    else:
        key_cache, value_cache = batch.key_cache.float(), batch.value_cache.float()
    return paged_attention_ref(batch.query.float(), key_cache, value_cache, batch.metadata, batch.scale)


def assert_matches_reference(out: torch.Tensor, batch: PagedBatch) -> None:
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    tol = TOLERANCES[batch.query.dtype]
    torch.testing.assert_close(out.float(), reference(batch), atol=tol, rtol=tol)


def run_triton(batch: PagedBatch) -> torch.Tensor:
    return attention_triton.paged_attention(batch.query, batch.poisoned_key_cache, batch.poisoned_value_cache,
                                            batch.metadata, batch.scale, batch.k_scale, batch.v_scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_batch(head_dim, block_size, num_heads, num_kv_heads, dtype, device):
    batch = make_batch(MIXED, num_heads, num_kv_heads, head_dim, block_size, dtype, device)
    assert_matches_reference(run_triton(batch), batch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("head_dim,block_size", [(64, 32), (128, 16)])
def test_decode(head_dim, block_size, num_heads, num_kv_heads, dtype, device):
    batch = make_batch(DECODE, num_heads, num_kv_heads, head_dim, block_size, dtype, device)
    assert_matches_reference(run_triton(batch), batch)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_splits(num_splits, dtype, device):
    """Any split count gives the same answer, including splits that are empty for short sequences."""
    batch = make_batch(DECODE, 8, 2, 64, 16, dtype, device)
    out = torch.empty_like(batch.query)
    attention_triton.decode_attention(batch.query, batch.poisoned_key_cache, batch.poisoned_value_cache,
                                      batch.metadata, batch.scale, out=out, num_splits=num_splits)
    assert_matches_reference(out, batch)


def test_decode_uses_metadata_split_count(device, monkeypatch):
    """A split count fixed in the metadata (CUDA-graph capture) wins over the heuristic."""
    batch = make_batch(DECODE, 4, 2, 64, 16, torch.float32, device)
    batch.metadata.num_decode_splits = 3

    def heuristic_must_not_run(*args, **kwargs):
        raise AssertionError("num_decode_splits() called although metadata fixes the split count")

    monkeypatch.setattr(attention_triton, "num_decode_splits", heuristic_must_not_run)
    assert_matches_reference(run_triton(batch), batch)
    batch.metadata.num_decode_splits = 0
    with pytest.raises(ValueError, match="num_decode_splits"):
        run_triton(batch)


@pytest.mark.parametrize("seqs", [PREFILL, PREFIX_HIT], ids=["prefill", "prefix_hit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_prefill(seqs, num_heads, num_kv_heads, dtype, device):
    batch = make_batch(seqs, num_heads, num_kv_heads, 64, 16, dtype, device)
    assert_matches_reference(run_triton(batch), batch)


@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("head_dim", [32, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dim_not_64_or_128(seqs, head_dim, dtype, device):
    batch = make_batch(seqs, 8, 2, head_dim, 16, dtype, device)
    assert_matches_reference(run_triton(batch), batch)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_group_not_power_of_two(num_kv_heads, device):
    """6 query heads per KV head: a query tile holds a whole number of tokens plus padding rows."""
    batch = make_batch(MIXED, 6 * num_kv_heads, num_kv_heads, 64, 16, torch.float32, device)
    assert_matches_reference(run_triton(batch), batch)


@pytest.mark.parametrize("seqs", [[(2, 10), (0, 7), (3, 3)], [(1, 10), (0, 7), (1, 3)]], ids=["prefill", "decode"])
def test_sequence_without_new_tokens(seqs, device):
    """A sequence with no query tokens in this step writes nothing and does not disturb its neighbours."""
    batch = make_batch(seqs, 4, 2, 64, 16, torch.float32, device)
    assert_matches_reference(run_triton(batch), batch)


def test_long_prompt_many_tiles(device):
    """Several query tiles per sequence and several unmasked KV tiles before the diagonal."""
    batch = make_batch([(150, 200), (3, 3)], 2, 1, 32, 16, torch.float16, device)
    assert_matches_reference(run_triton(batch), batch)


def test_dispatch_uses_triton(device):
    batch = make_batch(MIXED, 8, 2, 64, 16, torch.float32, device)
    with use_backend("triton"):
        out = paged_attention(batch.query, batch.poisoned_key_cache, batch.poisoned_value_cache,
                              batch.metadata, batch.scale)
    assert_matches_reference(out, batch)


def test_num_decode_splits(device):
    splits = attention_triton.num_decode_splits
    assert splits(num_seqs=256, num_kv_heads=8, max_seq_len=8192, device=device) == 1   # batch fills the GPU
    assert splits(num_seqs=1, num_kv_heads=8, max_seq_len=100, device=device) == 1      # too short to split
    long_single = splits(num_seqs=1, num_kv_heads=8, max_seq_len=8192, device=device)
    assert 8 <= long_single <= 32 and long_single & (long_single - 1) == 0


def test_rejects_bad_inputs(device):
    batch = make_batch(MIXED, 8, 2, 64, 16, torch.float32, device)
    args = (batch.key_cache, batch.value_cache, batch.metadata, batch.scale)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        attention_triton.paged_attention(batch.query[:, :7], *args)
    with pytest.raises(ValueError, match="head_dim"):
        attention_triton.paged_attention(batch.query[..., :32], *args)
    with pytest.raises(ValueError, match="dtype"):
        attention_triton.paged_attention(batch.query.double(), *args)
    bad_metadata = dataclasses.replace(batch.metadata, seq_lens=batch.metadata.seq_lens[:2])
    with pytest.raises(ValueError, match="query_start_loc"):
        attention_triton.paged_attention(batch.query, batch.key_cache, batch.value_cache, bad_metadata, 0.1)
    with pytest.raises(ValueError, match="scale"):
        attention_triton.paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.metadata, -1.0)


# ---- FP8 caches ---------------------------------------------------------------------------------------------

FP8_SCALES = [(1.0, 1.0), (0.05, 0.3), (4.0, 0.5)]          # (k_scale, v_scale)


@pytest.mark.parametrize("k_scale,v_scale", FP8_SCALES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seqs", [MIXED, PREFIX_HIT, DECODE], ids=["mixed", "prefix_hit", "decode"])
def test_fp8_cache(seqs, dtype, k_scale, v_scale, device):
    batch = to_fp8(make_batch(seqs, 8, 2, 64, 16, dtype, device), k_scale, v_scale)
    assert_matches_reference(run_triton(batch), batch)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_decode_splits(num_splits, device):
    """v_scale is applied to each split's partial output before the merge."""
    batch = to_fp8(make_batch(DECODE, 8, 2, 64, 16, torch.bfloat16, device), 0.2, 2.5)
    out = torch.empty_like(batch.query)
    attention_triton.decode_attention(batch.query, batch.poisoned_key_cache, batch.poisoned_value_cache,
                                      batch.metadata, batch.scale, out=out, num_splits=num_splits,
                                      k_scale=batch.k_scale, v_scale=batch.v_scale)
    assert_matches_reference(out, batch)


@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
def test_fp8_scales_are_read(seqs, device):
    """The same FP8 bytes under other scales give another (correct) answer: the kernel reads them."""
    batch = to_fp8(make_batch(seqs, 4, 2, 64, 16, torch.float32, device), 0.5, 0.5)
    first = run_triton(batch)
    rescaled = dataclasses.replace(batch, k_scale=batch.k_scale * 3, v_scale=batch.v_scale * 2)
    second = run_triton(rescaled)
    assert_matches_reference(second, rescaled)
    assert (second - first).abs().max() > 0.1


@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
def test_fp8_reference_dequantizes(seqs, device):
    """The reference's own FP8 path equals attention over the explicitly dequantized caches."""
    batch = to_fp8(make_batch(seqs, 8, 2, 64, 16, torch.float32, device), 0.1, 0.7)
    out = paged_attention_ref(batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale,
                              batch.k_scale, batch.v_scale)
    torch.testing.assert_close(out, reference(batch), atol=1e-5, rtol=1e-5)
    with use_backend("triton"):
        dispatched = paged_attention(batch.query, batch.poisoned_key_cache, batch.poisoned_value_cache,
                                     batch.metadata, batch.scale, k_scale=batch.k_scale, v_scale=batch.v_scale)
    assert_matches_reference(dispatched, batch)


def test_fp8_rejects_missing_scales(device):
    batch = to_fp8(make_batch(MIXED, 4, 2, 64, 16, torch.float32, device), 1.0, 1.0)
    with pytest.raises(ValueError, match="k_scale"):
        attention_triton.paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.metadata,
                                         batch.scale)
    with pytest.raises(ValueError, match="v_scale"):
        paged_attention_ref(batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale,
                            batch.k_scale, batch.v_scale.double())
    with pytest.raises(ValueError, match="value_cache dtype"):
        attention_triton.paged_attention(batch.query, batch.key_cache, batch.value_cache.float(), batch.metadata,
                                         batch.scale, batch.k_scale, batch.v_scale)


# ---- real sizes (CUDA only): llama3-8b attention shapes --------------------------------------------------

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("seqs", [
    [(1, 4096), (1, 1), (1, 3000), (1, 17)] * 4,                             # decode, splits across the context
    [(1, 4000), (512, 2048), (1000, 1000), (64, 4096), (1, 33)],             # mixed, long prefixes
    [(2048, 2048), (777, 777)],                                             # prefill
], ids=["decode", "mixed", "prefill"])
def test_llama3_8b_shapes(seqs, block_size, device):
    batch = make_batch(seqs, 32, 8, 128, block_size, torch.bfloat16, device)
    assert_matches_reference(run_triton(batch), batch)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_large_other_dtypes(dtype, device):
    batch = make_batch([(1, 2500), (300, 1500), (200, 200)], 32, 8, 128, 16, dtype, device)
    assert_matches_reference(run_triton(batch), batch)


@gpu
@pytest.mark.gpu
def test_decode_cuda_graph_replay(device):
    """A decode step captured once stays correct when replayed with different context lengths."""
    seqs = [(1, 1000), (1, 3000), (1, 20), (1, 2048)]
    batch = make_batch(seqs, 32, 8, 128, 16, torch.bfloat16, device)
    metadata = batch.metadata
    metadata.num_decode_splits = 8                     # fixed at capture, as engine/worker/cuda_graphs.py does
    out = run_triton(batch)                                                  # compile outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_triton(batch)
    metadata.seq_lens.copy_(torch.tensor([500, 2999, 7, 1], dtype=torch.int32, device=device))
    metadata.max_seq_len = 2999
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(out, batch)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
def test_no_host_sync(seqs, device):
    """The launch path never waits for the GPU (no .item() / .tolist() / nonzero on device tensors)."""
    batch = make_batch(seqs, 32, 8, 128, 16, torch.bfloat16, device)
    run_triton(batch)                                                        # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run_triton(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_matches_reference(out, batch)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seqs", [
    [(1, 4096), (1, 1), (1, 3000), (1, 17)] * 4,
    [(1, 4000), (512, 2048), (1000, 1000), (64, 4096), (1, 33)],
], ids=["decode", "mixed"])
def test_fp8_llama3_8b_shapes(seqs, device):
    batch = to_fp8(make_batch(seqs, 32, 8, 128, 16, torch.bfloat16, device), 0.02, 0.015)
    assert_matches_reference(run_triton(batch), batch)


@gpu
@pytest.mark.gpu
def test_fp8_cuda_graph_reads_current_scales(device):
    """Scales changed in place after capture (calibration) are what a replay uses."""
    batch = to_fp8(make_batch([(1, 1000), (1, 20), (1, 2048)], 32, 8, 128, 16, torch.bfloat16, device), 1.0, 1.0)
    batch.metadata.num_decode_splits = 8
    out = run_triton(batch)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_triton(batch)
    batch.k_scale.fill_(0.5)
    batch.v_scale.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(out, batch)
