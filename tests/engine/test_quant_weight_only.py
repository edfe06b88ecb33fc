"""Weight-only quantized checkpoints (engine/quantization/weight_only.py, gptq.py, awq.py): GPTQ, AWQ and
compressed-tensors pack-quantized W4A16 / W8A16, kept quantized.

- compressed-tensors: checkpoints written here by the compressed-tensors library itself (its qparams,
  its packing, its config.json); the engine agrees with transformers loading the same directory, or,
  where transformers cannot load it (asymmetric zero points), with transformers on the weights the
  library's own decompressor gives.
- GPTQ and AWQ: checkpoints packed here from round-to-nearest integers of a tiny random model by the
  packers below, written from each format's definition; the engine agrees with itself on an
  unquantized checkpoint holding the dequantized weights.
- TP=2 equals TP=1; the weights held take about the checkpoint's bytes; bad inputs are errors that
  name the problem.

Tolerances: against the dequantized checkpoint on our own engine (the same float32 weights, the same
code) 1e-5 on logprobs; against transformers 2e-4, as for unquantized checkpoints (test_hf_parity.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import transformers
from conftest import greedy, token_prompts
from model_factory import TinyModelSpec, read_state_dict
from safetensors.torch import save_file

from pagoda.engine import LLM
from pagoda.engine.layers import linear as linear_module
from pagoda.engine.layers.linear import ShardSlice
from pagoda.engine.model_loader.model_source import load_hf_config, resolve_model
from pagoda.engine.model_loader.weights import iterate_weights
from pagoda.engine.models.llama import LlamaForCausalLM
from pagoda.engine.quantization.awq import AWQConfig
from pagoda.engine.quantization.base import init_dummy_weights
from pagoda.engine.quantization.gptq import GPTQConfig, GPTQLinearMethod
from pagoda.engine.quantization.registry import resolve_quantization
from pagoda.engine.quantization.weight_only import compressed_tensors_weight_only
from pagoda.kernels.weight_only import dequantize

SPEC = TinyModelSpec(num_key_value_heads=2)          # 2 KV heads: TP=2 splits q, k and v
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)                  # nibble i of an AWQ word holds feature 8j + AWQ_ORDER[i]
SAME_WEIGHTS_ATOL, HF_ATOL = 1e-5, 2e-4
KV_BYTES = 16 << 20


# -- quantizing and packing ---------------------------------------------------------------------------
def round_to_nearest(w: torch.Tensor, bits: int, group_of: torch.Tensor, groups: int, sym: bool):
    """Integers q (N, K), fp16 scales (N, G) and zero points z (N, G) of w (N, K), feature k in group
    group_of[k]; the dequantized weight (q - z) * scale in float32."""
    n = w.shape[0]
    top = (1 << bits) - 1
    scales, zeros = torch.empty(n, groups), torch.empty(n, groups)
    for g in range(groups):
        block = w[:, group_of == g]
        if sym:
            zeros[:, g] = 1 << (bits - 1)
            scales[:, g] = block.abs().amax(1) / ((1 << (bits - 1)) - 1)
        else:
            low, high = block.amin(1).clamp(max=0), block.amax(1).clamp(min=0)
            scales[:, g] = (high - low) / top
            zeros[:, g] = (-low / scales[:, g]).round()
    scales = scales.half()
    s, z = scales.float()[:, group_of], zeros[:, group_of]
    q = (w / s + z).round().clamp(0, top)
    return q.long(), scales, zeros.long(), (q - z) * s


def pack(values: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Packs 32/bits consecutive values along `dim` into one int32, value i at bits [bits*i, bits*(i+1))
    (`order`: value i of a word is the word's element order[i], AWQ's interleave)."""
    per = 32 // bits
    v = values.movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, per)
    if order is not None:
        v = v[..., list(order)]
    words = sum(v[..., i].long() << (bits * i) for i in range(per))
    words = (words + (1 << 31)) % (1 << 32) - (1 << 31)                      # as signed int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def gptq_tensors(w, bits, group, sym, v1=True, act_order=False, seed=0):
    """GPTQ's tensors of w (N, K) and the dequantized weight. Act-order: features join groups in a
    random order, as desc_act's g_idx records."""
    k = w.shape[1]
    group = k if group == -1 else group
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(seed))]
    q, scales, zeros, dense = round_to_nearest(w, bits, g_idx, -(-k // group), sym)
    stored_zeros = (zeros - (1 if v1 else 0)) % (1 << bits)                   # v1 keeps z - 1
    tensors = {"qweight": pack(q.t(), bits, 0), "qzeros": pack(stored_zeros.t(), bits, 1),
               "scales": scales.t().contiguous(), "g_idx": g_idx.to(torch.int32)}
    return tensors, dense


def awq_tensors(w, group):
    k = w.shape[1]
    q, scales, zeros, dense = round_to_nearest(w, 4, torch.arange(k) // group, k // group, sym=False)
    tensors = {"qweight": pack(q.t(), 4, 1, AWQ_ORDER), "qzeros": pack(zeros.t(), 4, 1, AWQ_ORDER),
               "scales": scales.t().contiguous()}
    return tensors, dense


def write_checkpoint(source: Path, target: Path, tensors: dict, quantization_config: dict | None) -> Path:
    """`source`'s files with `tensors` as its weights and `quantization_config` in config.json."""
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, target / file.name)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(target / "model.safetensors"))
    if quantization_config is not None:
        config = json.loads((target / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (target / "config.json").write_text(json.dumps(config))
    return target


def quantized_pair(source: Path, target: Path, quantize, quantization_config: dict) -> tuple[Path, Path]:
    """(quantized checkpoint, unquantized checkpoint of its dequantized weights) of `source`."""
    tensors, dense = {}, {}
    for name, tensor in read_state_dict(source).items():
        module, _, leaf = name.rpartition(".")
        if module.rpartition(".")[2] in LINEARS and leaf == "weight":
            packed, dequantized = quantize(tensor)
            tensors.update({f"{module}.{key}": value for key, value in packed.items()})
            dense[name] = dequantized
        else:
            tensors[name] = dense[name] = tensor
    return (write_checkpoint(source, target / "quantized", tensors, quantization_config),
            write_checkpoint(source, target / "dense", dense, None))


def write_compressed_tensors(source: Path, target: Path, bits: int, group: int | None, symmetric: bool):
    """A pack-quantized checkpoint written by compressed-tensors (its min/max qparams, its compressor and
    config), and an unquantized one of the weights its decompressor gives back."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="group" if group else "channel", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.data
            blocks = w.view(w.shape[0], -1, group or w.shape[1])
            scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
            module.weight_scale.data.copy_(scale)
            module.weight_zero_point.data.copy_(zero)
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(target / "quantized")
    compressor.update_config(str(target / "quantized"))
    for file in source.glob("tokenizer*"):
        shutil.copy(file, target / "quantized" / file.name)
    checkpoint = read_state_dict(target / "quantized")
    dense = {}
    for name, tensor in read_state_dict(source).items():
        module = name.removesuffix(".weight")
        if f"{module}.weight_packed" in checkpoint:
            local = {key.removeprefix(module + "."): value for key, value in checkpoint.items()
                     if key.startswith(module + ".weight_")}
            tensor = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        dense[name] = tensor
    return target / "quantized", write_checkpoint(source, target / "dense", dense, None)


# -- running --------------------------------------------------------------------------------------------
PROMPTS = token_prompts(4)


def engine_outputs(path: Path, **kwargs) -> list[tuple[list[int], list[float]]]:
    llm = LLM(model=str(path), kv_cache_memory_bytes=KV_BYTES, **kwargs)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy(8, logprobs=1), use_tqdm=False)
    finally:
        llm.shutdown()
    return [(o.outputs[0].token_ids, [e[t].logprob for e, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outputs]


def hf_outputs(path: Path) -> list[tuple[list[int], list[float]]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None          # ignore EOS, as the engine's ignore_eos does
    results = []
    for prompt in PROMPTS:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        tokens = out.sequences[0, len(prompt):].tolist()
        results.append((tokens, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, tokens)]))
    return results


def assert_same(actual, expected, atol: float) -> None:
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(actual, expected, strict=True):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=atol)


def build_model(path: Path) -> LlamaForCausalLM:
    source = resolve_model(str(path))
    hf_config = load_hf_config(source)
    quantization = resolve_quantization(None, hf_config, source, torch.device("cpu"))
    model = LlamaForCausalLM(hf_config, 256, torch.float32, quantization)
    model.load_weights(iterate_weights(source))
    return model


GPTQ_CASES = {   # name -> (bits, group, sym, v1 zeros, act-order)
    "gptq-int4-g32-asym": (4, 32, False, True, False),
    "gptq-int4-g32-act-order": (4, 32, True, True, True),
    "gptq-int8-per-channel-v2": (8, -1, False, False, False),
    # groups of 96 over 128 / 256 input features: a partial last group (AutoGPTQ stores ceil(K / g)
    # groups, e.g. for SmolLM2's 576 features in groups of 128)
    "gptq-int4-g96-partial": (4, 96, False, True, False),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """name -> (quantized checkpoint, dequantized twin), built on first use."""
    source = tiny_checkpoint(SPEC)
    built: dict[str, tuple[Path, Path]] = {}

    def build(name: str) -> tuple[Path, Path]:
        if name in built:
            return built[name]
        target = tmp_path_factory.mktemp(name)
        if name.startswith("gptq"):
            bits, group, sym, v1, act_order = GPTQ_CASES[name]
            config = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": act_order,
                      "checkpoint_format": "gptq" if v1 else "gptq_v2"}
            built[name] = quantized_pair(source, target, lambda w: gptq_tensors(w, bits, group, sym, v1, act_order),
                                         config)
        elif name == "awq-g32":
            config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
            built[name] = quantized_pair(source, target, lambda w: awq_tensors(w, 32), config)
        else:                                   # "ct-w{bits}-{g<group>|channel}-{sym|asym}"
            _, bits, group, kind = name.split("-")
            built[name] = write_compressed_tensors(source, target, int(bits[1:]),
                                                   None if group == "channel" else int(group[1:]), kind == "sym")
        return built[name]

    return build


# -- (a) compressed-tensors, written by the library ---------------------------------------------------
def test_compressed_tensors_w4a16_matches_transformers_on_the_same_directory(checkpoints):
    quantized, _ = checkpoints("ct-w4-g32-sym")
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["format"] == "pack-quantized"
    assert_same(engine_outputs(quantized), hf_outputs(quantized), HF_ATOL)


@pytest.mark.parametrize("name", ["ct-w4-g32-asym", "ct-w8-channel-sym"])
def test_compressed_tensors_matches_its_decompressed_weights(checkpoints, name):
    """Zero points (which transformers cannot load from this library version) and W8A16 per channel."""
    quantized, dense = checkpoints(name)
    assert_same(engine_outputs(quantized), hf_outputs(dense), HF_ATOL)


# -- (b) GPTQ and AWQ, packed here ---------------------------------------------------------------------
@pytest.mark.parametrize("name", [*GPTQ_CASES, "awq-g32"])
def test_checkpoint_matches_its_dequantized_weights(checkpoints, name):
    quantized, dense = checkpoints(name)
    assert_same(engine_outputs(quantized), engine_outputs(dense), SAME_WEIGHTS_ATOL)


def test_layers_hold_the_dequantized_weights_exactly(checkpoints):
    """Layer by layer, the held format dequantizes to the twin's weights bit for bit (q/k/v fused)."""
    for name in ("gptq-int4-g32-act-order", "gptq-int4-g96-partial", "awq-g32", "ct-w4-g32-asym"):
        quantized, dense = checkpoints(name)
        model, reference = build_model(quantized), build_model(dense)
        twins = dict(reference.named_modules())
        layers = [(prefix, layer) for prefix, layer in model.named_modules() if hasattr(layer, "wo_qweight")]
        assert len(layers) == 4 * SPEC.num_hidden_layers
        for prefix, layer in layers:
            assert torch.equal(dequantize(layer.quant_method.quantized_weight(layer)), twins[prefix].weight), prefix
        # act-order: every layer's features were sorted by group (a permutation held); else none is
        assert all(hasattr(layer, "wo_perm") == ("act-order" in name) for _, layer in layers)


# -- (c) tensor parallelism ------------------------------------------------------------------------------
def test_tp2_equals_tp1(checkpoints):
    """Two ranks over gloo: qweight split along K (o_proj, down_proj) or N, packed zero points along N."""
    quantized, _ = checkpoints("gptq-int4-g32-asym")
    assert_same(engine_outputs(quantized, tensor_parallel_size=2), engine_outputs(quantized), 1e-4)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("name", ["gptq-int8-per-channel-v2", "awq-g32", "ct-w4-g32-asym"])
def test_each_ranks_slice_dequantizes_to_the_twins_slice(checkpoints, monkeypatch, name, rank):
    """Every layout's ParamLayouts, in-process (no process group: loading only): each layer of rank r
    of 2 holds exactly the dequantized twin's rank-r slice (per-channel scales replicated on both)."""
    from pagoda.engine.layers import embedding as embedding_module

    for module in (linear_module, embedding_module):
        monkeypatch.setattr(module, "get_tp_rank", lambda: rank)
        monkeypatch.setattr(module, "get_tp_size", lambda: 2)
    quantized, dense = checkpoints(name)
    model, reference = build_model(quantized), build_model(dense)
    layers = [(p, m) for p, m in model.named_modules() if hasattr(m, "wo_qweight")]
    assert len(layers) == 4 * SPEC.num_hidden_layers
    twins = dict(reference.named_modules())
    for prefix, layer in layers:
        assert layer.tp_size == 2
        assert torch.equal(dequantize(layer.quant_method.quantized_weight(layer)), twins[prefix].weight), prefix


# -- (d) memory --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,bits,zero_bytes,scale_bytes", [
    ("gptq-int4-g32-asym", 4, 0.5, 2), ("awq-g32", 4, 0.5, 2), ("ct-w4-g32-sym", 4, 0, 4),
    ("ct-w4-g32-asym", 4, 0.5, 4)])
def test_resident_weights_are_about_the_checkpoints_size(checkpoints, name, bits, zero_bytes, scale_bytes):
    """Each quantized layer holds bits/8 bytes a weight plus its group's scale and zero point at the
    checkpoint's dtype (zero points of 4 bits held as bytes: 0.5 byte a group more), within 10%; nothing of
    the checkpoint's layout stays behind."""
    model = build_model(checkpoints(name)[0])
    layers = [m for m in model.modules() if hasattr(m, "wo_qweight")]
    assert len(layers) == 4 * SPEC.num_hidden_layers
    for layer in layers:
        held = sum(t.numel() * t.element_size() for t in [*layer.parameters(recurse=False), *layer.buffers()])
        n, k = layer.out_features, layer.in_features
        ideal = n * k * bits / 8 + n * (k // 32) * (scale_bytes + zero_bytes)
        assert ideal <= held <= 1.1 * ideal, type(layer).__name__
        assert {name for name, _ in layer.named_parameters()} <= {"bias"}


def test_dummy_weights_are_finite_and_small(checkpoints):
    quantized, _ = checkpoints("gptq-int4-g32-asym")
    outputs = engine_outputs(quantized, load_format="dummy")
    assert all(torch.isfinite(torch.tensor(logprobs)).all() for _, logprobs in outputs)
    source = resolve_model(str(quantized))
    model = LlamaForCausalLM(load_hf_config(source), 256, torch.float32,
                             resolve_quantization(None, load_hf_config(source), source, torch.device("cpu")))
    init_dummy_weights(model, torch.Generator().manual_seed(0))
    layer = model.model.layers[0].mlp.down_proj
    weight = dequantize(layer.quant_method.quantized_weight(layer))
    assert 1e-4 < weight.abs().max() < 1e-2


# -- (e) errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,message", [
    ({"bits": 3, "group_size": 128}, "GPTQ bits=3 is not supported"),
    ({"bits": 4, "group_size": 0}, "group_size=0"),
    ({"bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
    ({"bits": 4, "group_size": 128, "dynamic": {"-:.*down": {}}}, "'dynamic'"),
    ({"bits": 4, "group_size": 128, "lm_head": True}, "lm_head=True"),
])
def test_bad_gptq_configs(config, message):
    with pytest.raises(ValueError, match=message):
        GPTQConfig.from_config({"quant_method": "gptq", **config})


@pytest.mark.parametrize("config,message", [
    ({"bits": 8}, "AWQ bits=8 is not supported"),
    ({"version": "gemv"}, "version='gemv'"),
    ({"zero_point": False}, "zero_point=False"),
    ({"backend": "llm-awq"}, "backend='llm-awq'"),
])
def test_bad_awq_configs(config, message):
    with pytest.raises(ValueError, match=message):
        AWQConfig.from_config({"quant_method": "awq", "group_size": 128, **config})


def test_bad_compressed_tensors_weight_args():
    from compressed_tensors.quantization import QuantizationArgs

    for args, message in [(QuantizationArgs(num_bits=2, group_size=32), "num_bits=2"),
                          (QuantizationArgs(num_bits=4, strategy="tensor"), "strategy='tensor'"),
                          (QuantizationArgs(num_bits=8, type="float", strategy="channel"), "type='float'")]:
        with pytest.raises(ValueError, match=f"model.layers.0.mlp.down_proj: .*{message}"):
            compressed_tensors_weight_only(args, "model.layers.0.mlp.down_proj")


def test_mixed_fused_layer_and_skipped_modules():
    config = GPTQConfig.from_config({"quant_method": "gptq", "modules_to_not_convert": ["q_proj"]})
    with pytest.raises(ValueError, match="qkv_proj fuses .* quantizes only some"):
        config.linear_method("model.layers.0.self_attn.qkv_proj")
    skip_mlp = GPTQConfig.from_config({"quant_method": "gptq", "modules_to_not_convert": ["mlp"]})
    assert skip_mlp.linear_method("model.layers.0.mlp.gate_up_proj").name == "unquantized"
    assert skip_mlp.linear_method("model.layers.0.self_attn.o_proj").name.startswith("gptq")


def fake_layer(tp_size: int, in_start: int, in_len: int) -> nn.Module:
    layer = nn.Module()
    layer.tp_size = tp_size
    layer.shard_slice = lambda shard_id: ShardSlice(0, 0, 64, 0, in_start, in_len)
    return layer


def test_tensor_parallel_size_that_splits_a_group_names_the_layer(monkeypatch):
    monkeypatch.setattr(linear_module, "get_tp_rank", lambda: 0)
    monkeypatch.setattr(linear_module, "get_tp_size", lambda: 2)
    method = GPTQConfig(group_size=128).linear_method("model.layers.0.self_attn.o_proj")
    with pytest.raises(ValueError, match=r"o_proj: .*tensor_parallel_size=2 each rank holds 64.*group_size 128"):
        linear_module.RowParallelLinear(128, 64, quant_method=method)
    # unsplit input features (column-parallel) may end in a partial group: held as groups of gcd(96, 64)
    column = linear_module.ColumnParallelLinear(96, 64, quant_method=GPTQConfig(group_size=64).linear_method("x.up"))
    assert column.quant_method.group == 32 and column.scales.shape == (2, 32)
    awq = AWQConfig(group_size=32).linear_method("model.layers.0.self_attn.qkv_proj")
    with pytest.raises(ValueError, match="qkv_proj: output shard 1 has 4 features .* multiple of 8"):
        awq.create_weights(fake_layer(2, 0, 64), 64, [16, 4, 4], torch.float32)


def lazy(name: str, tensor: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(name=name, load=lambda dtype=None: tensor.to(dtype))


def test_act_order_split_over_ranks_and_differing_fused_orders_are_refused():
    """A row-parallel rank's features from an act-order g_idx hold parts of groups; q and k must share one."""
    g_idx = (torch.arange(128) // 32)[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    method = GPTQLinearMethod(GPTQConfig(group_size=32, desc_act=True), "model.layers.0.mlp.down_proj")
    layer = fake_layer(2, 64, 64)                      # rank 1 of 2: input features 64..127
    method.create_weights(layer, 64, [64], torch.float32)
    for name in ("qweight", "qzeros", "scales"):
        getattr(layer, name).data.zero_()
    layer.g_idx.weight_loader(layer.g_idx, lazy("model.layers.0.mlp.down_proj.g_idx", g_idx.int()), None)
    with pytest.raises(ValueError, match="down_proj: its g_idx .* act-order .* tensor_parallel_size=1"):
        method.process_weights_after_loading(layer)
    fused = GPTQConfig(group_size=32, desc_act=True).linear_method("model.layers.0.self_attn.qkv_proj")
    layer = fake_layer(1, 0, 128)
    fused.create_weights(layer, 128, [64, 32, 32], torch.float32)
    layer.g_idx.weight_loader(layer.g_idx, lazy("q_proj.g_idx", g_idx.int()), "q")
    with pytest.raises(ValueError, match="qkv_proj: the fused checkpoint tensors' g_idx differ"):
        layer.g_idx.weight_loader(layer.g_idx, lazy("k_proj.g_idx", g_idx.flip(0).int()), "k")


def test_missing_tensor_is_named(checkpoints, tmp_path):
    quantized, _ = checkpoints("gptq-int4-g32-asym")
    tensors = {k: v for k, v in read_state_dict(quantized).items() if k != "model.layers.1.mlp.down_proj.qzeros"}
    broken = write_checkpoint(quantized, tmp_path / "broken", tensors, None)
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.qzeros"):
        build_model(broken)
