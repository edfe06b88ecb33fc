"""The random-weight shapes of other families (Qwen3-MoE, Mixtral, Gemma 3, GPT-OSS) and the floor
arithmetic they need: parameter counts against transformers' own models (built on the meta device),
total vs active parameters and the experts a batch hits, sliding-window KV and attention pairs (toys
worked by hand), the documented floors, and bench.throughput end to end on CPU with the tiny
mixture-of-experts and Gemma 3 shapes."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repo root, for `import bench`

from bench.ceilings import Ceilings, batch1_roofline, ideal_floor  # noqa: E402
from bench.models import SHAPES, ModelShape, resolve_bench_model, shape_config, shape_family  # noqa: E402
from bench.workloads import BenchRequest, make_s64, make_w256  # noqa: E402

H100 = Ceilings(copy_bandwidth_Bps=3023e9, matmul_flops=804e12)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM", "gpt_oss": "GptOssForCausalLM"}
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def loaded_shape(name: str) -> tuple[transformers.PretrainedConfig, ModelShape]:
    """The config pagoda reads for `<name>-random`, and its ModelShape."""
    from pagoda.engine.model_loader.model_source import load_hf_config, resolve_model

    config = load_hf_config(resolve_model(resolve_bench_model(f"{name}-random").model))
    return config, ModelShape.from_hf_config(config)


def registered(architecture: str) -> bool:
    from pagoda.engine.models.registry import MODEL_REGISTRY

    return architecture in MODEL_REGISTRY


# ------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_each_shape_is_read_by_its_family_config_class(name):
    config, shape = loaded_shape(name)
    family = shape_family(name)
    assert config.model_type == family and config.architectures == [ARCHITECTURES[family]]
    assert type(config) is transformers.CONFIG_MAPPING[family]
    assert shape.num_params > 0 and shape.active_params <= shape.num_params


def test_real_shapes_match_their_published_sizes():
    _, qwen = loaded_shape("qwen3-30b-a3b")
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size) == (128, 8, 768)
    assert qwen.sparse_layers == 48
    assert qwen.num_params == 30_532_122_624 and qwen.active_params == 3_353_032_704      # "30B-A3B"
    assert qwen.kv_bytes_per_token == 98_304 and qwen.qk_norm and qwen.sliding_layers == 0

    _, gemma = loaded_shape("gemma3-12b")
    assert gemma.num_params == gemma.active_params == 11_766_034_176 and gemma.tie_word_embeddings
    assert (gemma.sliding_window, gemma.sliding_layers, gemma.norms_per_layer) == (1024, 40, 4)
    assert gemma.kv_bytes_per_token == 393_216 and gemma.kv_bytes_per_token_full == 393_216 // 6

    _, mixtral = loaded_shape("mixtral-8x7b")
    assert mixtral.num_params == 46_702_792_704 and mixtral.active_params == 12_879_925_248

    _, oss = loaded_shape("gpt-oss-20b")
    assert oss.num_params == 20_914_757_184
    assert oss.active_params - oss.embedding_params == pytest.approx(3.61e9, rel=1e-3)   # as published
    assert (oss.sliding_window, oss.sliding_layers, oss.num_experts, oss.num_experts_per_tok) == (128, 12, 32, 4)


@pytest.mark.parametrize("name, changes, sparse, sliding", [
    ("llama3-8b", {}, 0, 0),
    ("qwen3-30b-a3b", dict(num_experts=6, moe_intermediate_size=32, mlp_only_layers=[1]), 3, 0),    # a dense layer
    ("qwen3-30b-a3b", dict(num_experts=6, moe_intermediate_size=32, decoder_sparse_step=2), 2, 0),  # every other
    ("mixtral-8x7b", dict(num_local_experts=4), 4, 0),
    ("gemma3-12b", dict(sliding_window=8, sliding_window_pattern=2), 0, 2),
    ("gpt-oss-20b", dict(num_local_experts=4, layer_types=["sliding_attention", "full_attention"] * 2), 4, 2),
])
def test_param_count_matches_transformers(name, changes, sparse, sliding):
    """Every family's formula against the parameters of transformers' model of a shrunk config."""
    fields = {**shape_config(name, "float32"), **SMALL, **changes}
    architectures = fields.pop("architectures")
    config = transformers.AutoConfig.for_model(**fields)
    config.architectures = architectures
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shape = ModelShape.from_hf_config(config)
    assert shape.num_params == sum(p.numel() for p in model.parameters())
    assert (shape.sparse_layers, shape.sliding_layers) == (sparse, sliding)


@pytest.mark.parametrize("model_type, settings", [
    ("qwen2_moe", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48)),                                 # shared expert, qkv bias
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),         # qkv bias, 2 windowed
    ("gemma2", dict(sliding_window=8)),                                                      # 4 norms, no qk norm
    ("qwen3", dict()),                                                                       # qk norm
])
def test_param_count_matches_transformers_for_other_families(model_type, settings):
    config = transformers.CONFIG_MAPPING[model_type](**{**SMALL, **settings})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shape = ModelShape.from_hf_config(config)
    assert shape.num_params == sum(p.numel() for p in model.parameters())
    assert shape.sliding_layers == {"qwen2": 2, "gemma2": 2}.get(model_type, 0)


def test_dense_shapes_read_every_weight_every_step():
    _, llama = loaded_shape("llama3-8b")
    assert llama == ModelShape(4096, 14336, 32, 32, 8, 128, 128256)          # no family extras
    assert llama.active_params == llama.num_params
    assert llama.step_weight_bytes(1) == llama.step_weight_bytes(256) == llama.weight_bytes
    assert llama.kv_bytes_per_token_full == llama.kv_bytes_per_token and llama.kv_bytes_per_token_sliding == 0


def test_experts_hit_by_a_batch():
    _, qwen = loaded_shape("qwen3-30b-a3b")
    assert qwen.experts_hit(1) == pytest.approx(8)
    assert qwen.experts_hit(2) == pytest.approx(128 * (1 - (120 / 128) ** 2))     # 15.5: two tokens rarely share
    assert qwen.experts_hit(256) == pytest.approx(128, rel=1e-6)
    dense = qwen.weight_bytes - 48 * 128 * qwen.expert_bytes
    assert qwen.step_weight_bytes(1) == pytest.approx(dense + 48 * 8 * qwen.expert_bytes)
    assert qwen.step_weight_bytes(4096) == pytest.approx(qwen.weight_bytes)
    # quantized: the experts' bytes shrink with the linear layers
    fp8 = qwen.quantized("fp8")
    assert fp8.expert_bytes == qwen.expert_bytes / 2 and fp8.step_weight_bytes(1) < qwen.step_weight_bytes(1)


# ---------------------------------------------------------------------------------- floors, by hand


def test_moe_floor_toy_worked_by_hand():
    # 2 experts of 1, top-1. params: embedding 1 + attention 4 + experts 2 * 3 + router 2 + norms 2 + final
    # norm 1 = 16 (tied head); active 16 - 3 = 13; one expert 3 bytes
    toy = ModelShape(hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=1,
                     vocab_size=1, tie_word_embeddings=True, dtype_bytes=1, num_experts=2, num_experts_per_tok=1,
                     moe_intermediate_size=1)
    assert (toy.num_params, toy.active_params, toy.expert_bytes) == (16, 13, 3)
    # 1 token hits 1 expert (reads 13 B); 2 tokens 2 (1 - 1/4) = 1.5 in expectation (reads 14.5 B)
    assert toy.step_weight_bytes(1) == pytest.approx(13) and toy.step_weight_bytes(2) == pytest.approx(14.5)
    requests = [BenchRequest([0, 0], 3), BenchRequest([0], 2)]
    # prefill: 3 tokens, 3 + 1 causal pairs: 2 * 13 * 3 + 4 * 4 = 94 FLOPs
    # step 1: both live, 3 + 2 keys: bytes 14.5 + 2 * 5 = 24.5, flops 2 * 13 * 2 + 4 * 5 = 72
    # step 2: request 0, 4 keys: bytes 13 + 8 = 21, flops 26 + 16 = 42
    compute_bound = ideal_floor(requests, toy, Ceilings(copy_bandwidth_Bps=1, matmul_flops=1))
    assert compute_bound.seconds == pytest.approx(94 + 72 + 42)
    memory_bound = ideal_floor(requests, toy, Ceilings(copy_bandwidth_Bps=1, matmul_flops=10))
    assert memory_bound.prefill_seconds == pytest.approx(9.4)
    assert memory_bound.decode_seconds == pytest.approx(24.5 + 21)
    assert batch1_roofline(toy, Ceilings(1, 10)) == pytest.approx(1 / 13)
    # tp 2: every byte and FLOP halves (the toy's one KV head stays whole on each rank)
    split = ideal_floor(requests, toy, Ceilings(1, 10), tp=2, allreduce_bus_bandwidth_Bps=1e30)
    assert split.decode_seconds == pytest.approx((14.5 / 2 + 10) + (13 / 2 + 8))


def test_sliding_window_floor_toy_worked_by_hand():
    # 2 layers, the second sliding with a window of 2 keys. params: 1 + 2 * (4 + 3 + 2) + 1 = 20 (tied);
    # KV 2 B per token per layer; 4 FLOPs per pair per layer
    toy = ModelShape(hidden_size=1, intermediate_size=1, num_layers=2, num_heads=1, num_kv_heads=1, head_dim=1,
                     vocab_size=1, tie_word_embeddings=True, dtype_bytes=1, sliding_window=2, num_sliding_layers=1)
    assert toy.num_params == 20 and toy.kv_bytes_per_token == 4
    assert (toy.kv_bytes_per_token_full, toy.kv_bytes_per_token_sliding) == (2, 2)
    requests = [BenchRequest([0, 0, 0], 3)]
    # prefill: 3 tokens; full layer 1 + 2 + 3 = 6 pairs, sliding layer 1 + 2 + 2 = 5:
    #   2 * 20 * 3 + 4 * 6 + 4 * 5 = 164
    # step 1: 4 keys, 2 of them in the window: bytes 20 + 2 * 4 + 2 * 2 = 32, flops 40 + 16 + 8 = 64
    # step 2: 5 keys, 2 in the window: bytes 20 + 10 + 4 = 34, flops 40 + 20 + 8 = 68
    assert ideal_floor(requests, toy, Ceilings(1, 1)).seconds == pytest.approx(164 + 64 + 68)
    memory_bound = ideal_floor(requests, toy, Ceilings(1, 10))
    assert memory_bound.prefill_seconds == pytest.approx(16.4) and memory_bound.decode_seconds == pytest.approx(66)
    # a shared 3-token prefix is computed once: the second request skips 3 tokens, 6 full and 5 windowed pairs
    shared = [BenchRequest([7, 7, 7, 1], 1), BenchRequest([7, 7, 7, 2], 1)]
    saved = (ideal_floor(shared, toy, Ceilings(1, 1)).prefill_seconds
             - ideal_floor(shared, toy, Ceilings(1, 1), shared_prefix_len=3).prefill_seconds)
    assert saved == pytest.approx(2 * 20 * 3 + 4 * 6 + 4 * 5)


def test_floors_of_the_new_shapes_match_the_documented_figures():
    """bench/README.md's table: W256 and batch-1 on an H100 (3,023 GB/s, 804 TFLOP/s)."""
    w256 = make_w256()
    _, qwen = loaded_shape("qwen3-30b-a3b")
    floor = ideal_floor(w256, qwen, H100)
    assert floor.seconds == pytest.approx(25.26, rel=0.005) and floor.memory_bound_steps == 1022
    assert batch1_roofline(qwen, H100) == pytest.approx(451, rel=0.005)     # 6.7 GB: dense + 8 experts a layer
    _, gemma = loaded_shape("gemma3-12b")
    assert ideal_floor(w256, gemma, H100).seconds == pytest.approx(27.75, rel=0.005)
    assert batch1_roofline(gemma, H100) == pytest.approx(128, rel=0.005)
    # without its windows every layer would read every key: 1.5 s more over W256 (its contexts reach 2,047)
    import dataclasses

    assert ideal_floor(w256, dataclasses.replace(gemma, sliding_window=None), H100).seconds == \
        pytest.approx(29.29, rel=0.005)


