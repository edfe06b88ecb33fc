"""gpt-oss (GptOssForCausalLM): the sparse decoder of qwen3_moe.py with gpt-oss's attention and experts.

- Attention: q/k/v and o with biases; a learned sink logit per head in the softmax denominator
  (`PagedAttention(use_sinks=True)`, checkpoint `self_attn.sinks`); `layer_types` alternating
  "sliding_attention" (window `sliding_window`) and "full_attention"; YaRN rope (layers/rotary.py).
- Every layer's feed-forward block is a MoE block: the router `mlp.router` (weight and bias) takes
  the top-k logits first and softmaxes over those k (transformers' GptOssTopKRouter); the experts
  have biases and the clamped SwiGLU `swigluoai` (alpha 1.702, limit 7.0).
- Checkpoints: transformers' `save_pretrained` layout (stacked experts per layer, input-major with
  gate / up interleaved: `mlp.experts.gate_up_proj` (E, H, 2N), `down_proj` (E, N, H), their
  `_bias`), or the releases' MXFP4 experts (`..._blocks` / `..._scales`, quant_method "mxfp4"),
  dequantized to the model dtype at load (quantization/mxfp4.py).
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
import torch.nn as nn

from pagoda.kernels.moe_layout import SWIGLU_ALPHA, SWIGLU_LIMIT

from ..distributed.parallel_state import get_tp_rank, tp_partial_output
from ..layers.attention import PagedAttention
from ..layers.linear import LinearBase
from ..layers.moe import GPT_OSS_STACKED, FusedMoE
from ..quantization.base import UnquantizedLinearMethod
from .llama import MLP_SLOT, AttentionOptions
from .qwen3_moe import MoeForCausalLM

logger = logging.getLogger(__name__)


def route_top_k_then_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (T, E) -> (weights (T, top_k) float32, expert ids (T, top_k) int64): the top-k
    logits, then a softmax over those k only (equal to a softmax over all experts renormalised over
    the chosen ones, computed the way gpt-oss computes it)."""
    values, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(values.float(), dim=-1), ids


class GptOssMoeBlock(nn.Module):
    """`router` (a replicated linear layer with bias: every rank routes every token alike) and the
    fused `experts`; returns this rank's unreduced (T, H) share, as SparseMoeBlock does."""

    def __init__(self, experts: FusedMoE, dtype: torch.dtype) -> None:
        super().__init__()
        self.router = LinearBase(experts.hidden_size, [experts.num_experts], True, dtype, UnquantizedLinearMethod())
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_top_k_then_softmax(self.router(x), self.experts.top_k)
        out = tp_partial_output(x, self.experts.hidden_size, self.experts.partial_slot)
        return self.experts(x, weights, ids, out=out)


class GptOssForCausalLM(MoeForCausalLM):
    expert_checkpoint_module = "mlp.experts.gate_up_proj"
    stacked_layout = GPT_OSS_STACKED

    def attention_options(self) -> AttentionOptions:
        """Biases on q/k/v and o (the config's attention_bias) and the attention sinks."""
        bias = bool(getattr(self.config, "attention_bias", True))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, sinks=True)

    # -- geometry ----------------------------------------------------------------------------------
    @classmethod
    def num_experts(cls, config: Any) -> int:
        return int(config.num_local_experts)

    @classmethod
    def expert_intermediate_size(cls, config: Any) -> int:
        return int(config.intermediate_size)          # gpt-oss's only MLP size is the experts'

    @classmethod
    def is_sparse_layer(cls, config: Any, layer_index: int) -> bool:
        return True

    @classmethod
    def check_parallel(cls, config: Any, tp_size: int, enable_expert_parallel: bool) -> None:
        """Also run when the engine config is created: the SwiGLU constants are refused before any worker starts."""
        check_swiglu(config)
        super().check_parallel(config, tp_size, enable_expert_parallel)

    def make_mlp(self, layer_index: int, prefix: str) -> nn.Module:
        config = self.config
        experts = FusedMoE(self.num_experts(config), config.num_experts_per_tok, config.hidden_size,
                           self.expert_intermediate_size(config), self.dtype, activation="swigluoai", bias=True,
                           enable_expert_parallel=self.moe_options.enable_expert_parallel,
                           stacked_layout=self.stacked_layout, partial_slot=MLP_SLOT)
        return GptOssMoeBlock(experts, self.dtype)

    # -- loading -----------------------------------------------------------------------------------
    def checkpoint_target(self, name: str) -> tuple[str, Any]:
        sinks = PagedAttention.checkpoint_sinks(name)
        if sinks is not None:
            return sinks, None
        return super().checkpoint_target(name)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        mxfp4 = self.quant_config is not None and self.quant_config.name == "mxfp4"
        if mxfp4:
            # NOTE: imported here, as the quantization registry imports every scheme: only MXFP4 models load it
            from ..quantization.mxfp4 import dequantized_checkpoint

            device = next(self.parameters()).device        # decoded where the model lives
            weights = dequantized_checkpoint(weights, self.dtype, device)
        super().load_weights(weights)
        if mxfp4 and get_tp_rank() == 0:
            experts = [layer.mlp.experts for layer in self.model.layers]
            size = sum(t.numel() * t.element_size() for e in experts for t in (e.w13_weight, e.w2_weight))
            logger.info("gpt-oss MXFP4 expert weights dequantized to %s at load: %.2f GB%s",
                        str(self.dtype).removeprefix("torch."), size / 1e9,
                        "" if experts[0].tp_size == 1 else " per rank")


def check_swiglu(config: Any) -> None:
    """The fused MoE kernel's clamped SwiGLU has gpt-oss's constants built in: refuse other values by name."""
    for key, value in (("swiglu_alpha", SWIGLU_ALPHA), ("swiglu_limit", SWIGLU_LIMIT)):
        given = getattr(config, key, value)
        if given is None or float(given) != value:
            raise ValueError(f"{key}={given!r} is not supported: the experts' SwiGLU runs with {key}={value} "
                             f"(gpt-oss's)")
