"""The Llama decoder family: Llama 2/3 (incl. llama3 rope scaling), SmolLM2, TinyLlama, Mistral,
and, through two switches, Qwen2 (bias on q/k/v) and Qwen3 (RMSNorm on q and k per head); Phi-3
(models/phi3.py) only routes its fused checkpoint tensors. A config's sliding window (Mistral,
Qwen2 with use_sliding_window, Phi-3) reaches the layers it names (`sliding_window_for`).

Written tensor-parallel from the start: every rank holds `num_heads / tp` query heads and its
share of KV heads; the embedding and LM head are split over the vocabulary.

The forward pass takes the flattened batch (T tokens of all sequences) with explicit positions
and attention metadata, and returns hidden states (T, hidden); logits are computed only for the
rows the sampler needs (`compute_logits`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from pagoda.kernels.metadata import AttentionMetadata

from ..layers.activation import SiluAndMul
from ..layers.attention import PagedAttention
from ..layers.embedding import ParallelLMHead, VocabParallelEmbedding, embedding_method_for
from ..layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding, rope_parameters
from ..quantization.base import QuantizationConfig, layout_of, linear_method_for, process_weights_after_loading

# The symmetric-memory slots of the two row-parallel outputs of a decoder layer: the fused
# all-reduce + add + norm calls then alternate slots (o_proj, down_proj, o_proj, ...), as
# kernels/all_reduce_norm_triton.py requires.
ATTN_SLOT, MLP_SLOT = 0, 1


def sliding_window_for(config: Any, layer_index: int) -> Optional[int]:
    """The sliding window of decoder layer `layer_index` (None: full attention), as transformers reads
    it: `sliding_window` unless `use_sliding_window` is false, on the layers `layer_types` marks
    "sliding_attention" where the config lists them (Qwen2 / Qwen3: from max_window_layers on),
    else on every layer (Mistral, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_index] != "sliding_attention":
        return None
    return int(window)


