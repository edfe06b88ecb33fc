"""The mixture-of-experts families (Qwen3-MoE, Mixtral, Qwen2-MoE) against transformers, and their
tensor- and expert-parallel splits against one rank.

- Each family's tiny random checkpoint (written by transformers' `save_pretrained`: one tensor per
  expert and projection) gives transformers' greedy tokens and top-2 logprobs (fp32, CPU; 2e-4).
  Qwen3-MoE has a dense layer (`mlp_only_layers`) and renormalises (`norm_topk_prob`); Qwen2-MoE
  has q/k/v biases, no renormalisation and a gated shared expert; Mixtral renames its modules.
- The same weights stacked per layer (`mlp.experts.gate_up_proj`, transformers 5's in-memory form)
  load to the same model.
- TP=2 over gloo (every expert split along its intermediate dimension) and expert parallelism
  (tp=2, enable_expert_parallel: whole experts per rank) give the TP=1 tokens and logprobs.
- Bad splits, a dense model with enable_expert_parallel and quantized experts are refused with a
  ValueError naming the value; --load-format dummy builds a random MoE model.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import model_factory
import pytest
import torch
import transformers
from conftest import assert_outputs_match_transformers, assert_same_outputs, greedy, token_prompts
from safetensors.torch import save_file

from pagoda.engine import LLM, EngineArgs
from pagoda.engine.models.mixtral import MixtralForCausalLM
from pagoda.engine.models.qwen2_moe import Qwen2MoeForCausalLM
from pagoda.engine.layers.moe import MoeOptions
from pagoda.engine.models.qwen3_moe import Qwen3MoeForCausalLM
from pagoda.engine.quantization.fp8 import Fp8Config, Fp8LinearMethod, Fp8Scheme

LOGPROB_ATOL = 2e-4
TP_LOGPROB_ATOL = 1e-4
KV_BYTES = 1 << 22
COMMON = dict(vocab_size=512, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
              max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=model_factory.BOS_TOKEN_ID,
              eos_token_id=model_factory.EOS_TOKEN_ID, pad_token_id=model_factory.PAD_TOKEN_ID, dtype="float32")
FAMILIES = {
    # 3 layers, the middle one dense; 8 experts, top-2, renormalised
    "qwen3_moe": dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1]),
    # every layer sparse; 4 experts of intermediate_size, top-2, always renormalised
    "mixtral": dict(num_hidden_layers=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    # shared expert (48) with its sigmoid gate, q/k/v bias, no renormalisation; 6 experts
    "qwen2_moe": dict(num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32, num_experts=6,
                      num_experts_per_tok=2, norm_topk_prob=False, shared_expert_intermediate_size=48),
}
ARCHITECTURES = {"qwen3_moe": Qwen3MoeForCausalLM, "mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM}


def tiny_moe_config(family: str, **overrides) -> transformers.PretrainedConfig:
    return transformers.CONFIG_MAPPING[family](**{**COMMON, **FAMILIES[family], **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Distinct values everywhere (norms near 1, the rest small); routers spread enough that the
    top-2 choice differs between tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.05 * noise)


def save_tiny_moe(directory: Path, family: str, stacked: bool = False) -> Path:
    """A `save_pretrained` checkpoint (per-expert tensors), or with `stacked` the model's own state
    dict (3-D `experts.gate_up_proj` / `experts.down_proj` per layer) beside the same config."""
    model = transformers.AutoModelForCausalLM.from_config(tiny_moe_config(family), dtype=torch.float32)
    randomize(model)
    model.save_pretrained(directory)
    if stacked:
        for file in directory.glob("*.safetensors"):
            file.unlink()
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()
                 if name != "lm_head.weight" or not model.config.tie_word_embeddings}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model_factory.build_tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    built: dict[tuple[str, bool], Path] = {}

    def build(family: str, stacked: bool = False) -> Path:
        if (family, stacked) not in built:
            directory = tmp_path_factory.mktemp(f"{family}-{'stacked' if stacked else 'per-expert'}")
            built[family, stacked] = save_tiny_moe(directory, family, stacked)
        return built[family, stacked]

    return build


def generate(llm: LLM, prompts: list[list[int]], max_tokens: int = 10) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens, logprobs=2), use_tqdm=False)


# -- parity with transformers ----------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_and_top_logprobs_match_transformers(moe_checkpoint, family):
    path = moe_checkpoint(family)
    prompts = token_prompts(4, vocab=400)
    llm = LLM(model=str(path), kv_cache_memory_bytes=KV_BYTES)
    assert isinstance(llm.engine.core.executor.runner.model, ARCHITECTURES[family])
    outputs = generate(llm, prompts)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert_outputs_match_transformers(outputs, model, prompts, 10, LOGPROB_ATOL)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_stacked_expert_tensors_load_the_same_model(moe_checkpoint, family):
    prompts = token_prompts(3, vocab=400)
    tensors = model_factory.read_state_dict(moe_checkpoint(family, stacked=True))
    config = tiny_moe_config(family)
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == config.num_experts
    assert not any(".experts.0." in name for name in tensors)          # really the stacked form only
    stacked = generate(LLM(model=str(moe_checkpoint(family, stacked=True)), kv_cache_memory_bytes=KV_BYTES), prompts)
    per_expert = generate(LLM(model=str(moe_checkpoint(family)), kv_cache_memory_bytes=KV_BYTES), prompts)
    for a, b in zip(stacked, per_expert):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-5)


# -- tensor and expert parallelism ------------------------------------------------------------------
# Each TP=2 engine spawns two workers (seconds each): one case per split that adds something, the
# splits of every family also covered in one process by test_moe_layer.py.
PARALLEL_CASES = [
    pytest.param("qwen3_moe", False, id="qwen3-moe-tp2"),      # experts and the dense layer sliced
    pytest.param("qwen2_moe", False, id="qwen2-moe-tp2"),      # the shared expert sliced too
    pytest.param("qwen2_moe", True, id="qwen2-moe-ep2"),       # whole experts, the shared expert sliced
    pytest.param("mixtral", True, id="mixtral-ep2"),
]
PARALLEL_PROMPTS = token_prompts(3, vocab=400)


@pytest.fixture(scope="module")
def one_rank_outputs(moe_checkpoint):
    """The TP=1 engine's outputs per family, computed once."""
    outputs: dict[str, list] = {}

    def get(family: str) -> list:
        if family not in outputs:
            llm = LLM(model=str(moe_checkpoint(family)), kv_cache_memory_bytes=KV_BYTES)
            outputs[family] = generate(llm, PARALLEL_PROMPTS, max_tokens=8)
        return outputs[family]

    return get