# ------------------------------------------------------------------------------ throughput, end to end


def test_every_registered_shape_serves_w256s_longest_request():
    """pagoda's max_model_len for each real random shape admits W256's longest prompt + output."""
    from pagoda.engine import EngineArgs

    longest = max(r.prompt_len + r.output_len for r in make_w256())
    for name in ("qwen3-30b-a3b", "gemma3-12b", "mixtral-8x7b", "gpt-oss-20b"):
        if not registered(ARCHITECTURES[shape_family(name)]):
            continue
        config = EngineArgs(model=resolve_bench_model(f"{name}-random").model, load_format="dummy",
                            device="cpu").create_config()
        assert config.model.max_model_len >= longest, name


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-gemma", "tiny-gpt-oss"])
def test_throughput_runs_the_family_on_cpu(name, monkeypatch):
    """bench.throughput with `--model <tiny shape>-random` on CPU: ceilings, pagoda, the HF baseline and
    the floor of that shape. Two S64 prompts (one longer than the 64-token windows) with short outputs
    keep it to seconds. transformers' GPT-OSS has no sdpa attention: its baseline runs eager."""
    if not registered(ARCHITECTURES[shape_family(name)]):
        pytest.skip(f"{ARCHITECTURES[shape_family(name)]} is not registered in engine/models/registry.py yet")
    from bench import throughput

    requests = [BenchRequest(r.prompt_token_ids, 6) for r in make_s64(SHAPES[name]["vocab_size"], 2)]
    assert max(r.prompt_len for r in requests) > 64
    monkeypatch.setattr(throughput, "make_workload", lambda *args, **kwargs: requests)
    report = throughput.main(["--model", f"{name}-random", "--workload", "s64", "--device", "cpu",
                              "--warmup-requests", "1", "--ceilings", "on", "--baseline", "hf",
                              "--hf-batch-size", "2", "--hf-attn-implementation", "eager"])
    pagoda, hf = report["results"]
    assert pagoda["label"] == "pagoda" and pagoda["output_tokens"] == hf["output_tokens"] == 12
    _, shape = loaded_shape(name)
    assert report["model_shape"]["num_experts"] == shape.num_experts
    assert report["model_shape"]["sliding_window"] == shape.sliding_window
    assert report["floor"]["seconds"] > 0 and report["floor"]["num_decode_steps"] == 5
