"""FP8 W8A8 end to end on tiny random models (CPU, float32 model, the torch reference kernels).

- online (`quantization="fp8"` on a float checkpoint) against the unquantized engine. Tolerance:
  FP8 e4m3 keeps 3 mantissa bits (a relative rounding error up to 1/16 per weight and activation),
  which moves this model's log-probabilities by 0.04 on average; every teacher-forced prompt
  log-probability must stay within 0.3 of the unquantized one, their mean within 0.08. Greedy rule:
  the two engines' tokens agree up to their first divergence, and there the unquantized model
  must have been near a tie: its own pick beats the FP8 engine's by less than 0.3 in log-probability
  (the random model's distributions are flat, so such ties are common).
- compressed-tensors FP8 checkpoints written here with the compressed-tensors library (per-channel
  weights + dynamic per-token activations; per-tensor weights + static input scales) against
  transformers loading the same directory, which runs the same quantized math: each linear layer
  gives transformers' module's output within 1e-5 on the same inputs; whole models: greedy tokens
  equal, log-probabilities within 0.05. Why not 2e-4 as for unquantized models: where the two sum
  in a different order (chunked prefill, cached decode), a float32 difference of 1e-7 can carry an
  activation across an FP8 rounding boundary, one e4m3 step is 6-12% of that value, and it stays in
  the KV cache for every later token (transformers' own cached decode differs from its full
  forward by 4e-3 that way).
- a vLLM/AutoFP8 checkpoint (quant_method fp8, scalar scales) gives exactly the compressed-tensors
  per-tensor checkpoint's results; TP=2 over gloo gives the TP=1 result; the FP8 linear layers
  hold 1 byte a weight plus their scales; bad schemes and mismatched requests are refused by name;
  `load_format="dummy"` runs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import greedy, hf_greedy_generate, token_prompts
from model_factory import TinyModelSpec

from pagoda.engine import LLM, EngineArgs
from pagoda.engine.layers.linear import LinearBase
from pagoda.engine.quantization.compressed_tensors import CompressedTensorsConfig
from pagoda.engine.quantization.fp8 import Fp8Config, Fp8LinearMethod

KV_BYTES = 16 << 20
ONLINE_LOGPROB_MAX, ONLINE_LOGPROB_MEAN = 0.3, 0.08
CT_LOGPROB_MAX = 0.05
LLAMA_KV2 = TinyModelSpec(family="llama", num_attention_heads=2, num_key_value_heads=2)


# -- checkpoints written with the compressed-tensors library -------------------------------------------
def write_compressed_tensors_fp8(source: Path, target: Path, preset: str) -> Path:
    """Quantize the checkpoint in `source` with compressed-tensors' `preset` scheme ("FP8_DYNAMIC":
    per-channel weights, dynamic per-token activations; "FP8": per-tensor weights and static input
    scales calibrated on a few prompts), as llm-compressor would, and save it to `target`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, apply_quantization_config,
                                                 disable_quantization, enable_quantization)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = QuantizationConfig.model_validate({"config_groups": {preset: ["Linear"]}, "ignore": ["lm_head"]})
    apply_quantization_config(model, config, show_progress=False)
    quantized = [m for m in model.modules() if getattr(m, "quantization_scheme", None) is not None]
    input_amax: dict[torch.nn.Module, torch.Tensor] = {}
    hooks = []
    for module in quantized:
        args = module.quantization_scheme.weights
        weight = module.weight.detach()
        dims = dict(dim=1, keepdim=True) if args.strategy == "channel" else {}
        low, high = weight.amin(**dims).reshape(-1, 1)[:, :1], weight.amax(**dims).reshape(-1, 1)[:, :1]
        scale, _ = calculate_qparams(low, high, args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "input_scale"):                   # static activations: calibrate
            def observe(mod, inputs):
                amax = inputs[0].detach().abs().amax()
                input_amax[mod] = torch.maximum(input_amax.get(mod, amax), amax)
            hooks.append(module.register_forward_pre_hook(observe))
    model.apply(disable_quantization)                       # calibrate on the float model's activations
    with torch.no_grad():
        model(torch.tensor(token_prompts(10)[-1:]))
    model.apply(enable_quantization)
    for hook in hooks:
        hook.remove()
    for module, amax in input_amax.items():
        scale, _ = calculate_qparams(-amax.reshape(1), amax.reshape(1), module.quantization_scheme.input_activations)
        module.input_scale.data.copy_(scale.reshape(module.input_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(target)
    compressor.update_config(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    return target


@pytest.fixture(scope="module")
def ct_checkpoint(tiny_checkpoint, tmp_path_factory):
    built: dict[tuple, Path] = {}

    def build(preset: str, spec: TinyModelSpec = TinyModelSpec()) -> Path:
        if (preset, spec) not in built:
            built[preset, spec] = write_compressed_tensors_fp8(
                tiny_checkpoint(spec), tmp_path_factory.mktemp(f"ct-{preset}-{spec.slug}"), preset)
        return built[preset, spec]

    return build


def generate(llm: LLM, prompts: list[list[int]], params) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def prompt_logprobs(output) -> list[float]:
    tokens = output.prompt_token_ids
    return [output.prompt_logprobs[i][tokens[i]].logprob for i in range(1, len(tokens))]


def fp8_layers(llm: LLM) -> list[LinearBase]:
    model = llm.engine.core.executor.runner.model
    return [m for m in model.modules() if isinstance(m, LinearBase) and isinstance(m.quant_method, Fp8LinearMethod)]


# -- (a) online FP8 against the unquantized engine -------------------------------------------------------
@pytest.mark.parametrize("spec", [TinyModelSpec(), TinyModelSpec(family="qwen2")], ids=["llama", "qwen2-bias"])
def test_online_fp8_is_close_to_the_unquantized_engine(make_llm, spec):
    prompts = token_prompts(10)
    params = greedy(16, logprobs=5, prompt_logprobs=1)
    reference = generate(make_llm(spec), prompts, params)
    llm = make_llm(spec, quantization="fp8")
    assert len(fp8_layers(llm)) == 2 * 4                  # qkv, o, gate_up, down in each of 2 layers
    actual = generate(llm, prompts, params)
    diffs = torch.tensor([abs(a - b) for got, want in zip(actual, reference)
                          for a, b in zip(prompt_logprobs(got), prompt_logprobs(want))])
    assert diffs.max() < ONLINE_LOGPROB_MAX and diffs.mean() < ONLINE_LOGPROB_MEAN, (diffs.max(), diffs.mean())
    assert diffs.max() > 0                                 # it did quantize
    assert_greedy_agrees_up_to_near_ties(actual, reference, ONLINE_LOGPROB_MAX)


def assert_greedy_agrees_up_to_near_ties(actual: list, reference: list, margin: float) -> None:
    """Greedy tokens equal up to the first divergence, where the reference must have been near a
    tie: its own pick beat the other engine's (which must be in its top 5) by less than `margin`."""
    for got, want in zip(actual, reference, strict=True):
        ours, theirs = got.outputs[0].token_ids, want.outputs[0].token_ids
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if first is not None:
            step = want.outputs[0].logprobs[first]           # the reference's top 5 there
            assert ours[first] in step, f"picked {ours[first]} at step {first}, outside the reference's top 5"
            assert step[theirs[first]].logprob - step[ours[first]].logprob < margin


# -- (b) compressed-tensors checkpoints against transformers ----------------------------------------------
def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int
              ) -> list[tuple[list[int], list[float], list[float]]]:
    """Per prompt: transformers' greedy tokens, its teacher-forced prompt log-probabilities (one
    forward) and the log-probabilities of the tokens it generated (cached decode)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    results = []
    for prompt in prompts:
        tokens, generated = hf_greedy_generate(model, prompt, max_new_tokens)
        with torch.no_grad():
            prompt_lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
        prompt_side = [prompt_lp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
        results.append((tokens, prompt_side, generated))
    return results


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8"], ids=["channel-dynamic", "tensor-static"])
def test_compressed_tensors_fp8_matches_transformers(ct_checkpoint, preset):
    path = ct_checkpoint(preset)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "float-quantized"
    prompts = token_prompts(6)
    llm = LLM(model=str(path), kv_cache_memory_bytes=KV_BYTES)
    layers = fp8_layers(llm)
    assert len(layers) == 8 and all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers)
    assert all(hasattr(layer, "input_scale") == (preset == "FP8") for layer in layers)
    outputs = generate(llm, prompts, greedy(12, logprobs=1, prompt_logprobs=1))
    prompt_diffs, generated_diffs = [], []
    for output, (hf_tokens, hf_prompt, hf_generated) in zip(outputs, hf_greedy(path, prompts, 12)):
        completion = output.outputs[0]
        assert completion.token_ids == hf_tokens
        prompt_diffs += [abs(a - b) for a, b in zip(prompt_logprobs(output), hf_prompt, strict=True)]
        ours = [entry[t].logprob for entry, t in zip(completion.logprobs, completion.token_ids)]
        generated_diffs += [abs(a - b) for a, b in zip(ours, hf_generated, strict=True)]
    prompt_diffs, generated_diffs = torch.tensor(prompt_diffs), torch.tensor(generated_diffs)
    assert max(prompt_diffs.max(), generated_diffs.max()) < CT_LOGPROB_MAX, (prompt_diffs, generated_diffs)


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8"], ids=["channel-dynamic", "tensor-static"])
def test_compressed_tensors_layers_compute_what_transformers_does(ct_checkpoint, preset):
    """Layer by layer, on the same inputs, the engine's FP8 layers (fused q/k/v and gate/up
    included) give transformers' quantized modules' outputs up to float32 summation order."""
    path = ct_checkpoint(preset)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        hf(torch.tensor([[5]]))                              # compressed-tensors decompresses on first use
    ours = LLM(model=str(path), kv_cache_memory_bytes=KV_BYTES).engine.core.executor.runner.model
    generator = torch.Generator().manual_seed(0)
    for index, (layer, hf_layer) in enumerate(zip(ours.model.layers, hf.model.layers)):
        pairs = [(layer.self_attn.qkv_proj, [hf_layer.self_attn.q_proj, hf_layer.self_attn.k_proj,
                                             hf_layer.self_attn.v_proj]),
                 (layer.self_attn.o_proj, [hf_layer.self_attn.o_proj]),
                 (layer.mlp.gate_up_proj, [hf_layer.mlp.gate_proj, hf_layer.mlp.up_proj]),
                 (layer.mlp.down_proj, [hf_layer.mlp.down_proj])]
        for fused, parts in pairs:
            x = torch.randn(7, fused.in_features, generator=generator) * 2
            with torch.no_grad():
                expected = torch.cat([part(x[None])[0] for part in parts], dim=-1)
                actual = fused.quant_method.apply(fused, x, None)
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=f"layer {index}: {fused}")


def test_fp8_checkpoint_format_equals_the_compressed_tensors_one(ct_checkpoint, tmp_path):
    """The vLLM/AutoFP8 layout (quant_method fp8, activation_scheme static, 0-d scales) of the same
    tensors gives exactly the per-tensor compressed-tensors checkpoint's outputs."""
    from safetensors.torch import load_file, save_file

    source = ct_checkpoint("FP8")
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, tmp_path / file.name)
    tensors = {name: (t.reshape(()) if name.endswith("_scale") else t)
               for name, t in load_file(source / "model.safetensors").items()}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static",
                                     "ignored_layers": ["lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    prompts = token_prompts(4)
    params = greedy(8, logprobs=1, prompt_logprobs=1)
    expected = generate(LLM(model=str(source), kv_cache_memory_bytes=KV_BYTES), prompts, params)
    llm = LLM(model=str(tmp_path), kv_cache_memory_bytes=KV_BYTES)
    assert isinstance(llm.engine.config.model.quantization, Fp8Config)
    actual = generate(llm, prompts, params)
    for got, want in zip(actual, expected):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert prompt_logprobs(got) == prompt_logprobs(want)


# -- (c) tensor parallelism ------------------------------------------------------------------------------
TP_PROMPTS = token_prompts(4)


@pytest.mark.parametrize("source", ["online", "tensor-static"])
def test_tp2_equals_tp1(tiny_checkpoint, ct_checkpoint, source):
    """Column-parallel (fused q/k/v, gate/up) and row-parallel layers, the latter writing their
    unreduced share for the fused all-reduce + norm. With per-tensor checkpoint scales and static
    input scales every rank computes exactly TP=1's products (only summation order differs); online
    quantization scales each rank's rows of a row-parallel weight, and dynamic activations each
    rank's slice of a token, by that slice's own amax, which is finer than TP=1's, hence the online
    tolerance (within the online-vs-unquantized one)."""
    if source == "online":
        path, kwargs, atol = tiny_checkpoint(LLAMA_KV2), dict(quantization="fp8"), ONLINE_LOGPROB_MAX
    else:
        path, kwargs, atol = ct_checkpoint("FP8", LLAMA_KV2), {}, 1e-4
    params = greedy(8, logprobs=5, prompt_logprobs=1)
    common = dict(kv_cache_memory_bytes=1 << 22, max_num_batched_tokens=16, **kwargs)
    expected = generate(LLM(model=str(path), **common), TP_PROMPTS, params)
    llm = LLM(model=str(path), tensor_parallel_size=2, **common)
    try:
        actual = generate(llm, TP_PROMPTS, params)
    finally:
        llm.shutdown()
    for got, want in zip(actual, expected):
        assert prompt_logprobs(got) == pytest.approx(prompt_logprobs(want), abs=atol)
        if source != "online":
            assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert_greedy_agrees_up_to_near_ties(actual, expected, atol)


# -- (d) memory ------------------------------------------------------------------------------------------
def resident_bytes(layer: torch.nn.Module) -> int:
    """Bytes of the storages behind the layer's parameters and buffers (a view of a larger buffer
    counts the whole buffer)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(layer.parameters()) + list(layer.buffers())}
    return sum(storages.values())


@pytest.mark.parametrize("source", ["online", "channel-dynamic", "tensor-static"])
def test_fp8_layers_hold_one_byte_per_weight_plus_scales(make_llm, ct_checkpoint, source):
    if source == "online":
        llm = make_llm(quantization="fp8")
    else:
        llm = LLM(model=str(ct_checkpoint({"channel-dynamic": "FP8_DYNAMIC", "tensor-static": "FP8"}[source])),
                  kv_cache_memory_bytes=KV_BYTES)
    layers = fp8_layers(llm)
    assert len(layers) == 8
    for layer in layers:
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (layer.out_features,)
        weights = layer.out_features * layer.in_features
        scales = 4 * layer.out_features + (4 if source == "tensor-static" else 0)
        assert abs(resident_bytes(layer) - (weights + scales)) <= 0.1 * (weights + scales), layer
    unquantized = [m for m in make_llm().engine.core.executor.runner.model.modules() if isinstance(m, LinearBase)]
    full = sum(resident_bytes(m) for m in unquantized)              # float32 on CPU: 4 bytes a weight
    assert sum(resident_bytes(m) for m in layers) < 0.3 * full


# -- (e) bad input -----------------------------------------------------------------------------------------
def config_only_checkpoint(tiny_checkpoint, directory: Path, quantization_config: dict) -> Path:
    """The tiny checkpoint's config.json with `quantization_config`, and nothing else: the scheme is
    resolved (and refused) before any weight is read."""
    config = json.loads((tiny_checkpoint(TinyModelSpec()) / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def ct_preset_config(preset: str, format: str = "float-quantized", **extra) -> dict:
    """A quantization_config as llm-compressor writes it for compressed-tensors' `preset` scheme."""
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate({"config_groups": {preset: ["Linear"]}, "ignore": ["lm_head"],
                                                "format": format, **extra})
    return {**config.model_dump(mode="json"), "quant_method": "compressed-tensors"}


@pytest.mark.parametrize("preset, format, named", [
    ("W8A8", "int-quantized", r"weights int8 \(strategy channel.*input activations int8 \(strategy token, dynamic"),
    ("FP8_BLOCK", "float-quantized", r"weights float8 \(strategy block.*block_structure \[128, 128\]"),
    ("NVFP4", "nvfp4-pack-quantized", r"weights float4 \(strategy tensor_group"),
    ("FP8_DYNAMIC", "dense", r"weights float8 \(strategy channel.*format dense"),
])
def test_unsupported_compressed_tensors_scheme_is_named(tiny_checkpoint, tmp_path, preset, format, named):
    path = config_only_checkpoint(tiny_checkpoint, tmp_path, ct_preset_config(preset, format))
    with pytest.raises(ValueError, match=rf"config group '{preset}' has a scheme pagoda does not run: {named}.*"
                                         r"supported: FP8 W8A8"):
        EngineArgs(model=str(path)).create_config()


def test_fp8_block_scales_are_refused_by_name(tiny_checkpoint, tmp_path):
    path = config_only_checkpoint(tiny_checkpoint, tmp_path, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                              "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match=r"weight_block_size=\[128, 128\]"):
        EngineArgs(model=str(path)).create_config()


def test_fp8_request_on_another_format_names_the_mismatch(tiny_gguf, ct_checkpoint):
    # a GGUF file's blocks are dequantized, then quantized to FP8 at load
    assert isinstance(EngineArgs(model=str(tiny_gguf(TinyModelSpec(), "Q8_0")), quantization="fp8",
                                 device="cpu").create_config().model.quantization, Fp8Config)
    with pytest.raises(ValueError, match=r"quantization='awq' does not apply to a GGUF file"):
        EngineArgs(model=str(tiny_gguf(TinyModelSpec(), "Q8_0")), quantization="awq").create_config()
    with pytest.raises(ValueError, match=r"quantization='fp8' does not match the checkpoint.*'compressed-tensors'"):
        EngineArgs(model=str(ct_checkpoint("FP8")), quantization="fp8").create_config()


def test_compressed_tensors_matching_of_fused_layers():
    qkv = "model.layers.0.self_attn.qkv_proj"
    # q, k, v all ignored: the fused layer stays unquantized; only k ignored: refused, naming them
    all_ignored = CompressedTensorsConfig(ct_preset_config("FP8_DYNAMIC", ignore=["lm_head", "re:.*[qkv]_proj$"]))
    assert type(all_ignored.linear_method(qkv)).__name__ == "UnquantizedLinearMethod"
    assert isinstance(all_ignored.linear_method("model.layers.0.mlp.gate_up_proj"), Fp8LinearMethod)
    k_ignored = CompressedTensorsConfig(ct_preset_config("FP8_DYNAMIC",
                                                         ignore=["lm_head", "model.layers.0.self_attn.k_proj"]))
    with pytest.raises(ValueError, match=r"parts of model.layers.0.self_attn.qkv_proj .*q_proj: FP8 e4m3.*"
                                         r"k_proj: unquantized"):
        k_ignored.linear_method(qkv)
    assert isinstance(k_ignored.linear_method("model.layers.1.self_attn.qkv_proj"), Fp8LinearMethod)
    with pytest.raises(ValueError, match=r"quantizes lm_head"):
        CompressedTensorsConfig(ct_preset_config("FP8_DYNAMIC", ignore=[]))


def test_kv_cache_scheme_is_exposed_not_refused():
    kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    config = CompressedTensorsConfig(ct_preset_config("FP8_DYNAMIC", kv_cache_scheme=kv))
    assert config.kv_cache_scheme.num_bits == 8 and config.kv_cache_scheme.type == "float"
    assert CompressedTensorsConfig(ct_preset_config("FP8_DYNAMIC")).kv_cache_scheme is None


# -- (f) dummy weights ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["online", "tensor-static"])
def test_dummy_weights_run(tiny_checkpoint, ct_checkpoint, source):
    path = tiny_checkpoint(TinyModelSpec()) if source == "online" else ct_checkpoint("FP8")
    kwargs = dict(quantization="fp8") if source == "online" else {}
    llm = LLM(model=str(path), load_format="dummy", kv_cache_memory_bytes=KV_BYTES, **kwargs)
    layers = fp8_layers(llm)
    assert len(layers) == 8
    for layer in layers:
        assert layer.weight.dtype == torch.float8_e4m3fn
        dequantized = layer.weight.float() * layer.weight_scale[:, None]
        assert 0 < dequantized.abs().max() <= 1e-3 and dequantized.std() > 1e-4       # spread over the range
    outputs = generate(llm, token_prompts(3), greedy(4, logprobs=1))
    for output in outputs:
        completion = output.outputs[0]
        assert len(completion.token_ids) == 4
        assert all(torch.isfinite(torch.tensor(entry[t].logprob)) for entry, t in zip(completion.logprobs,
                                                                                       completion.token_ids))


def test_fp8_checkpoint_ignored_layers():
    config = Fp8Config.from_checkpoint({"quant_method": "fp8", "activation_scheme": "dynamic",
                                        "ignored_layers": ["lm_head", "model.layers.1.mlp.down_proj",
                                                           "model.layers.0.mlp.up_proj"]})
    assert type(config.linear_method("model.layers.1.mlp.down_proj")).__name__ == "UnquantizedLinearMethod"
    assert isinstance(config.linear_method("model.layers.0.mlp.down_proj"), Fp8LinearMethod)
    with pytest.raises(ValueError, match=r"gate_proj: FP8 e4m3.*up_proj: unquantized"):
        config.linear_method("model.layers.0.mlp.gate_up_proj")
    with pytest.raises(ValueError, match=r"activation_scheme"):
        Fp8Config.from_checkpoint({"quant_method": "fp8", "activation_scheme": "per-token"})


def test_online_fp8_holds_no_model_dtype_weights_before_loading(tiny_checkpoint):
    """The model-dtype weights of a layer exist only between its first loaded shard and its quantization:
    a freshly built model holds none (so a model that fits in FP8 never needs its bf16 size)."""
    from pagoda.engine.models.llama import LlamaForCausalLM

    config = transformers.AutoConfig.from_pretrained(tiny_checkpoint(TinyModelSpec()))
    model = LlamaForCausalLM(config, 64, torch.float32, Fp8Config.online())
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert linears and all(layer.weight.is_meta for layer in linears)
    assert not any(p.is_meta for name, p in model.named_parameters() if ".weight" in name and "proj" not in name)