@pytest.mark.parametrize("family, expert_parallel", PARALLEL_CASES)
def test_two_ranks_equal_one(moe_checkpoint, one_rank_outputs, family, expert_parallel):
    llm = LLM(model=str(moe_checkpoint(family)), tensor_parallel_size=2, enable_expert_parallel=expert_parallel,
              kv_cache_memory_bytes=KV_BYTES, max_num_batched_tokens=32)
    try:
        assert llm.engine.config.parallel.enable_expert_parallel is expert_parallel
        actual = generate(llm, PARALLEL_PROMPTS, max_tokens=8)
    finally:
        llm.shutdown()
    assert_same_outputs(actual, one_rank_outputs(family), TP_LOGPROB_ATOL)


@contextmanager
def _as_rank_zero_of(tp_size: int):
    """Models built inside are rank 0's of `tp_size` ranks (no collectives are needed to build one)."""
    from pagoda.engine.distributed import parallel_state

    saved = parallel_state._TP
    parallel_state._TP = parallel_state.TPGroup(rank=0, world_size=tp_size)
    try:
        yield
    finally:
        parallel_state._TP = saved


def _layers(config, tp_size: int, expert_parallel: bool, quant_config=None):
    """A model class built as rank 0 of `tp_size`."""
    with _as_rank_zero_of(tp_size):
        cls = ARCHITECTURES[config.model_type]
        return cls(config, 64, torch.float32, quant_config,
                   moe_options=MoeOptions(enable_expert_parallel=expert_parallel))


def test_expert_parallel_ranks_hold_whole_experts():
    config = tiny_moe_config("qwen3_moe")
    tp = _layers(config, 2, expert_parallel=False).model.layers[0].mlp.experts
    ep = _layers(config, 2, expert_parallel=True).model.layers[0].mlp.experts
    assert tuple(tp.w13_weight.shape) == (8, 2 * 16, 64) and tp.expert_map is None
    assert tuple(ep.w13_weight.shape) == (4, 2 * 32, 64)
    assert ep.expert_map.tolist() == [0, 1, 2, 3, -1, -1, -1, -1]
    dense = _layers(config, 2, expert_parallel=False).model.layers[1].mlp
    assert type(dense).__name__ == "LlamaMLP"


# -- refusals --------------------------------------------------------------------------------------
def config_only(tmp_path: Path, family: str, **overrides) -> str:
    config = tiny_moe_config(family, **overrides)
    config.architectures = [ARCHITECTURES[family].__name__]
    config.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("family, overrides, tp, expert_parallel, message", [
    ("qwen3_moe", dict(num_experts=6), 4, True, "num_experts=6 is not divisible by tensor_parallel_size=4"),
    ("mixtral", dict(intermediate_size=50), 4, False, "intermediate size 50 is not divisible"),
    ("qwen3_moe", dict(num_experts_per_tok=9), 1, False,
     "num_experts_per_tok (top_k) must be in [1, num_experts=8], got 9"),
    ("qwen2_moe", dict(shared_expert_intermediate_size=50), 4, False, "shared_expert_intermediate_size=50"),
    ("qwen3_moe", dict(intermediate_size=90), 4, False, "intermediate_size=90"),      # the dense layer's
])
def test_bad_splits_are_refused_by_name(tmp_path, family, overrides, tp, expert_parallel, message):
    path = config_only(tmp_path, family, num_attention_heads=4, num_key_value_heads=4, head_dim=16, **overrides)
    with pytest.raises(ValueError) as error:
        EngineArgs(model=path, tensor_parallel_size=tp, enable_expert_parallel=expert_parallel).create_config()
    assert message in str(error.value)


