"""Kernel benchmark: pagoda's Triton kernels vs their torch references at llama3-8b sizes.

First measures this GPU's ceilings in the same run with `bench.ceilings.measure_ceilings` (the
same definition every pagoda benchmark uses: device-to-device copy of a 2 GiB buffer counting read +
write bytes; bf16 8192^3 matmul; medians of 20), then times each kernel and reports achieved GB/s
(memory-bound kernels) or TFLOP/s (prefill attention) as a percentage of the matching ceiling, next
to the torch reference's time.

    python -m bench.kernels                       # everything (from the repo root)
    python -m bench.kernels --only attention      # one family: attention, cache, norm, rotary, activation,
                                                  # token_bitmask, weight_only, fp8, moe
    python -m bench.kernels --no-reference        # skip the (slow, memory-hungry) torch references

Shapes: hidden 4096, 32 query heads, 8 KV heads, head dim 128, intermediate 14336, KV block 16, bf16.
Decode: batch 1 / 32 / 256 x context 512 / 2k / 8k. Prefill: 8 x 512 fresh prompts (and 1 x 4096).
A windowed layer with sinks (window 1024): decode 32 x 8k and prefill 1 x 4096 count only the window's work.
FP8 (e4m3) KV cache: decode 32 x 2k and 256 x 1k / 2k, prefill 8 x 512, and the cache write, at 1 byte an element.
Norm / rotary / silu / cache write: 256 and 8192 tokens. Weight-only (W4A16 g128 vs bf16): qkv, o,
gate_up and down at M = 1 / 16 / 64 / 256, and GGUF Q6_K's 6-bit format at down, M = 1 / 16 / 256; FP8
W8A8 vs bf16 likewise. Times are medians of triton.testing.do_bench,
which flushes L2 between runs, so memory-bound numbers are DRAM numbers.
MoE (fused_moe at Qwen3-30B-A3B's experts: 128 experts, top-8, hidden 2048, expert intermediate 768,
uniform random routing): decode T = 1 / 16 / 64 / 128 / 256 reports the weight bandwidth, bytes of the
experts hit (each hit expert's w13 and w2 once) / time; prefill T = 2048 (every expert hit,
compute-bound) reports TFLOP/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

if __package__ in (None, ""):                       # run as `python bench/kernels.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.ceilings import Ceilings, measure_ceilings  # noqa: E402

HIDDEN, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, INTERMEDIATE, BLOCK_SIZE = 4096, 32, 8, 128, 14336, 16
DTYPE = torch.bfloat16
FAMILIES = ("attention", "cache", "norm", "rotary", "activation", "token_bitmask", "weight_only", "fp8", "moe")
VOCAB = 128256                     # llama3's vocabulary (the grammar mask's row length)


@dataclasses.dataclass
class Case:
    family: str
    name: str
    shape: str
    triton_fn: Callable[[], object]
    torch_fn: Callable[[], object] | None
    bytes_moved: float = 0.0          # memory-bound: bytes read + written by an ideal kernel
    flops: float = 0.0                # compute-bound: useful FLOPs


# ---- cases ---------------------------------------------------------------------------------------------

def paged_batch(seqs: list[tuple[int, int]], num_blocks_alloc: int | None = None, cache_dtype: torch.dtype = DTYPE):
    """(query, key_cache, value_cache, metadata) for (query_len, seq_len) sequences on shuffled blocks;
    an FP8 cache holds N(0, 1) values (read with scales of 1)."""
    from pagoda.kernels.metadata import AttentionMetadata

    blocks_per_seq = [-(-seq_len // BLOCK_SIZE) for _, seq_len in seqs]
    num_blocks = num_blocks_alloc or sum(blocks_per_seq)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.empty(shape, device="cuda", dtype=DTYPE).normal_().to(cache_dtype)
    value_cache = torch.empty(shape, device="cuda", dtype=DTYPE).normal_().to(cache_dtype)
    block_ids = torch.randperm(num_blocks, device="cuda", dtype=torch.int64)[:sum(blocks_per_seq)].int()
    block_tables = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.int32, device="cuda")
    offset = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = block_ids[offset:offset + n]
        offset += n
    query_lens = torch.tensor([q for q, _ in seqs], dtype=torch.int32)
    query_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    query_start_loc[1:] = query_lens.cumsum(0)
    num_tokens = int(query_start_loc[-1])
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(num_tokens, dtype=torch.int64, device="cuda"),
        query_start_loc=query_start_loc.cuda(),
        seq_lens=torch.tensor([s for _, s in seqs], dtype=torch.int32, device="cuda"),
        block_tables=block_tables,
        max_query_len=int(query_lens.max()),
        max_seq_len=max(s for _, s in seqs),
    )
    query = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    return query, key_cache, value_cache, metadata


def attention_cases() -> Iterator[Case]:
    from pagoda.kernels import attention_triton
    from pagoda.kernels.attention import paged_attention_ref

    scale = HEAD_DIM ** -0.5
    kv_bytes_per_token = 2 * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize        # K and V
    for batch in (1, 32, 256):
        for context in (512, 2048, 8192):
            q, kc, vc, md = paged_batch([(1, context)] * batch)
            splits = attention_triton.num_decode_splits(batch, NUM_KV_HEADS, context, q.device)
            yield Case(
                "attention", "decode", f"batch {batch} ctx {context} ({splits} splits)",
                lambda q=q, kc=kc, vc=vc, md=md: attention_triton.paged_attention(q, kc, vc, md, scale),
                lambda q=q, kc=kc, vc=vc, md=md: paged_attention_ref(q, kc, vc, md, scale),
                bytes_moved=batch * context * kv_bytes_per_token + 2 * q.numel() * q.element_size(),
            )
    for num_seqs, prompt in ((8, 512), (1, 4096)):
        q, kc, vc, md = paged_batch([(prompt, prompt)] * num_seqs)
        causal_pairs = num_seqs * prompt * (prompt + 1) / 2
        yield Case(
            "attention", "prefill", f"{num_seqs} x {prompt} tokens",
            lambda q=q, kc=kc, vc=vc, md=md: attention_triton.paged_attention(q, kc, vc, md, scale),
            lambda q=q, kc=kc, vc=vc, md=md: paged_attention_ref(q, kc, vc, md, scale),
            flops=4 * causal_pairs * NUM_HEADS * HEAD_DIM,                     # QK^T and PV, 2 FLOPs per MAC
        )
    # an FP8 (e4m3) KV cache: half the bytes of bf16 per token, so the same GB/s is half the time
    fp8_scales = dict(k_scale=torch.ones(1, device="cuda"), v_scale=torch.ones(1, device="cuda"))
    for batch, context in ((32, 2048), (256, 1024), (256, 2048)):
        q, kc, vc, md = paged_batch([(1, context)] * batch, cache_dtype=torch.float8_e4m3fn)
        yield Case(
            "attention", "decode fp8 kv", f"batch {batch} ctx {context}",
            lambda q=q, kc=kc, vc=vc, md=md: attention_triton.paged_attention(q, kc, vc, md, scale, **fp8_scales),
            lambda q=q, kc=kc, vc=vc, md=md: paged_attention_ref(q, kc, vc, md, scale, **fp8_scales),
            bytes_moved=batch * context * kv_bytes_per_token // DTYPE.itemsize + 2 * q.numel() * q.element_size(),
        )
    q, kc, vc, md = paged_batch([(512, 512)] * 8, cache_dtype=torch.float8_e4m3fn)
    yield Case(
        "attention", "prefill fp8 kv", "8 x 512 tokens",
        lambda q=q, kc=kc, vc=vc, md=md: attention_triton.paged_attention(q, kc, vc, md, scale, **fp8_scales),
        lambda q=q, kc=kc, vc=vc, md=md: paged_attention_ref(q, kc, vc, md, scale, **fp8_scales),
        flops=4 * 8 * 512 * 513 / 2 * NUM_HEADS * HEAD_DIM,
    )
    # a windowed layer with sinks (gpt-oss / Mistral style, window 1024): only the window is read or computed
    window = 1024
    features = dict(sliding_window=window, sinks=torch.zeros(NUM_HEADS, device="cuda"))
    q, kc, vc, md = paged_batch([(1, 8192)] * 32)
    yield Case(
        "attention", "decode window", f"batch 32 ctx 8192 window {window}",
        lambda q=q, kc=kc, vc=vc, md=md: attention_triton.paged_attention(q, kc, vc, md, scale, **features),
        lambda q=q, kc=kc, vc=vc, md=md: paged_attention_ref(q, kc, vc, md, scale, **features),
        bytes_moved=32 * window * kv_bytes_per_token + 2 * q.numel() * q.element_size(),
    )
    q, kc, vc, md = paged_batch([(4096, 4096)])
    yield Case(
        "attention", "prefill window", f"1 x 4096 tokens window {window}",
        lambda q=q, kc=kc, vc=vc, md=md: attention_triton.paged_attention(q, kc, vc, md, scale, **features),
        lambda q=q, kc=kc, vc=vc, md=md: paged_attention_ref(q, kc, vc, md, scale, **features),
        flops=4 * (window * (window + 1) / 2 + (4096 - window) * window) * NUM_HEADS * HEAD_DIM,
    )


def cache_cases() -> Iterator[Case]:
    from pagoda.kernels import cache_triton
    from pagoda.kernels.cache import reshape_and_cache_ref

    for tokens in (256, 8192):
        num_blocks = 4 * tokens // BLOCK_SIZE + 1                             # a cache 4x the tokens
        key = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        value = torch.randn_like(key)
        key_cache = torch.zeros(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        value_cache = torch.zeros_like(key_cache)
        slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:tokens]
        args = (key, value, key_cache, value_cache, slots)
        yield Case(
            "cache", "reshape_and_cache", f"{tokens} tokens",
            lambda args=args: cache_triton.reshape_and_cache(*args),
            lambda args=args: reshape_and_cache_ref(*args),
            bytes_moved=2 * 2 * key.numel() * key.element_size() + slots.numel() * 8,
        )
        fp8_caches = (torch.zeros_like(key_cache, dtype=torch.float8_e4m3fn),
                      torch.zeros_like(value_cache, dtype=torch.float8_e4m3fn))
        scales = dict(k_scale=torch.ones(1, device="cuda"), v_scale=torch.ones(1, device="cuda"))
        args = (key, value, *fp8_caches, slots)
        yield Case(
            "cache", "reshape_and_cache fp8", f"{tokens} tokens",
            lambda args=args: cache_triton.reshape_and_cache(*args, **scales),
            lambda args=args: reshape_and_cache_ref(*args, **scales),
            bytes_moved=2 * key.numel() * (key.element_size() + 1) + slots.numel() * 8,   # bf16 in, e4m3 out
        )


def norm_cases() -> Iterator[Case]:
    from pagoda.kernels import norm_triton
    from pagoda.kernels.norm import fused_add_rms_norm_ref, rms_norm_ref

    for tokens in (256, 8192):
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=DTYPE)
        residual = torch.randn_like(x)
        weight = torch.rand(HIDDEN, device="cuda", dtype=DTYPE)
        row_bytes = x.numel() * x.element_size()
        yield Case(
            "norm", "rms_norm", f"{tokens} x {HIDDEN}",
            lambda x=x, w=weight: norm_triton.rms_norm(x, w, 1e-5),
            lambda x=x, w=weight: rms_norm_ref(x, w, 1e-5),
            bytes_moved=2 * row_bytes,
        )
        yield Case(
            "norm", "fused_add_rms_norm", f"{tokens} x {HIDDEN}",
            lambda x=x, r=residual, w=weight: norm_triton.fused_add_rms_norm(x, r, w, 1e-5),
            lambda x=x, r=residual, w=weight: fused_add_rms_norm_ref(x, r, w, 1e-5),
            bytes_moved=4 * row_bytes,
        )


def rotary_cases() -> Iterator[Case]:
    from pagoda.kernels import rotary_triton
    from pagoda.kernels.rotary import apply_rotary_ref

    max_position = 8192
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM)
    freqs = torch.outer(torch.arange(max_position, device="cuda", dtype=torch.float32), inv_freq)
    cos_sin_cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)             # (max_position, head_dim) fp32
    for tokens in (256, 8192):
        positions = torch.randint(0, max_position, (tokens,), device="cuda")
        query = torch.randn(tokens, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        key = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        args = (positions, query, key, cos_sin_cache)
        yield Case(
            "rotary", "apply_rotary", f"{tokens} tokens",
            lambda args=args: rotary_triton.apply_rotary(*args),
            lambda args=args: apply_rotary_ref(*args),
            bytes_moved=2 * (query.numel() + key.numel()) * DTYPE.itemsize + tokens * (HEAD_DIM * 4 + 8),
        )


def activation_cases() -> Iterator[Case]:
    from pagoda.kernels import activation_triton
    from pagoda.kernels.activation import silu_and_mul_ref

    for tokens in (256, 8192):
        x = torch.randn(tokens, 2 * INTERMEDIATE, device="cuda", dtype=DTYPE)
        yield Case(
            "activation", "silu_and_mul", f"{tokens} x 2*{INTERMEDIATE}",
            lambda x=x: activation_triton.silu_and_mul(x),
            lambda x=x: silu_and_mul_ref(x),
            bytes_moved=1.5 * x.numel() * x.element_size(),
        )


def token_bitmask_cases() -> Iterator[Case]:
    """The grammar mask on a step's logits: every row constrained, ~1% of tokens allowed (a JSON
    value's next token), so nearly every logit is written (-inf)."""
    from pagoda.kernels import token_bitmask_triton
    from pagoda.kernels.token_bitmask import apply_token_bitmask_ref_, bitmask_width

    for rows in (64, 256):
        logits = torch.randn(rows, VOCAB, device="cuda", dtype=torch.float32)
        bitmask = torch.zeros(rows, bitmask_width(VOCAB), device="cuda", dtype=torch.int32)
        bitmask[:, ::100] = 1 << 7                                   # a few allowed tokens per row
        row_ids = torch.arange(rows, device="cuda")
        masked = 1 - bitmask.bool().sum().item() / (rows * VOCAB)
        yield Case(
            "token_bitmask", "apply_token_bitmask", f"{rows} x {VOCAB}",
            lambda l=logits, b=bitmask, r=row_ids: token_bitmask_triton.apply_token_bitmask_(l, b, r),
            lambda l=logits, b=bitmask, r=row_ids: apply_token_bitmask_ref_(l, b, r),
            bytes_moved=bitmask.numel() * 4 + masked * logits.numel() * 4,
        )