@dataclass(frozen=True)
class AttentionOptions:
    """What a family changes in the Llama attention block (LlamaForCausalLM.attention_options)."""
    qkv_bias: bool = False      # Qwen2, gpt-oss: bias on the q/k/v projections
    qk_norm: bool = False       # Qwen3: RMSNorm on q and k, per head
    o_bias: bool = False        # gpt-oss: bias on the output projection
    sinks: bool = False         # gpt-oss: a learned logit per head in the softmax's denominator


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, max_position: int, dtype: torch.dtype, options: AttentionOptions,
                 quant_config: Optional[QuantizationConfig], prefix: str,
                 sliding_window: Optional[int] = None) -> None:
        super().__init__()
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, num_heads, num_kv_heads, bias=options.qkv_bias,
                                          dtype=dtype,
                                          quant_method=linear_method_for(quant_config, f"{prefix}.qkv_proj"))
        self.num_heads = self.qkv_proj.num_heads          # per rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads    # per rank
        # unreduced: the post-attention norm sums it over ranks (fused with the residual add)
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden, bias=options.o_bias, dtype=dtype,
                                        reduce_results=False, partial_slot=ATTN_SLOT,
                                        quant_method=linear_method_for(quant_config, f"{prefix}.o_proj"))
        theta, scaling = rope_parameters(config)
        self.rotary = RotaryEmbedding.shared(self.head_dim, max_position, theta, scaling)
        self.qk_norm = options.qk_norm
        if options.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.attn = PagedAttention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim ** -0.5,
                                   sliding_window=sliding_window, use_sinks=options.sinks)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)                                           # (T, (H + 2 Hkv) D)
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)              # (T, H, D)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)           # (T, Hkv, D)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, metadata)                                    # (T, H, D)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, quant_config: Optional[QuantizationConfig], prefix: str) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [inter, inter], dtype=dtype,
            quant_method=linear_method_for(quant_config, f"{prefix}.gate_up_proj"))
        self.act = SiluAndMul()
        # unreduced: the next layer's input norm (or the final norm) sums it over ranks
        self.down_proj = RowParallelLinear(inter, config.hidden_size, dtype=dtype,
                                           reduce_results=False, partial_slot=MLP_SLOT,
                                           quant_method=linear_method_for(quant_config, f"{prefix}.down_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


# (layer index, module prefix) -> the layer's feed-forward block
MLPFactory = Callable[[int, str], nn.Module]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, max_position: int, dtype: torch.dtype, options: AttentionOptions,
                 quant_config: Optional[QuantizationConfig], prefix: str, mlp: nn.Module,
                 sliding_window: Optional[int] = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, max_position, dtype, options, quant_config,
                                        f"{prefix}.self_attn", sliding_window)
        self.mlp = mlp          # LlamaMLP, or a family's own block (experts): (T, hidden) -> unreduced
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the embeddings (first layer, residual None) or the previous layer's MLP output,
        unreduced over TP ranks; returns this layer's MLP output (unreduced) and the residual."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.reduce_add(hidden, residual, MLP_SLOT)
        partial = self.self_attn(positions, hidden, metadata)                # (T, hidden), unreduced
        hidden, residual = self.post_attention_layernorm.reduce_add(partial, residual, ATTN_SLOT)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, max_position: int, dtype: torch.dtype, options: AttentionOptions,
                 quant_config: Optional[QuantizationConfig], make_mlp: MLPFactory) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype,
                                                   embedding_method_for(quant_config, "model.embed_tokens"))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, max_position, dtype, options, quant_config, f"model.layers.{i}",
                              make_mlp(i, f"model.layers.{i}.mlp"), sliding_window_for(config, i))
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)                                 # (T, hidden)
        residual: Optional[torch.Tensor] = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        if residual is None:                  # no layers
            return self.norm(hidden)
        hidden, _ = self.norm.reduce_add(hidden, residual, MLP_SLOT)
        return hidden


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False
    # checkpoint name fragment -> (our fused parameter fragment, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any, max_position: int, dtype: torch.dtype,
                 quant_config: Optional[QuantizationConfig] = None) -> None:
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        self.dtype = dtype
        self.model = LlamaModel(config, max_position, dtype, self.attention_options(), quant_config, self.make_mlp)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:        # the embedding's weight, quantized or not
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype,
                                          tied_to=self.model.embed_tokens)
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype,
                                          embedding_method_for(quant_config, "lm_head"))

    def attention_options(self) -> AttentionOptions:
        """The family's attention switches (the class attributes qkv_bias / qk_norm; a family with
        more, e.g. gpt-oss, overrides this)."""
        return AttentionOptions(qkv_bias=self.qkv_bias, qk_norm=self.qk_norm)

    def make_mlp(self, layer_index: int, prefix: str) -> nn.Module:
        """The feed-forward block of decoder layer `layer_index` (a family with experts overrides this)."""
        return LlamaMLP(self.config, self.dtype, self.quant_config, prefix)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:    # (S, hidden) -> (S, vocab) fp32
        return self.lm_head.compute_logits(hidden).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:     # (S, hidden) -> (S,) int64
        """The argmax token of each row, the logits never gathered across TP ranks (a collective)."""
        return self.lm_head.greedy(hidden)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def checkpoint_target(self, name: str) -> tuple[str, Any]:
        """(our parameter's name, shard id) for checkpoint tensor `name`: a tensor of a module that we
        fuse (q/k/v, gate/up) goes to the fused parameter as one shard; any other keeps its name (None)."""
        for fragment, (fused, shard) in self.packed_modules_mapping.items():
            if f".{fragment}." in name:
                return name.replace(f".{fragment}.", f".{fused}."), shard
        return name, None

    def expected_loads(self, param_name: str) -> set[str]:
        """What loading must have filled for parameter `param_name`: its name, or `name:shard` for each
        shard of a fused parameter (the keys `_load_checkpoint_tensors` records)."""
        shards = [shard for fused, shard in self.packed_modules_mapping.values() if f".{fused}." in param_name]
        return {f"{param_name}:{shard}" for shard in shards} if shards else {param_name}

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Loads Hugging Face-named checkpoint tensors (every parameter filled exactly once), then lets
        quantized layers convert them. NOTE: in two calls so that no reference to a checkpoint-format
        parameter outlives the first: a conversion frees them, and a model held twice (as loaded and as
        converted) may not fit the GPU."""
        self._load_checkpoint_tensors(weights)
        process_weights_after_loading(self)

    def _load_checkpoint_tensors(self, weights: Iterable[tuple[str, Any]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, weight in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            # KV-cache scales (optional; before the q/k/v routing, which `k_proj.output_scale` would match)
            kv_scale = PagedAttention.checkpoint_kv_scale(name)
            if kv_scale is not None:
                attention, which = kv_scale
                if which is not None:
                    attn = modules.get(f"{attention}.attn")
                    if not isinstance(attn, PagedAttention):
                        raise ValueError(f"checkpoint tensor {name!r} has no matching attention layer in "
                                         f"{type(self).__name__}")
                    attn.load_kv_scale(which, weight.load(dtype=torch.float32), name)
                continue
            if self.quant_config is not None and self.quant_config.checkpoint_ignored(name):
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            target, shard_id = self.checkpoint_target(name)
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}")
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                param.data.copy_(weight.load(dtype=param.dtype))
            else:
                loader(param, weight, shard_id)
            loaded.add(target if shard_id is None else f"{target}:{shard_id}")
        expected = set()
        for name, param in params.items():
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            if not layout_of(param).from_checkpoint or layout_of(param).optional:
                continue
            expected |= self.expected_loads(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")




class MistralForCausalLM(LlamaForCausalLM):
    pass


def check_tensor_parallel(config: Any, tp_size: int) -> None:
    """Raises a clear error when the head counts do not split over tp_size ranks."""
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    if num_heads % tp_size:
        raise ValueError(f"the model has {num_heads} attention heads, which tensor_parallel_size={tp_size} "
                         "does not divide")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(f"the model has {num_kv_heads} KV heads; tensor_parallel_size={tp_size} must divide "
                         "it or be a multiple of it")
    if config.intermediate_size % tp_size:
        raise ValueError(f"intermediate_size={config.intermediate_size} is not divisible by "
                         f"tensor_parallel_size={tp_size}")
