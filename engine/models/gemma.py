"""Gemma 2 (`Gemma2ForCausalLM`) and the Gemma 3 text model (`Gemma3ForCausalLM`, model_type
gemma3_text): tensor-parallel decoders in the shape of models/llama.py, with Gemma's differences:

- Gemma norms, x * (1 + w) (`GemmaRMSNorm`), four per layer: input, post-attention (on the attention
  output, before the residual add), pre-feedforward and post-feedforward (on the MLP output);
- embeddings multiplied by sqrt(hidden_size), rounded to the model dtype as Hugging Face does, and an
  LM head tied to them (unless the config unties it);
- a GeLU-tanh gated MLP (`gelu_pytorch_tanh`);
- attention scale query_pre_attn_scalar ** -0.5; the sliding window on the layers `layer_types` marks
  "sliding_attention" (configs without the list: every other layer for Gemma 2, five of six for
  Gemma 3);
- Gemma 2: attention-logit soft-capping (`attn_logit_softcapping`) in the attention kernels and
  final-logit soft-capping (`final_logit_softcapping`) in `compute_logits` (greedy decoding stays an
  argmax of the raw logits: tanh is monotonic);
- Gemma 3: RMSNorm (Gemma's) on q and k per head, and two rope tables: local (sliding) layers use
  the sliding entry of `rope_parameters` (older configs: rope_local_base_freq, no scaling), global
  layers rope_theta with the config's scaling (linear for the larger models); Gemma 3 applies a
  final-logit soft-cap only if its config sets one, and never an attention soft-cap (as transformers).

Tensor parallelism: a norm sits between each row-parallel output and its residual add, so the
all-reduce + add + norm fusion of the Llama decoder does not apply; o_proj and down_proj all-reduce
themselves (RowParallelLinear with reduce_results=True), and the residual add is fused with the next
norm (pre-feedforward, or the next layer's input norm).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from pagoda.kernels.metadata import AttentionMetadata

from ..layers.activation import GeluTanhAndMul
from ..layers.attention import PagedAttention
from ..layers.embedding import ParallelLMHead, VocabParallelEmbedding, embedding_method_for
from ..layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ..layers.norm import GemmaRMSNorm
from ..layers.rotary import RotaryEmbedding, rope_parameters
from ..quantization.base import QuantizationConfig, linear_method_for
from .llama import LlamaAttention, LlamaForCausalLM

SLIDING, FULL = "sliding_attention", "full_attention"
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)


def gemma_layer_types(config: Any, sliding_pattern: int) -> list[str]:
    """Each layer's attention type: the config's `layer_types`, else every `sliding_pattern`-th layer
    full and the others sliding (Gemma 2: 2, Gemma 3: its sliding_window_pattern, 6 by default)."""
    types = getattr(config, "layer_types", None)
    if types is None:
        types = [FULL if (i + 1) % sliding_pattern == 0 else SLIDING for i in range(config.num_hidden_layers)]
    if len(types) != config.num_hidden_layers or any(t not in (SLIDING, FULL) for t in types):
        raise ValueError(f"layer_types must name {config.num_hidden_layers} layers, each {SLIDING!r} or "
                         f"{FULL!r}; got {types!r}")
    return list(types)


def gemma3_rope(config: Any, layer_type: str) -> tuple[float, dict]:
    """(theta, scaling) of Gemma 3's `layer_type` layers: transformers 5's per-layer-type
    `rope_parameters`, or an older config's rope_theta / rope_scaling (global) and
    rope_local_base_freq (local, unscaled)."""
    per_type = getattr(config, "rope_parameters", None) or {}
    if layer_type in per_type and isinstance(per_type[layer_type], dict):
        params = dict(per_type[layer_type])
        for key in ("partial_rotary_factor", "original_max_position_embeddings"):
            if getattr(config, key, None) is not None:
                params.setdefault(key, getattr(config, key))
        return float(params.get("rope_theta", 1_000_000.0 if layer_type == FULL else 10_000.0)), params
    if layer_type == SLIDING:
        return float(getattr(config, "rope_local_base_freq", None) or 10_000.0), {}
    return rope_parameters(config)


class GemmaMLP(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, quant_config: Optional[QuantizationConfig],
                 prefix: str) -> None:
        super().__init__()
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_activation {act!r} is not supported for Gemma (supported: "
                             f"{', '.join(SUPPORTED_ACTIVATIONS)})")
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [inter, inter], dtype=dtype,
            quant_method=linear_method_for(quant_config, f"{prefix}.gate_up_proj"))
        self.act = GeluTanhAndMul()
        self.down_proj = RowParallelLinear(inter, config.hidden_size, dtype=dtype,
                                           quant_method=linear_method_for(quant_config, f"{prefix}.down_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (T, hidden) -> (T, hidden), reduced
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GemmaAttention(LlamaAttention):
    """Llama's attention forward (inherited) over Gemma's parts: Gemma norms on q and k, the scale
    query_pre_attn_scalar ** -0.5, logit soft-capping, a rope table shared per attention type, and an
    output projection that sums over TP ranks itself (a norm sits between it and the residual add)."""

    def __init__(self, config: Any, rotary: RotaryEmbedding, sliding_window: Optional[int],
                 logit_softcap: Optional[float], qk_norm: bool, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        nn.Module.__init__(self)          # NOTE: the parts below, not LlamaAttention's; its forward reads them
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, num_heads, num_kv_heads, bias=bias, dtype=dtype,
                                          quant_method=linear_method_for(quant_config, f"{prefix}.qkv_proj"))
        self.num_heads = self.qkv_proj.num_heads          # per rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads    # per rank
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden, bias=bias, dtype=dtype,
                                        quant_method=linear_method_for(quant_config, f"{prefix}.o_proj"))
        self.rotary = rotary                              # shared by the layers of one attention type
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        scalar = getattr(config, "query_pre_attn_scalar", None) or self.head_dim
        self.attn = PagedAttention(self.num_heads, self.head_dim, self.num_kv_heads, float(scalar) ** -0.5,
                                   sliding_window=sliding_window, logit_softcap=logit_softcap)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: Any, attention: GemmaAttention, mlp: GemmaMLP) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the scaled embeddings (first layer, residual None) or the previous layer's normed MLP
        output (not yet added to the residual); returns this layer's and the residual."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        attended = self.post_attention_layernorm(self.self_attn(positions, hidden, metadata))
        hidden, residual = self.pre_feedforward_layernorm(attended, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: Any, layers: list[GemmaDecoderLayer], dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype,
                                                   embedding_method_for(quant_config, "model.embed_tokens"))
        # NOTE: sqrt(hidden) rounded to the model dtype first, as Hugging Face's scaled embedding does
        normalizer = torch.tensor(config.hidden_size ** 0.5, dtype=torch.float32).to(dtype)
        self.register_buffer("normalizer", normalizer, persistent=False)
        self.layers = nn.ModuleList(layers)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * self.normalizer              # (T, hidden)
        residual: Optional[torch.Tensor] = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        if residual is None:                  # no layers
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2. NOTE: a LlamaForCausalLM for its checkpoint loading (q/k/v and gate/up routed into the
    fused layers), logits, greedy argmax and attention-layer list; the decoder is Gemma's own, built
    here instead of the Llama one (Llama's __init__ is not called)."""

    qk_norm = False
    attention_softcap = True         # Gemma 3 has the config field but never applies it
    sliding_pattern = 2              # older configs without layer_types: every other layer is global

    def __init__(self, config: Any, max_position: int, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig] = None) -> None:
        nn.Module.__init__(self)
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention=True (an embedding model's attention) is not supported "
                             f"by {type(self).__name__}, a causal language model")
        self.config = config
        self.quant_config = quant_config
        self.dtype = dtype
        types = gemma_layer_types(config, self.sliding_pattern)
        rotary = {kind: RotaryEmbedding.shared(*self._rope_args(config, kind, max_position)) for kind in set(types)}
        softcap = getattr(config, "attn_logit_softcapping", None) if self.attention_softcap else None
        layers = []
        for i, kind in enumerate(types):
            prefix = f"model.layers.{i}"
            window = int(config.sliding_window) if kind == SLIDING and config.sliding_window else None
            attention = GemmaAttention(config, rotary[kind], window, softcap, self.qk_norm, dtype, quant_config,
                                       f"{prefix}.self_attn")
            layers.append(GemmaDecoderLayer(config, attention, self.make_mlp(i, f"{prefix}.mlp")))
        self.model = GemmaModel(config, layers, dtype, quant_config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        if self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype,
                                          tied_to=self.model.embed_tokens)
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype,
                                          embedding_method_for(quant_config, "lm_head"))
        self.final_logit_softcap = getattr(config, "final_logit_softcapping", None)

    def _rope_args(self, config: Any, layer_type: str, max_position: int) -> tuple[int, int, float, dict]:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        theta, scaling = rope_parameters(config)
        return head_dim, max_position, theta, scaling

    def make_mlp(self, layer_index: int, prefix: str) -> nn.Module:
        return GemmaMLP(self.config, self.dtype, self.quant_config, prefix)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:    # (S, hidden) -> (S, vocab) fp32
        logits = self.lm_head.compute_logits(hidden).float()
        if self.final_logit_softcap:
            cap = float(self.final_logit_softcap)
            logits = torch.tanh(logits / cap) * cap
        return logits


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """The Gemma 3 text model (the decoder of the multimodal checkpoints, alone)."""

    qk_norm = True
    attention_softcap = False

    @property
    def sliding_pattern(self) -> int:      # type: ignore[override]
        return int(getattr(self.config, "sliding_window_pattern", None) or 6)

    def _rope_args(self, config: Any, layer_type: str, max_position: int) -> tuple[int, int, float, dict]:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        theta, scaling = gemma3_rope(config, layer_type)
        return head_dim, max_position, theta, scaling
