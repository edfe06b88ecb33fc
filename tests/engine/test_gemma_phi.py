"""Gemma 2, Gemma 3 (text), Phi-3 and the sliding windows of Mistral / Qwen2 against transformers,
and tensor parallelism of Gemma and Phi-3 against one rank.

- Each family's tiny random checkpoint (transformers' `save_pretrained`, fp32) gives transformers'
  greedy tokens and top-2 logprobs (2e-4), with prompts of up to ~24 tokens over a sliding window of
  8 on the layers the config marks:
  Gemma 2: soft-capped attention logits and final logits (caps small enough to change the values),
  query_pre_attn_scalar != head_dim, head_dim * heads != hidden; Gemma 3: q/k norms, local and global
  rope bases with linear scaling on the global layers, an explicit layer_types list; Phi-3: fused
  qkv_proj / gate_up_proj, longrope with partial rotary (0.75), both factor sets (an engine within
  original_max_position_embeddings uses the short ones, a longer one the long ones); Phi-4-like
  default rope, tied embeddings, no window; Mistral (window on every layer) and Qwen2
  (use_sliding_window from max_window_layers on).
- Plain greedy (no logprobs: the sharded argmax, before soft-capping) gives the same tokens.
- TP=2 over gloo equals TP=1 for Gemma 2 and Phi-3 (KV heads split over the ranks; Phi-3's fused
  tensors split into each rank's q/k/v and gate/up rows).
- Gemma's norm holds 1 + w in float32; bad configs are refused with a ValueError naming the value.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import model_factory
import pytest
import torch
import transformers
from conftest import assert_outputs_match_transformers, assert_same_outputs, greedy

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.layers.norm import GemmaRMSNorm
from pagoda.engine.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from pagoda.engine.models.phi3 import Phi3ForCausalLM

LOGPROB_ATOL = 2e-4
TP_LOGPROB_ATOL = 1e-4
KV_BYTES = 1 << 22
WINDOW = 8
MAX_TOKENS = 10
COMMON = dict(vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=model_factory.BOS_TOKEN_ID,
              eos_token_id=model_factory.EOS_TOKEN_ID, pad_token_id=model_factory.PAD_TOKEN_ID, dtype="float32")
GEMMA = dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, head_dim=48,
             sliding_window=WINDOW, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
PHI3_LONGROPE = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, sliding_window=WINDOW, original_max_position_embeddings=40,
                     partial_rotary_factor=0.75,
                     rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(12)],
                                   "long_factor": [1.5 + 0.75 * i for i in range(12)]})
CONFIGS: dict[str, tuple[str, dict]] = {
    # layers: sliding, full, sliding (Gemma 2's default alternation)
    "gemma2": ("gemma2", dict(GEMMA, num_hidden_layers=3, query_pre_attn_scalar=24, attn_logit_softcapping=1.0,
                              final_logit_softcapping=1.5)),
    "gemma3": ("gemma3_text", dict(GEMMA, num_hidden_layers=4, query_pre_attn_scalar=48,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                "full_attention"],
                                   rope_theta=5000.0, rope_local_base_freq=50.0,
                                   rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "phi3-longrope": ("phi3", PHI3_LONGROPE),
    "phi4-like": ("phi3", dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=1, rope_theta=250000.0, tie_word_embeddings=True)),
    "mistral-window": ("mistral", dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       sliding_window=WINDOW)),
    # layer 0 full (max_window_layers=1), layers 1 and 2 sliding
    "qwen2-window": ("qwen2", dict(hidden_size=128, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, sliding_window=WINDOW, use_sliding_window=True,
                                   max_window_layers=1)),
}
ARCHITECTURES = {"gemma2": Gemma2ForCausalLM, "gemma3": Gemma3ForCausalLM, "phi3-longrope": Phi3ForCausalLM,
                 "phi4-like": Phi3ForCausalLM}
# ~20-token prompts (longer than the window) and a short one; Phi-3's long-factor engine needs prompts
# past original_max_position_embeddings (40), where transformers switches to the long factors too
PROMPT_LENGTHS = [3, 17, 21, 24]
LONG_PROMPT_LENGTHS = [41, 45]


def tiny_config(name: str) -> transformers.PretrainedConfig:
    model_type, settings = CONFIGS[name]
    return transformers.CONFIG_MAPPING[model_type](**{**COMMON, **settings})


def randomize(model: torch.nn.Module, gemma: bool, seed: int = 0) -> None:
    """Distinct values everywhere: norms near 1 (Gemma's hold w of 1 + w: near 0), the rest small."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("norm.weight"):
                parameter.copy_((0.0 if gemma else 1.0) + 0.1 * noise)
            else:
                parameter.copy_(0.05 * noise)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    built: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in built:
            directory = tmp_path_factory.mktemp(name)
            model = transformers.AutoModelForCausalLM.from_config(tiny_config(name), dtype=torch.float32)
            randomize(model, gemma=name.startswith("gemma"))
            model.save_pretrained(directory)
            model_factory.build_tiny_tokenizer().save_pretrained(directory)
            built[name] = directory
        return built[name]

    return build


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 400, (n,), generator=generator).tolist() for n in lengths]


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def hf_model(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


def assert_matches_transformers(llm: LLM, path: Path, prompts: list[list[int]]) -> None:
    outputs = generate(llm, prompts, greedy(MAX_TOKENS, logprobs=2))
    assert_outputs_match_transformers(outputs, hf_model(path), prompts, MAX_TOKENS, LOGPROB_ATOL)
    # plain greedy: the argmax of the raw logits (no logits gathered, no soft-cap) picks the same tokens
    plain = generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in outputs]