def test_expert_parallel_splits_what_tensor_parallel_cannot(tmp_path):
    """Experts of 50 features do not split over 4 ranks; 4 whole experts do."""
    path = config_only(tmp_path, "mixtral", intermediate_size=50, num_attention_heads=4, num_key_value_heads=4,
                       head_dim=16)
    config = EngineArgs(model=path, tensor_parallel_size=4, enable_expert_parallel=True,
                        load_format="dummy").create_config()
    assert config.parallel.enable_expert_parallel
    # the choice travels on ParallelConfig only: the checkpoint's config is left as it was
    assert not [key for key in config.model.hf_config.to_dict() if "expert_parallel" in key]
    # the model runner hands it to the model: built tensor-parallel, these experts would be refused
    model = _runner_model(config, config.model)
    assert model.model.layers[0].mlp.experts.num_local_experts == 1


def _runner_model(config, model_config):
    """The model the runner of rank 0 builds for `model_config` (the target's or a draft's)."""
    from pagoda.engine.worker.model_runner import ModelRunner

    runner = SimpleNamespace(config=config, device=torch.device("cpu"), dtype=torch.float32)
    with _as_rank_zero_of(config.parallel.tensor_parallel_size):
        return ModelRunner._load_model(runner, model_config)


def test_the_runner_gives_expert_parallelism_to_the_target_only(tmp_path):
    """A draft model's experts are split like a dense model's even when the target's are whole per rank."""
    path = config_only(tmp_path, "qwen3_moe")
    config = EngineArgs(model=path, tensor_parallel_size=2, enable_expert_parallel=True,
                        load_format="dummy").create_config()
    target = _runner_model(config, config.model).model.layers[0].mlp.experts
    draft = _runner_model(config, dataclasses.replace(config.model)).model.layers[0].mlp.experts
    assert target.expert_map.tolist() == [0, 1, 2, 3, -1, -1, -1, -1]
    assert draft.expert_map is None and tuple(draft.w13_weight.shape) == (8, 2 * 16, 64)
    dense = EngineArgs(model=path, tensor_parallel_size=2, load_format="dummy").create_config()
    assert _runner_model(dense, dense.model).model.layers[0].mlp.experts.expert_map is None


def test_expert_parallel_on_a_dense_model_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="enable_expert_parallel=True needs a mixture-of-experts model; "
                                         "LlamaForCausalLM has no experts"):
        EngineArgs(model=str(tiny_checkpoint()), enable_expert_parallel=True).create_config()
    with pytest.raises(ValueError, match="enable_expert_parallel must be True or False, got 'yes'"):
        EngineArgs(model=str(tiny_checkpoint()), enable_expert_parallel="yes").create_config()


def test_quantized_experts_are_refused_by_name(moe_checkpoint):
    with pytest.raises(ValueError, match=r"quantization='fp8' is not supported for the expert weights of "
                                         r"Qwen3MoeForCausalLM \(e.g. model.layers.0.mlp.experts\)"):
        LLM(model=str(moe_checkpoint("qwen3_moe")), quantization="fp8", kv_cache_memory_bytes=KV_BYTES)


def test_dense_layers_may_be_quantized_when_the_experts_are_not():
    """A scheme that leaves the experts (and router) alone quantizes the attention and dense MLPs."""
    quant = Fp8Config(Fp8Scheme("online"), ignored_layers=(r"re:.*\.mlp\.experts\..*", r"re:.*\.mlp\.gate$"))
    model = _layers(tiny_moe_config("qwen3_moe"), 1, False, quant)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj.quant_method, Fp8LinearMethod)
    assert isinstance(model.model.layers[1].mlp.gate_up_proj.quant_method, Fp8LinearMethod)     # dense layer
    assert model.model.layers[0].mlp.experts.w13_weight.dtype == torch.float32


def test_dummy_weights_build_a_random_moe_model(moe_checkpoint):
    llm = LLM(model=str(moe_checkpoint("qwen2_moe")), load_format="dummy", kv_cache_memory_bytes=KV_BYTES)
    output = generate(llm, token_prompts(1, vocab=400), max_tokens=4)[0].outputs[0]
    assert len(output.token_ids) == 4
    assert all(torch.isfinite(torch.tensor(entry[t].logprob)) for entry, t in zip(output.logprobs, output.token_ids))
