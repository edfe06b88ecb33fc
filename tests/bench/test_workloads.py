"""Cheap checks of the benchmark harness: the workloads, the random-weight shapes, the ideal-floor
arithmetic (a toy worked by hand, and the H100/H200 figures in bench/README.md), and that the HF
static baseline produces exactly each request's output length."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repo root, for `import bench`

from bench.ceilings import Ceilings, batch1_roofline, ideal_floor, measure_ceilings  # noqa: E402
from bench.models import SHAPES, ModelShape, resolve_bench_model, shape_config  # noqa: E402
from bench.workloads import (  # noqa: E402
    BenchRequest,
    make_batch1,
    make_s64,
    make_shared_prefix,
    make_w256,
    make_workload,
    total_output_tokens,
    total_prompt_tokens,
)

H100 = Ceilings(copy_bandwidth_Bps=3023e9, matmul_flops=804e12)
H200 = Ceilings(copy_bandwidth_Bps=4300e9, matmul_flops=790e12)


def llama3_8b() -> ModelShape:
    fields = shape_config("llama3-8b")
    return ModelShape(hidden_size=fields["hidden_size"], intermediate_size=fields["intermediate_size"],
                      num_layers=fields["num_hidden_layers"], num_heads=fields["num_attention_heads"],
                      num_kv_heads=fields["num_key_value_heads"], head_dim=fields["head_dim"],
                      vocab_size=fields["vocab_size"])


# ---------------------------------------------------------------------------------------- workloads


def test_w256_matches_the_documented_totals():
    requests = make_w256()
    assert len(requests) == 256
    assert total_prompt_tokens(requests) == 144_262
    assert total_output_tokens(requests) == 144_590
    assert all(100 <= r.prompt_len <= 1024 and 100 <= r.output_len <= 1024 for r in requests)
    assert all(0 <= t <= 10000 for r in requests for t in r.prompt_token_ids)


def test_fewer_requests_are_a_prefix_of_the_full_workload():
    assert make_w256(10) == make_w256()[:10]
    assert make_s64(49152, 5) == make_s64(49152)[:5]
    assert make_workload("w256", 49152, 7) == make_w256()[:7]
    assert make_workload("w256", None, 3) == make_workload("w256", 0, 3) == make_w256()[:3]   # vocab unknown


def test_s64_is_deterministic_and_in_range():
    first, second = make_s64(49152), make_s64(49152)
    assert first == second
    assert len(first) == 64
    assert all(16 <= r.prompt_len <= 256 and 16 <= r.output_len <= 128 for r in first)
    assert all(0 <= t < 49152 for r in first for t in r.prompt_token_ids)
    # the first request's lengths are drawn before any id, so they do not depend on the vocabulary
    small = make_s64(1000)
    assert (small[0].prompt_len, small[0].output_len) == (first[0].prompt_len, first[0].output_len)
    assert all(t < 1000 for r in small for t in r.prompt_token_ids)


def test_shared_prefix_shape():
    requests = make_shared_prefix(49152)
    assert len(requests) == 256 and make_shared_prefix(49152) == requests
    prefix = requests[0].prompt_token_ids[:2048]
    suffixes = set()
    for r in requests:
        assert r.prompt_token_ids[:2048] == prefix
        assert 64 <= r.prompt_len - 2048 <= 256
        assert r.output_len == 128
        suffixes.add(tuple(r.prompt_token_ids[2048:]))
    assert len(suffixes) == 256
    assert len(make_shared_prefix(49152, num_requests=4, prefix_len=32)[0].prompt_token_ids) >= 32 + 64


def test_batch1_and_validation():
    (request,) = make_batch1(49152)
    assert request.prompt_len == 32 and request.output_len == 256
    with pytest.raises(ValueError, match="workload"):
        make_workload("w512", 49152)
    with pytest.raises(ValueError, match="vocabulary"):
        make_workload("w256", 4096)
    with pytest.raises(ValueError, match="num_requests"):
        make_workload("s64", 49152, 0)


# ------------------------------------------------------------------------------------------- models


def test_llama3_8b_shape_matches_the_documented_shape():
    shape = llama3_8b()
    assert shape.weight_bytes == pytest.approx(16.06e9, rel=1e-3)
    assert shape.kv_bytes_per_token == 131_072


def test_llama3_70b_shape():
    fields = shape_config("llama3-70b")
    shape = ModelShape(fields["hidden_size"], fields["intermediate_size"], fields["num_hidden_layers"],
                       fields["num_attention_heads"], fields["num_key_value_heads"], fields["head_dim"],
                       fields["vocab_size"])
    assert shape.num_params == pytest.approx(70.55e9, rel=1e-3)


def test_random_model_configs_load_in_pagoda():
    from pagoda.engine.model_loader.model_source import load_hf_config, resolve_model

    for name in SHAPES:
        bench_model = resolve_bench_model(f"{name}-random")
        assert bench_model.is_random and bench_model.load_format == "dummy"
        config = load_hf_config(resolve_model(bench_model.model))
        assert config.architectures == shape_config(name)["architectures"]
        assert ModelShape.from_hf_config(config).num_params > 0
        rope = config.rope_parameters.get("full_attention", config.rope_parameters)    # Gemma 3: per layer type
        assert float(rope["rope_theta"]) == SHAPES[name]["rope_theta"]
    assert resolve_bench_model("default").model == "default"
    with pytest.raises(ValueError, match="llama3-8b-random"):
        resolve_bench_model("llama3-13b-random")


# -------------------------------------------------------------------------------------------- floor


TOY = ModelShape(hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=1,
                 vocab_size=1, tie_word_embeddings=True, dtype_bytes=1)
TOY_WORKLOAD = [BenchRequest([0, 0], 3), BenchRequest([0], 1)]


def test_floor_toy_worked_by_hand():
    # params: embedding 1 + layer (q,k,v,o 4 + mlp 3 + norms 2) + final norm 1 = 11 (tied head)
    assert TOY.num_params == 11 and TOY.kv_bytes_per_token == 2 and TOY.attention_flops_per_pair == 4
    # prefill: 3 tokens, causal pairs 3 + 1 -> 2*11*3 + 4*4 = 82 FLOPs
    # step 1: only request 0 is live, 2 + 1 keys: bytes 11 + 2*3 = 17, flops 22 + 12 = 34
    # step 2: request 0, 4 keys: bytes 11 + 8 = 19, flops 22 + 16 = 38
    compute_bound = ideal_floor(TOY_WORKLOAD, TOY, Ceilings(copy_bandwidth_Bps=1, matmul_flops=1))
    assert compute_bound.seconds == pytest.approx(82 + 34 + 38)
    assert compute_bound.output_tok_per_s == pytest.approx(4 / 154)
    assert compute_bound.num_decode_steps == 2 and compute_bound.memory_bound_steps == 0

    memory_bound = ideal_floor(TOY_WORKLOAD, TOY, Ceilings(copy_bandwidth_Bps=1, matmul_flops=10))
    assert memory_bound.prefill_seconds == pytest.approx(8.2)
    assert memory_bound.decode_seconds == pytest.approx(17 + 19)
    assert memory_bound.memory_bound_steps == 2


def test_floor_toy_tensor_parallel():
    # tp 2: weights 5.5 B a rank; 1 KV head stays whole on each rank; all-reduce of n tokens costs
    # 2 per layer * 2 (tp-1)/tp * n bytes / 1 B/s = 2n s
    floor = ideal_floor(TOY_WORKLOAD, TOY, Ceilings(1, 10), tp=2, allreduce_bus_bandwidth_Bps=1)
    assert floor.prefill_seconds == pytest.approx(82 / 2 / 10 + 6)
    assert floor.decode_seconds == pytest.approx((5.5 + 6 + 2) + (5.5 + 8 + 2))
    assert floor.allreduce_seconds == pytest.approx(6 + 2 + 2)
    with pytest.raises(ValueError, match="allreduce"):
        ideal_floor(TOY_WORKLOAD, TOY, Ceilings(1, 10), tp=2)


def test_floor_shared_prefix_is_prefilled_once():
    requests = [BenchRequest([7, 7, 1], 1), BenchRequest([7, 7, 2], 1)]
    separate = ideal_floor(requests, TOY, Ceilings(1, 1))
    shared = ideal_floor(requests, TOY, Ceilings(1, 1), shared_prefix_len=2)
    # the second request skips 2 tokens (2*11 each) and their 1 + 2 causal pairs (4 each)
    assert separate.prefill_seconds - shared.prefill_seconds == pytest.approx(2 * 11 * 2 + 4 * 3)


def test_floor_matches_the_documented_anchors():
    shape, w256 = llama3_8b(), make_w256()
    h100 = ideal_floor(w256, shape, H100)
    assert h100.seconds == pytest.approx(14.1, rel=0.02)
    assert h100.output_tok_per_s == pytest.approx(10_000, rel=0.05)
    assert h100.memory_bound_steps == h100.num_decode_steps == 1023 - 1
    assert ideal_floor(w256, shape, H200).seconds == pytest.approx(10.8, rel=0.02)
    assert batch1_roofline(shape, H100) == pytest.approx(188, rel=0.01)
    assert batch1_roofline(shape, H200) == pytest.approx(268, rel=0.01)


def test_quantized_floors_match_the_documented_anchors():
    """FP8 W8A8 (+ FP8 KV) and INT4 W4A16 on an H100: 1-byte / half-byte linear weights (the embedding and
    LM head stay bf16), 1-byte KV, and for FP8 twice the bf16 matmul rate."""
    shape, w256 = llama3_8b(), make_w256()
    fp8 = shape.quantized("fp8")
    assert fp8.weight_bytes == pytest.approx(9.1e9, rel=0.01)
    assert batch1_roofline(fp8, H100) == pytest.approx(334, rel=0.02)
    fp8_kv = shape.quantized("fp8", "fp8")
    assert fp8_kv.kv_bytes_per_token == 65_536
    assert ideal_floor(w256, fp8_kv, H100).output_tok_per_s == pytest.approx(19_000, rel=0.05)
    assert ideal_floor(w256, fp8, H100).output_tok_per_s == pytest.approx(13_800, rel=0.05)
    int4 = shape.quantized("gptq")
    assert batch1_roofline(int4, H100) == pytest.approx(545, rel=0.05)      # 5.6 GB: g128 fp16 scales included
    assert shape.quantized(None) == shape
    with pytest.raises(ValueError, match="'int3'"):
        shape.quantized("int3")


def test_measure_ceilings_runs_on_cpu():
    ceilings = measure_ceilings("cpu", copy_bytes=1 << 20, matmul_size=64, dtype=torch.float32, repeats=3)
    assert ceilings.copy_bandwidth_Bps > 0 and ceilings.matmul_flops > 0


# -------------------------------------------------------------------------------------- HF baseline


def test_hf_static_produces_each_batch_to_its_longest_output_despite_eos():
    from bench.hf_baseline import load_hf_model, run_hf_static

    model = load_hf_model(resolve_bench_model("tiny-random", dtype="float32"), torch.device("cpu"), torch.float32)
    requests = [BenchRequest([5, 6, 7], 3), BenchRequest([8, 9], 5), BenchRequest([10], 2)]
    # make EOS the token greedy decoding emits first: generation must not stop on it
    with torch.no_grad():
        first = int(model(torch.tensor([[5, 6, 7]])).logits[0, -1].argmax())
    model.config.eos_token_id = first
    model.generation_config.eos_token_id = first
    result = run_hf_static(model, requests, batch_size=2)
    assert result.output_tokens == 10
    assert result.generated_tokens == 2 * 5 + 1 * 2
    assert result.num_requests == 3 and result.prompt_tokens == 6


def test_weak_scaling_copies_of_w256():
    import argparse

    from bench.cluster_bench import _scaled
    from bench.workloads import make_w256

    base = make_w256()
    assert make_w256(seed=0) == base and make_w256(seed=1) != base
    args = argparse.Namespace(per_replica=True, workload="w256")
    doubled = _scaled(base, args, 2)
    assert len(doubled) == 512 and doubled[0::2] == base and doubled[1::2] == make_w256(seed=1)
    assert _scaled(base, argparse.Namespace(per_replica=False, workload="w256"), 2) is base


def test_copy_workload_repeats_passages_of_its_prompt():
    """Each request asks the model to repeat a sonnet that its prompt holds; output length = the sonnet's tokens."""
    from model_factory import build_tiny_tokenizer

    from bench.workloads import make_copy

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    requests = make_workload("copy", None, 3, tokenizer=tokenizer)
    assert len(requests) == 3 and requests == make_copy(tokenizer, 3)
    for request in requests:
        assert 50 < request.output_len < request.prompt_len
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        make_workload("copy", None, 1)
    with pytest.raises(ValueError, match="num_requests=99"):
        make_copy(tokenizer, 99)