# -- parity with transformers ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gemma2", "gemma3", "phi3-longrope", "phi4-like", "mistral-window",
                                  "qwen2-window"])
def test_greedy_tokens_and_top_logprobs_match_transformers(checkpoint, name):
    path = checkpoint(name)
    # Phi-3 longrope: an engine within original_max_position_embeddings (40) takes the short factors
    max_model_len = 40 if name == "phi3-longrope" else None
    llm = LLM(model=str(path), kv_cache_memory_bytes=KV_BYTES, max_model_len=max_model_len)
    if name in ARCHITECTURES:
        assert type(llm.engine.core.executor.runner.model) is ARCHITECTURES[name]
    assert_matches_transformers(llm, path, prompts_of(PROMPT_LENGTHS))


def test_phi3_long_factors_past_the_original_context(checkpoint):
    """An engine longer than original_max_position_embeddings rotates with the long factors, as
    transformers does for a sequence past that length."""
    path = checkpoint("phi3-longrope")
    llm = LLM(model=str(path), kv_cache_memory_bytes=KV_BYTES)
    assert llm.engine.config.model.max_model_len > 40
    assert_matches_transformers(llm, path, prompts_of(LONG_PROMPT_LENGTHS, seed=1))


def test_sliding_layers_are_the_ones_the_config_marks(checkpoint):
    """The window reaches exactly the sliding layers (and the soft-cap Gemma 2's every layer)."""
    windows = {}
    for name in ("gemma2", "gemma3", "phi3-longrope", "phi4-like", "mistral-window", "qwen2-window"):
        llm = LLM(model=str(checkpoint(name)), kv_cache_memory_bytes=KV_BYTES)
        layers = llm.engine.core.executor.runner.model.attention_layers()
        windows[name] = [layer.sliding_window for layer in layers]
        softcaps = [layer.logit_softcap for layer in layers]
        assert softcaps == [1.0] * len(layers) if name == "gemma2" else softcaps == [None] * len(layers)
    assert windows == {"gemma2": [WINDOW, None, WINDOW], "gemma3": [WINDOW, None, WINDOW, None],
                       "phi3-longrope": [WINDOW] * 2, "phi4-like": [None] * 2, "mistral-window": [WINDOW] * 2,
                       "qwen2-window": [None, WINDOW, WINDOW]}


# -- tensor parallelism ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gemma2", "phi3-longrope"])
def test_tp2_equals_tp1(checkpoint, name):
    path = str(checkpoint(name))
    prompts = prompts_of(PROMPT_LENGTHS)
    params = greedy(MAX_TOKENS, logprobs=2)
    # 8-token steps: the ~20-token prompts prefill in chunks that share steps with decodes
    common = dict(kv_cache_memory_bytes=KV_BYTES, max_num_batched_tokens=8)
    expected = generate(LLM(model=path, **common), prompts, params)
    llm = LLM(model=path, tensor_parallel_size=2, **common)
    try:
        actual = generate(llm, prompts, params)
    finally:
        llm.shutdown()
    assert_same_outputs(actual, expected, TP_LOGPROB_ATOL)


