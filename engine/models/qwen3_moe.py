"""Qwen3-MoE, and the sparse decoder the mixture-of-experts families share (`MoeForCausalLM`).

A MoE family is the Llama decoder (llama.py) whose feed-forward block is, on its sparse layers, a
`SparseMoeBlock` (layers/moe.py: router, fused experts, optional shared expert) and on the others
a dense LlamaMLP. Qwen3-MoE: per-head q/k RMSNorm, `decoder_sparse_step` / `mlp_only_layers` choose
the sparse layers, `norm_topk_prob` renormalises the chosen experts' weights.

Checkpoint names: every expert's projections (`mlp.experts.<e>.gate_proj.weight`, Mixtral's
`w1`/`w3`/`w2`) go to the layer's fused `w13_weight` / `w2_weight` as shard `(e, projection)`; a
stacked tensor of all experts (`mlp.experts.gate_up_proj`, as transformers 5 holds them in memory)
as shard `"w13"` / `"w2"`.

Expert parallelism (`EngineArgs.enable_expert_parallel`, held by ParallelConfig) reaches the model
as the keyword `moe_options` (layers/moe.py `MoeOptions`), which the model runner builds for the
MoE families (registry.py `is_moe_model`); the Hugging Face config stays the checkpoint's.
"""
from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn as nn

from ..distributed.parallel_state import get_tp_size
from ..layers.moe import (TRANSFORMERS_STACKED, FusedMoE, MoeOptions, SparseMoeBlock, StackedLayout,
                          check_moe_parallel)
from ..quantization.base import QuantizationConfig, UnquantizedLinearMethod
from .llama import MLP_SLOT, LlamaForCausalLM, LlamaMLP, check_tensor_parallel

_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\."
                         r"(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.(?P<kind>weight|bias)$")
_STACKED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<bias>_bias)?$")
_EXPERT_PARAM = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<leaf>w13_weight|w2_weight|w13_bias|w2_bias)$")
_PROJECTION = {"gate_proj": "w1", "w1": "w1", "up_proj": "w3", "w3": "w3", "down_proj": "w2", "w2": "w2"}


