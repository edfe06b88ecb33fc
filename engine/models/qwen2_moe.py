"""Qwen2-MoE: the sparse decoder of qwen3_moe.py with bias on q/k/v (config `qkv_bias`) and, in
every sparse block, a shared expert that every token goes through, scaled per token by
sigmoid(`shared_expert_gate`(x)) and added to the routed experts' sum."""
from __future__ import annotations

from .qwen3_moe import MoeForCausalLM


class Qwen2MoeForCausalLM(MoeForCausalLM):
    shared_expert = True

    @property
    def qkv_bias(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.config, "qkv_bias", True))