def weight_only_cases() -> Iterator[Case]:
    """W4A16 (GPTQ-style: int4, group 128, fp16 scales, symmetric) against bf16 F.linear on the same
    (dequantized) weights, at llama3-8b's linear shapes. Both rows report their own GB/s (weight +
    activations + output); the W4A16 row's speedup is bf16 time / W4A16 time."""
    import torch.nn.functional as F

    from pagoda.kernels import weight_only_triton
    from pagoda.kernels.weight_only import GroupQuantWeight, dequantize, pack_int6

    shapes = {"qkv_proj": (6144, HIDDEN), "o_proj": (HIDDEN, HIDDEN), "gate_up_proj": (2 * INTERMEDIATE, HIDDEN),
              "down_proj": (HIDDEN, INTERMEDIATE)}
    for layer, (n, k) in shapes.items():
        qweight = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
        scales = (torch.rand(n, k // 128, device="cuda") * 2e-3 + 1e-3).half()
        weight = GroupQuantWeight(qweight, bits=4, group_size=128, scales=scales, zero=8)
        dense = dequantize(weight).to(DTYPE)
        for m in (1, 16, 64, 256):
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            io_bytes = (m * k + m * n) * DTYPE.itemsize
            config = weight_only_triton.pick_config(m, n, k, weight, x.device)
            yield Case(
                "weight_only", f"w4a16 g128 {layer}", f"M={m} {n}x{k} (split {config.split_k})",
                lambda x=x, w=weight: weight_only_triton.weight_only_linear(x, w),
                lambda x=x, d=dense: F.linear(x, d),
                bytes_moved=weight.nbytes() + io_bytes,
            )
            yield Case(
                "weight_only", f"bf16 F.linear {layer}", f"M={m} {n}x{k}",
                lambda x=x, d=dense: F.linear(x, d), None,
                bytes_moved=dense.numel() * DTYPE.itemsize + io_bytes,
            )
        del dense
    # GGUF Q6_K's format (6 bits in two planes, int8 scales per 16, fp16 per 256) at the down projection,
    # which Q4_K_M files keep in Q6_K
    n, k = shapes["down_proj"]
    low, high = pack_int6(torch.randint(0, 64, (n, k), device="cuda", dtype=torch.uint8))
    six = GroupQuantWeight(low, 6, 16, torch.randint(-32, 32, (n, k // 16), device="cuda", dtype=torch.int8),
                           zero=32, super_scales=(torch.rand(n, k // 256, device="cuda") * 1e-4).half(),
                           qweight_high=high)
    dense = dequantize(six).to(DTYPE)
    for m in (1, 16, 256):
        x = torch.randn(m, k, device="cuda", dtype=DTYPE)
        config = weight_only_triton.pick_config(m, n, k, six, x.device)
        yield Case(
            "weight_only", "q6_k down_proj", f"M={m} {n}x{k} (split {config.split_k})",
            lambda x=x, w=six: weight_only_triton.weight_only_linear(x, w),
            lambda x=x, d=dense: F.linear(x, d),
            bytes_moved=six.nbytes() + (m * k + m * n) * DTYPE.itemsize,
        )
    del dense


def fp8_cases() -> Iterator[Case]:
    """FP8 W8A8 (e4m3 weights with per-channel scales, activations quantized per token) against bf16
    F.linear on the same (dequantized) weights, at llama3-8b's linear shapes. The FP8 row times the
    whole layer (quantization kernel + GEMM: ours up to 16 tokens, cuBLAS's row-wise-scaled FP8 GEMM
    above); GB/s count the FP8 weight and scales + activations in + output. Its speedup is bf16 time /
    FP8 time; its max err is the activation quantization's (the weights are the same)."""
    import torch.nn.functional as F

    from pagoda.kernels import fp8_triton
    from pagoda.kernels.fp8 import quantize_weight_per_channel

    shapes = {"qkv_proj": (HIDDEN + 2 * NUM_KV_HEADS * HEAD_DIM, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
              "gate_up_proj": (2 * INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE)}
    for layer, (n, k) in shapes.items():
        w_q, w_scale = quantize_weight_per_channel(torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02)
        dense = (w_q.float() * w_scale[:, None]).to(DTYPE)
        for m in (1, 16, 64, 256):
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            io_bytes = (m * k + m * n) * DTYPE.itemsize
            path = "triton" if m <= fp8_triton.SMALL_M else "_scaled_mm"
            yield Case(
                "fp8", f"fp8 w8a8 {layer}", f"M={m} {n}x{k} ({path})",
                lambda x=x, w=w_q, s=w_scale: fp8_triton.fp8_linear(x, w, s),
                lambda x=x, d=dense: F.linear(x, d),
                bytes_moved=w_q.numel() + w_scale.numel() * 4 + io_bytes,
            )
            yield Case(
                "fp8", f"bf16 F.linear {layer}", f"M={m} {n}x{k}",
                lambda x=x, d=dense: F.linear(x, d), None,
                bytes_moved=dense.numel() * DTYPE.itemsize + io_bytes,
            )
        del dense


def cuda_graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn` captured in a CUDA graph, as the decode step runs it; the result replays it and returns the
    captured output. NOTE: without the graph a decode-sized MoE call (several launches of a few
    microseconds each) would time the Python launch overhead; the capture also fails if `fn`
    synchronises with the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()                                                     # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return lambda: (graph.replay(), out)[1]


def moe_cases() -> Iterator[Case]:
    """fused_moe at Qwen3-30B-A3B's expert shapes, bf16, uniform random top-8 routing (distinct experts
    per token). Decode rows (replayed from a CUDA graph, as decode runs) count the weight bytes of the
    experts hit (the union over the batch) as the traffic, the floor for any kernel; the prefill row
    (eager) counts the GEMMs' FLOPs."""
    from pagoda.kernels import moe_triton
    from pagoda.kernels.moe import fused_moe_ref

    experts, top_k, hidden, n = 128, 8, 2048, 768
    w13 = torch.randn(experts, 2 * n, hidden, device="cuda", dtype=DTYPE) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, n, device="cuda", dtype=DTYPE) * n ** -0.5
    expert_bytes = (w13[0].numel() + w2[0].numel()) * DTYPE.itemsize
    for tokens in (1, 16, 64, 128, 256, 2048):
        x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE)
        ids = torch.rand(tokens, experts, device="cuda").argsort(dim=1)[:, :top_k].to(torch.int32)
        weights = torch.rand(tokens, top_k, device="cuda").softmax(dim=-1)
        hit = int(torch.unique(ids).numel())
        config = moe_triton.get_config(experts, n, hidden, tokens * top_k, x.device)
        args = (x, w13, w2, weights, ids)
        prefill = tokens > 256
        run = lambda args=args: moe_triton.fused_moe(*args)  # noqa: E731
        yield Case(
            "moe", "fused_moe prefill" if prefill else "fused_moe decode (graph)",
            f"T={tokens} {hit}/{experts} experts (block_m {config.block_m})",
            run if prefill else cuda_graphed(run),
            lambda args=args: fused_moe_ref(*args),
            bytes_moved=0.0 if prefill else hit * expert_bytes,
            flops=2.0 * tokens * top_k * 3 * n * hidden if prefill else 0.0,
        )


BUILDERS = {"attention": attention_cases, "cache": cache_cases, "norm": norm_cases,
            "rotary": rotary_cases, "activation": activation_cases, "token_bitmask": token_bitmask_cases,
            "weight_only": weight_only_cases, "fp8": fp8_cases, "moe": moe_cases}


# ---- timing and report ---------------------------------------------------------------------------------

def time_ms(fn: Callable[[], object], warmup_ms: int, rep_ms: int) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def max_error(case: Case) -> str:
    """Max |triton - torch| on this case's inputs: a smoke check that the timed kernel is the right one."""
    if case.torch_fn is None or case.family == "cache":
        return "-"
    if case.family == "token_bitmask":
        return "-"               # in place and idempotent: checked against the reference in the tests
    try:
        got, expected = case.triton_fn(), case.torch_fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "ref OOM"
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    return f"{max((g.float() - e.float()).abs().max().item() for g, e in zip(got, expected)):.1e}"


def run_case(case: Case, ceilings: Ceilings, args: argparse.Namespace) -> list[str]:
    triton_ms = time_ms(case.triton_fn, args.warmup_ms, args.rep_ms)
    seconds = triton_ms * 1e-3
    if case.flops:
        achieved, unit, ceiling = case.flops / seconds / 1e12, "TFLOP/s", ceilings.matmul_flops / 1e12
    else:
        achieved, unit, ceiling = case.bytes_moved / seconds / 1e9, "GB/s", ceilings.copy_bandwidth_Bps / 1e9
    torch_cell, speedup = "-", "-"
    if case.torch_fn is not None and not args.no_reference:
        try:
            torch_ms = time_ms(case.torch_fn, args.warmup_ms, args.rep_ms)
            torch_cell, speedup = f"{torch_ms * 1e3:.1f}", f"{torch_ms / triton_ms:.1f}x"
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            torch_cell = "OOM"
    error = "-" if args.no_reference else max_error(case)
    return [case.name, case.shape, f"{triton_ms * 1e3:.1f}", f"{achieved:.1f} {unit}",
            f"{100 * achieved / ceiling:.0f}%", torch_cell, speedup, error]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(line(header))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(FAMILIES),
                        help=f"comma-separated kernel families to run, from {FAMILIES}")
    parser.add_argument("--no-reference", action="store_true", help="do not time the torch references")
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warmup budget per case")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measurement budget per case")
    args = parser.parse_args()
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(FAMILIES))
    if unknown:
        parser.error(f"--only: unknown kernel families {unknown}; choose from {FAMILIES}")
    return args


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.kernels needs a CUDA GPU, and torch.cuda.is_available() is False here. "
                 "On CPU, check correctness instead: python -m pytest -q tests/kernels")
    torch.manual_seed(0)
    ceilings = measure_ceilings("cuda")
    print(f"device: {ceilings.device_name}  torch {torch.__version__}")
    print(f"ceilings: copy {ceilings.copy_bandwidth_Bps / 1e9:.0f} GB/s (2 GiB D2D, read+write), "
          f"bf16 matmul {ceilings.matmul_flops / 1e12:.0f} TFLOP/s (8192^3), medians of 20\n")
    header = ["kernel", "shape", "triton us", "achieved", "% ceiling", "torch us", "speedup", "max err"]
    rows = []
    for family in args.only:
        for case in BUILDERS[family]():            # built lazily: one case's tensors alive at a time
            rows.append(run_case(case, ceilings, args))
            print(f"  done: {' | '.join(rows[-1][:3])} us", file=sys.stderr)
            del case
        torch.cuda.empty_cache()
    print_table(header, rows)


if __name__ == "__main__":
    main()