class MoeForCausalLM(LlamaForCausalLM):
    """The Llama decoder with sparse MoE feed-forward blocks (see the module docstring).

    Family switches: `always_renormalize` (else the config's `norm_topk_prob`), `shared_expert`
    (Qwen2-MoE's gated shared expert), `checkpoint_renames` (checkpoint fragment -> ours, e.g.
    Mixtral's `block_sparse_moe` -> `mlp`), `expert_checkpoint_module` (one expert projection's
    checkpoint name inside a layer, for quantization schemes' per-module rules), `stacked_layout`."""

    always_renormalize = False
    shared_expert = False
    checkpoint_renames: dict[str, str] = {}
    expert_checkpoint_module = "mlp.experts.0.gate_proj"
    stacked_layout: StackedLayout = TRANSFORMERS_STACKED

    def __init__(self, config: Any, max_position: int, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig] = None, *,
                 moe_options: MoeOptions = MoeOptions()) -> None:
        if not isinstance(moe_options, MoeOptions):
            raise ValueError(f"moe_options must be a MoeOptions, got {moe_options!r}")
        type(self).check_parallel(config, get_tp_size(), moe_options.enable_expert_parallel)
        self._refuse_quantized_experts(config, quant_config)
        # NOTE: set before the Llama constructor, which builds the layers through make_mlp (a plain
        # value, so nn.Module accepts it before its own __init__)
        self.moe_options = moe_options
        super().__init__(config, max_position, dtype, quant_config)

    # -- geometry ----------------------------------------------------------------------------------
    @classmethod
    def num_experts(cls, config: Any) -> int:
        return int(config.num_experts)

    @classmethod
    def expert_intermediate_size(cls, config: Any) -> int:
        return int(config.moe_intermediate_size)

    @classmethod
    def is_sparse_layer(cls, config: Any, layer_index: int) -> bool:
        """As transformers' Qwen2/3-MoE decoder layer decides (Mixtral's config has neither key: all sparse)."""
        step = getattr(config, "decoder_sparse_step", 1) or 1
        return (layer_index not in (getattr(config, "mlp_only_layers", None) or [])
                and cls.num_experts(config) > 0 and (layer_index + 1) % step == 0)

    @classmethod
    def check_parallel(cls, config: Any, tp_size: int, enable_expert_parallel: bool) -> None:
        """Raises ValueError naming the value when the model does not split over `tp_size` ranks:
        attention heads and dense MLPs as Llama's, experts per `check_moe_parallel`."""
        dense = any(not cls.is_sparse_layer(config, i) for i in range(config.num_hidden_layers))
        check_tensor_parallel(SimpleNamespace(
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None),
            intermediate_size=config.intermediate_size if dense else 0), tp_size)
        if not any(cls.is_sparse_layer(config, i) for i in range(config.num_hidden_layers)):
            return
        check_moe_parallel(cls.num_experts(config), config.num_experts_per_tok, cls.expert_intermediate_size(config),
                           tp_size, enable_expert_parallel)
        if cls.shared_expert and config.shared_expert_intermediate_size % tp_size:
            raise ValueError(f"shared_expert_intermediate_size={config.shared_expert_intermediate_size} is not "
                             f"divisible by tensor_parallel_size={tp_size}")

    def _refuse_quantized_experts(self, config: Any, quant_config: Optional[QuantizationConfig]) -> None:
        """Dense layers may be quantized; the fused experts cannot (yet): refuse by name."""
        if quant_config is None:
            return
        for i in range(config.num_hidden_layers):
            if not self.is_sparse_layer(config, i):
                continue
            module = f"model.layers.{i}.{self.expert_checkpoint_module}"
            if quant_config.name == "gguf" or not isinstance(quant_config.linear_method(module),
                                                             UnquantizedLinearMethod):
                raise ValueError(
                    f"quantization={quant_config.name!r} is not supported for the expert weights of "
                    f"{type(self).__name__} (e.g. {module.rsplit('.', 2)[0]}): the fused experts run "
                    f"unquantized only; serve an unquantized checkpoint without --quantization")

    # -- the feed-forward blocks -------------------------------------------------------------------
    def make_mlp(self, layer_index: int, prefix: str) -> nn.Module:
        config = self.config
        if not self.is_sparse_layer(config, layer_index):
            return super().make_mlp(layer_index, prefix)
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported for the experts (only 'silu')")
        experts = FusedMoE(self.num_experts(config), config.num_experts_per_tok, config.hidden_size,
                           self.expert_intermediate_size(config), self.dtype,
                           enable_expert_parallel=self.moe_options.enable_expert_parallel,
                           stacked_layout=self.stacked_layout, partial_slot=MLP_SLOT)
        shared = None
        if self.shared_expert:
            shared_config = SimpleNamespace(hidden_size=config.hidden_size, hidden_act=act,
                                            intermediate_size=config.shared_expert_intermediate_size)
            shared = LlamaMLP(shared_config, self.dtype, self.quant_config, f"{prefix}.shared_expert")
        renormalize = self.always_renormalize or bool(getattr(config, "norm_topk_prob", False))
        return SparseMoeBlock(experts, self.dtype, scoring="softmax", renormalize=renormalize,
                              shared_expert=shared, shared_expert_gate=self.shared_expert)

    # -- checkpoint names --------------------------------------------------------------------------
    def checkpoint_target(self, name: str) -> tuple[str, Any]:
        for fragment, ours in self.checkpoint_renames.items():
            name = name.replace(fragment, ours)
        match = _PER_EXPERT.match(name)
        if match:
            kind = "w2" if _PROJECTION[match["proj"]] == "w2" else "w13"
            return f"{match['prefix']}.{kind}_{match['kind']}", (int(match["expert"]), _PROJECTION[match["proj"]])
        match = _STACKED.match(name)
        if match:
            kind = "w13" if match["proj"] == "gate_up_proj" else "w2"
            return f"{match['prefix']}.{kind}_{'bias' if match['bias'] else 'weight'}", kind
        return super().checkpoint_target(name)

    def expected_loads(self, param_name: str) -> set[str]:
        match = _EXPERT_PARAM.match(param_name)
        if match:
            experts = self.get_submodule(match["prefix"])
            return {f"{param_name}:{shard}" for shard in experts.expected_shards(match["leaf"])}
        return super().expected_loads(param_name)


class Qwen3MoeForCausalLM(MoeForCausalLM):
    qk_norm = True
