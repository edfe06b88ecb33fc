"""gpt-oss (GptOssForCausalLM) against transformers, its MXFP4 checkpoints, and its tensor- and
expert-parallel splits against one rank.

- A tiny random GptOssConfig (3 layers: sliding window 8, full, sliding; 4 experts, top-2; YaRN rope;
  sinks large enough to matter; some gate/up pre-activations past the SwiGLU clamp) written by
  transformers' `save_pretrained` (stacked, interleaved experts) gives transformers' greedy tokens
  and top-2 logprobs (fp32, CPU) for prompts of ~20 tokens, past the window.
- The same experts quantized to MXFP4 here (blocks and e8m0 scales as the gpt-oss releases store
  them, quant_method "mxfp4") load, dequantized, to the tokens and logprobs of transformers running
  the dequantized weights; the start-up log says what they cost.
- TP=2 over gloo (heads, experts' intermediate features and the MXFP4 rows / blocks sliced) and
  expert parallelism (whole experts per rank) give the TP=1 tokens and logprobs.
- SwiGLU constants the kernel does not implement are refused by name.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import model_factory
import pytest
import torch
import transformers
from conftest import assert_outputs_match_transformers, assert_same_outputs, greedy
from safetensors.torch import save_file

from pagoda.engine import LLM, EngineArgs
from pagoda.engine.models.gpt_oss import GptOssForCausalLM

LOGPROB_ATOL = 2e-4
TP_LOGPROB_ATOL = 1e-4
KV_BYTES = 1 << 22
WINDOW = 8
MAX_TOKENS = 10
CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
              max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=model_factory.BOS_TOKEN_ID,
              eos_token_id=model_factory.EOS_TOKEN_ID, pad_token_id=model_factory.PAD_TOKEN_ID, dtype="float32",
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                               "truncate": False, "original_max_position_embeddings": 64, "rope_theta": 150000.0})
MXFP4_QUANTIZATION = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def prompts(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 400, (n,), generator=generator).tolist() for n in (20, 23, 17, 5)]


def tiny_config(**overrides) -> transformers.GptOssConfig:
    return transformers.GptOssConfig(**{**CONFIG, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Norms near 1, the rest small; sinks of a few units (a real share of the softmax) and gate/up
    biases wide enough that some pre-activations pass the SwiGLU clamp (7)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.1 * noise)
            elif name.endswith("sinks"):
                parameter.copy_(2.0 * noise)
            elif name.endswith("gate_up_proj_bias"):
                parameter.copy_(4.0 * noise)
            else:
                parameter.copy_(0.05 * noise)


# -- MXFP4, written as the releases store it (independent of pagoda's decoder) ----------------------
def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E, rows, in) float -> (blocks uint8 (E, rows, in / 32, 16), scales uint8 (E, rows, in / 32),
    the values they decode to (E, rows, in)): per 32 values the power of two 2^floor(log2(amax)) / 4
    (so the largest maps into e2m1's [4, 8)), each value rounded to the nearest e2m1 magnitude."""
    experts, rows, features = weight.shape
    groups = weight.reshape(experts, rows, features // 32, 32).float()
    amax = groups.abs().amax(-1).clamp(min=2.0 ** -100)
    exponent = torch.floor(torch.log2(amax)) - 2
    scaled = groups / torch.exp2(exponent)[..., None]
    code = (scaled.abs()[..., None] - E2M1).abs().argmin(-1)                    # 0..7, the magnitude
    code = code | torch.where(scaled < 0, 8, 0)                                   # sign bit
    values = E2M1[code & 7] * torch.where(code >= 8, -1.0, 1.0) * torch.exp2(exponent)[..., None]
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)          # element 2i low nibble
    scales = (exponent + 127).to(torch.uint8)
    return packed, scales, values.reshape(experts, rows, features)