# -- pieces ----------------------------------------------------------------------------------------
class _Tensor:
    """A checkpoint tensor as the loaders see one."""

    def __init__(self, value: torch.Tensor, name: str = "norm.weight") -> None:
        self.value, self.name, self.shape = value, name, tuple(value.shape)

    def load(self, dtype=None, **_):
        return self.value.to(dtype)


def test_gemma_norm_holds_one_plus_w_in_float32():
    """A bf16 model's Gemma norm keeps 1 + w exact (1 + 0.01 in bf16 would be 1.0078), and computes
    transformers' Gemma2RMSNorm alone and fused with the residual add."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    w = (0.01 + 0.1 * torch.randn(64)).to(torch.bfloat16)
    norm = GemmaRMSNorm(64, 1e-6, torch.bfloat16)
    norm.weight.weight_loader(norm.weight, _Tensor(w))
    assert norm.weight.dtype == torch.float32
    assert torch.equal(norm.weight, w.float() + 1.0)
    reference = Gemma2RMSNorm(64, eps=1e-6)
    reference.weight.data.copy_(w.float())
    x, residual = torch.randn(5, 64), torch.randn(5, 64)
    torch.testing.assert_close(norm(x), reference(x), atol=1e-6, rtol=1e-6)
    normed, summed = norm(x, residual)
    torch.testing.assert_close(normed, reference(x + residual), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(summed, x + residual)
    normed, _ = norm.reduce_add(x, residual, 0)           # one rank: the fused add + norm
    torch.testing.assert_close(normed, reference(x + residual), atol=1e-6, rtol=1e-6)
    out = norm(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16                        # float32 weight, model-dtype output
    torch.testing.assert_close(out, reference(x.to(torch.bfloat16)), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="shape"):
        norm.weight.weight_loader(norm.weight, _Tensor(torch.zeros(32)))


def test_gemma_embeddings_scaled_and_logits_soft_capped(checkpoint):
    llm = LLM(model=str(checkpoint("gemma2")), kv_cache_memory_bytes=KV_BYTES)
    model = llm.engine.core.executor.runner.model
    assert model.model.normalizer.item() == pytest.approx(128 ** 0.5)
    hidden = torch.randn(3, 128)
    logits = model.compute_logits(hidden)
    raw = model.lm_head.compute_logits(hidden)
    torch.testing.assert_close(logits, 1.5 * torch.tanh(raw / 1.5))
    assert (logits - raw).abs().max() > 1e-2                # the cap changes these values
    assert torch.equal(model.greedy_tokens(hidden), logits.argmax(-1))
    # NOTE: far out tanh rounds to exactly 1 in fp32, so soft-capped logits may tie; the argmax of the
    # raw logits (greedy_tokens) still picks the largest one
    assert model.compute_logits(100 * hidden).abs().max() <= 1.5


@pytest.mark.parametrize("name, change, message", [
    ("gemma2", dict(hidden_activation="gelu"), r"hidden_activation 'gelu' is not supported"),
    ("gemma3", dict(use_bidirectional_attention=True), r"use_bidirectional_attention=True"),
    ("gemma3", dict(layer_types=["sliding_attention"] * 3), r"layer_types must name 4 layers"),
    ("phi4-like", dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported for Phi3ForCausalLM"),
])
def test_bad_configs_are_refused(name, change, message):
    config = tiny_config(name)
    for key, value in change.items():
        setattr(config, key, value)
    model_class = ARCHITECTURES[name]
    with pytest.raises(ValueError, match=message):
        model_class(config, 64, torch.float32)


def test_phi3_fused_tensor_of_the_wrong_size_is_refused(checkpoint, tmp_path):
    """A qkv_proj whose rows do not add up to q + k + v is named, not silently mis-split."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = checkpoint("phi4-like")
    for item in path.iterdir():
        shutil.copy(item, tmp_path / item.name)
    file = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(str(file))
    name = "model.layers.0.self_attn.qkv_proj.weight"
    tensors[name] = tensors[name][:-32]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"qkv_proj.weight' has 160 rows along dim 0, expected 192"):
        LLM(model=str(tmp_path), kv_cache_memory_bytes=KV_BYTES)
