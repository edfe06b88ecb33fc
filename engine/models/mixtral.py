"""Mixtral: the Llama decoder with a sparse MoE block on every layer (softmax router, the chosen
experts' weights always renormalised to sum to 1).

Its checkpoints name the block `block_sparse_moe` (ours: `mlp`) and an expert's projections
`w1` (gate), `w3` (up), `w2` (down); `MoeForCausalLM.checkpoint_target` maps both.
"""
from __future__ import annotations

from typing import Any

from .qwen3_moe import MoeForCausalLM


class MixtralForCausalLM(MoeForCausalLM):
    always_renormalize = True
    checkpoint_renames = {".block_sparse_moe.": ".mlp."}
    expert_checkpoint_module = "block_sparse_moe.experts.0.w1"

    @classmethod
    def num_experts(cls, config: Any) -> int:
        return int(config.num_local_experts)

    @classmethod
    def expert_intermediate_size(cls, config: Any) -> int:
        return int(config.intermediate_size)          # Mixtral's only MLP size is the experts'