def write_mxfp4(directory: Path, model: transformers.PreTrainedModel) -> dict[str, torch.Tensor]:
    """An MXFP4 checkpoint of `model` in `directory`; returns the state dict with the experts as decoded."""
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    tensors, decoded = {}, dict(state)
    for name, tensor in state.items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = tensor
            continue
        # transformers holds (E, in, out); the checkpoint's blocks run along the input features of each output row
        blocks, scales, values = quantize_mxfp4(tensor.transpose(1, 2))
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        decoded[name] = values.transpose(1, 2).contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = MXFP4_QUANTIZATION
    config["architectures"] = ["GptOssForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))
    model_factory.build_tiny_tokenizer().save_pretrained(directory)
    return decoded


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The bf16-layout (save_pretrained) and MXFP4 checkpoints of one random model, and transformers
    models of each: the original and the one holding the MXFP4-decoded experts."""
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32)
    randomize(model)
    plain = tmp_path_factory.mktemp("gpt-oss")
    model.save_pretrained(plain)
    model_factory.build_tiny_tokenizer().save_pretrained(plain)
    mxfp4 = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    decoded = write_mxfp4(mxfp4, model)
    reference = transformers.AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32)
    reference.load_state_dict(decoded)
    return {"plain": plain, "mxfp4": mxfp4, "hf": model, "hf_mxfp4": reference.eval()}


def generate(llm: LLM, prompt_ids: list[list[int]], max_tokens: int = MAX_TOKENS) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompt_ids], greedy(max_tokens, logprobs=2),
                        use_tqdm=False)


def assert_matches_transformers(outputs: list, model, prompt_ids: list[list[int]]) -> None:
    # the top-2 alternatives along the longest prompt's continuation (the second)
    assert_outputs_match_transformers(outputs, model, prompt_ids, MAX_TOKENS, LOGPROB_ATOL, top_prompt=1)


# -- parity with transformers ----------------------------------------------------------------------
def test_greedy_tokens_and_top_logprobs_match_transformers(checkpoints):
    llm = LLM(model=str(checkpoints["plain"]), kv_cache_memory_bytes=KV_BYTES)
    model = llm.engine.core.executor.runner.model
    assert type(model) is GptOssForCausalLM
    assert [layer.sliding_window for layer in model.attention_layers()] == [WINDOW, None, WINDOW]
    hf_model = checkpoints["hf"]
    torch.testing.assert_close(model.model.layers[1].self_attn.attn.sinks,
                               hf_model.model.layers[1].self_attn.sinks.detach(), rtol=0, atol=0)
    assert llm.engine.config.model.max_model_len > 2 * WINDOW + MAX_TOKENS      # past the window
    assert_matches_transformers(generate(llm, prompts()), hf_model, prompts())


def test_router_takes_the_top_k_logits_then_softmaxes_over_them():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    from pagoda.engine.models.gpt_oss import route_top_k_then_softmax

    router = GptOssTopKRouter(tiny_config())
    with torch.no_grad():
        router.weight.normal_(generator=torch.Generator().manual_seed(1))
        router.bias.normal_(generator=torch.Generator().manual_seed(2))
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    logits, want_weights, want_ids = router(x)
    weights, ids = route_top_k_then_softmax(logits, 2)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)
    assert weights.sum(-1).tolist() == pytest.approx([1.0] * 7)


def test_mxfp4_checkpoint_equals_transformers_on_the_dequantized_weights(checkpoints, caplog):
    with caplog.at_level(logging.INFO, logger="pagoda.engine.models.gpt_oss"):
        llm = LLM(model=str(checkpoints["mxfp4"]), kv_cache_memory_bytes=KV_BYTES)
    assert llm.engine.config.model.quantization.name == "mxfp4"
    # 3 layers x 4 experts x (gate_up 128 x 64 + down 64 x 64) float32 values
    size = 3 * 4 * (128 * 64 + 64 * 64) * 4 / 1e9
    assert f"gpt-oss MXFP4 expert weights dequantized to float32 at load: {size:.2f} GB" in caplog.text
    experts = llm.engine.core.executor.runner.model.model.layers[0].mlp.experts
    hf_experts = checkpoints["hf_mxfp4"].model.layers[0].mlp.experts
    # ours: (E, 2N, H) gate rows then up rows; transformers: (E, H, 2N) interleaved
    want = hf_experts.gate_up_proj.detach().transpose(1, 2)
    torch.testing.assert_close(experts.w13_weight, torch.cat([want[:, 0::2], want[:, 1::2]], 1), rtol=0, atol=0)
    outputs = generate(llm, prompts())
    assert_matches_transformers(outputs, checkpoints["hf_mxfp4"], prompts())
    # the quantization really changed the weights (the test would pass on the bf16 ones otherwise)
    assert not torch.equal(hf_experts.down_proj, checkpoints["hf"].model.layers[0].mlp.experts.down_proj)


# -- tensor and expert parallelism ------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank_outputs(checkpoints):
    outputs: dict[str, list] = {}

    def get(name: str) -> list:
        if name not in outputs:
            outputs[name] = generate(LLM(model=str(checkpoints[name]), kv_cache_memory_bytes=KV_BYTES), prompts(1), 8)
        return outputs[name]

    return get


# Each engine spawns two workers (seconds each), so one checkpoint, the MXFP4 one (it differs from
# the plain one only in how the experts load): split by tensor parallelism (attention heads, each
# expert's gate/up rows and down blocks per rank), then by whole experts.
@pytest.mark.parametrize("name, expert_parallel", [
    pytest.param("mxfp4", False, id="mxfp4-tp2"),
    pytest.param("mxfp4", True, id="mxfp4-ep2"),
])
def test_two_ranks_equal_one(checkpoints, one_rank_outputs, name, expert_parallel):
    llm = LLM(model=str(checkpoints[name]), tensor_parallel_size=2, enable_expert_parallel=expert_parallel,
              kv_cache_memory_bytes=KV_BYTES, max_num_batched_tokens=32)
    try:
        assert llm.engine.config.parallel.enable_expert_parallel is expert_parallel
        actual = generate(llm, prompts(1), 8)
    finally:
        llm.shutdown()
    assert_same_outputs(actual, one_rank_outputs(name), TP_LOGPROB_ATOL)


# -- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("swiglu_limit", 5.0), ("swiglu_alpha", 1.5)])
def test_other_swiglu_constants_are_refused_by_name(tmp_path, key, value):
    config = tiny_config(**{key: value})
    config.architectures = ["GptOssForCausalLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{key}={value} is not supported"):
        EngineArgs(model=str(tmp_path)).create_config()
