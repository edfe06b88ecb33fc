"""Models to benchmark: the default model, a local checkpoint, or a random-weight model of a real shape.

No weights can be downloaded, and with EOS ignored GPU throughput does not depend on the weights'
values, so GPU numbers use random-weight models of real shapes (bench/README.md). For those,
`resolve_bench_model("llama3-8b-random")` writes a `config.json` (nothing else) into a temporary
directory; pagoda then builds the model from it with `load_format="dummy"` (random weights made
directly on the device) and Hugging Face with `AutoModelForCausalLM.from_config`. Shapes of other
families (Qwen3-MoE, Mixtral, Gemma 3, GPT-OSS) write their family's config.json, as the published
checkpoint spells it, so that the family's transformers config class reads it.

`ModelShape` is what the ceilings/floor arithmetic needs of a model: sizes, and from them parameter
count (total, and active per token for a mixture of experts), weight bytes (all of them, and those a
decode step of B tokens reads), KV bytes per token and attention FLOPs, split between full-attention
and sliding-window layers.
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

# name -> the config.json fields that differ between shapes. Everything else comes from the family's
# defaults (FAMILY_CONFIGS, keyed by `model_type`; absent = llama).
SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3-8B: 16.06 GB of bf16 weights; KV 131,072 bytes per token (32 layers x K,V x 8 heads x 128 x 2 B).
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0),
    # Llama-3-70B: 141 GB of bf16 weights, for tensor parallelism over 4 GPUs.
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0),
    # Llama-3.2-1B (meta-llama/Llama-3.2-1B config.json, without its llama3 rope scaling): 1.24 B params,
    # embedding tied; KV 32,768 bytes per token. Llama-3's 128,256-token vocabulary: a draft model for
    # llama3-8b / llama3-70b (--speculative-config '{"method": "draft_model", "model": "llama3.2-1b-random", ...}').
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=8192,
                        rope_theta=500000.0, tie_word_embeddings=True),
    # A few-million-parameter llama for CPU smoke runs of the harness. Its vocabulary exceeds 10,000 so
    # that W256's token ids (randint(0, 10000)) are valid.
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=16384, max_position_embeddings=4096,
                 rope_theta=10000.0),
    # Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B config.json): 48 layers, each with 128 experts of 768, top-8
    # renormalised; 30.5 B params (61.1 GB bf16), 3.35 B active per token; KV 98,304 bytes per token.
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], max_window_layers=48,
                          max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                          bos_token_id=151643, eos_token_id=151645),
    # Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1): 32 layers of 8 experts of 14336, top-2; 46.7 B params
    # (93.4 GB bf16: TP over 2+ GPUs), 12.9 B active per token.
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1000000.0,
                         router_aux_loss_coef=0.02),
    # Gemma 3 12B, the text decoder of google/gemma-3-12b-it (Gemma3ForCausalLM): 48 layers, five
    # sliding-window (1,024) layers to one global; 11.77 B params, embedding tied; KV 393,216 bytes per token.
    "gemma3-12b": dict(model_type="gemma3_text", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=262208,
                       query_pre_attn_scalar=256, sliding_window=1024, sliding_window_pattern=6,
                       max_position_embeddings=131072, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                       rope_scaling={"factor": 8.0, "rope_type": "linear"}),
    # GPT-OSS-20B (openai/gpt-oss-20b; its checkpoint holds the experts in MXFP4, this shape is bf16):
    # 24 layers alternating sliding-window (128) and full attention, 32 experts of 2880, top-4, biases
    # everywhere and attention sinks; 20.9 B params, 4.2 B active per token (3.6 B without the embedding).
    "gpt-oss-20b": dict(model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
                        num_local_experts=32, num_experts_per_tok=4, experts_per_token=4, sliding_window=128,
                        layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
                        initial_context_length=4096, rope_theta=150000.0,
                        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "original_max_position_embeddings": 4096, "truncate": False},
                        eos_token_id=200002, pad_token_id=199999),
    # a one-layer draft for `tiny` (CPU smoke runs of --speculative-config with method draft_model)
    "tiny-draft": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=64, vocab_size=16384, max_position_embeddings=4096,
                       rope_theta=10000.0),
    # CPU smoke runs of the MoE, Gemma 3 and GPT-OSS paths (vocabularies over 10,000 for W256, as `tiny`):
    # 8 experts of 128, top-2; one sliding-window (64) layer + one global layer; both.
    "tiny-moe": dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=16384, num_experts=8,
                     num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True,
                     max_position_embeddings=4096, rope_theta=10000.0),
    "tiny-gemma": dict(model_type="gemma3_text", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=16384,
                       query_pre_attn_scalar=64, sliding_window=64, sliding_window_pattern=2,
                       max_position_embeddings=4096, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                       rope_scaling={"factor": 8.0, "rope_type": "linear"}),
    "tiny-gpt-oss": dict(model_type="gpt_oss", hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=16384,
                         num_local_experts=8, num_experts_per_tok=2, experts_per_token=2, sliding_window=64,
                         layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4096,
                         initial_context_length=4096, rope_theta=150000.0,
                         rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                       "original_max_position_embeddings": 4096, "truncate": False}),
}
RANDOM_SUFFIX = "-random"

# model_type -> the config.json fields its shapes share (a shape's own fields override them).
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
                  "rms_norm_eps": 1e-6, "attention_bias": False, "tie_word_embeddings": False,
                  "use_sliding_window": False, "sliding_window": None, "rope_scaling": None,
                  "router_aux_loss_coef": 0.001, "output_router_logits": False},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
                "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "sliding_window": None,
                "output_router_logits": False},
    "gemma3_text": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
                    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "attention_bias": False,
                    "tie_word_embeddings": True, "final_logit_softcapping": None, "attn_logit_softcapping": None,
                    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
    "gpt_oss": {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_act": "silu",
                "rms_norm_eps": 1e-5, "attention_bias": True, "tie_word_embeddings": False, "swiglu_limit": 7.0,
                "router_aux_loss_coef": 0.9, "output_router_logits": False},
}
SLIDING_ATTENTION = "sliding_attention"


def shape_family(name: str) -> str:
    """The model_type of shape `name` (a key of SHAPES)."""
    if name not in SHAPES:
        raise ValueError(f"model shape must be one of {sorted(SHAPES)}, got {name!r}")
    return SHAPES[name].get("model_type", "llama")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only model (Llama and the families built like it), and what follows.

    dtype_bytes: bytes per weight and per KV element (2 for bf16/fp16, 4 for fp32).

    Parameters (every default describes Llama, whose numbers do not depend on the other fields):

        attention per layer = hidden * head_dim * (2 * heads + 2 * kv_heads)   q, o + k, v projections
                              [+ (heads + 2 * kv_heads) * head_dim]            qkv_bias
                              [+ hidden]                                       o_bias
                              [+ heads]                                        attention_sinks (one logit a head)
        norms per layer     = norms_per_layer * hidden [+ 2 * head_dim]        [qk_norm]
        dense MLP           = 3 * hidden * intermediate                        gate, up, down
        one expert          = 3 * hidden * moe_intermediate [+ 2 * moe_intermediate + hidden]   [expert_bias]
        router              = experts * hidden [+ experts]                     [expert_bias]
        shared expert       = 3 * hidden * shared_intermediate + hidden        (its sigmoid gate), if any
        dense layer         = attention + dense MLP + norms                    (`params_per_layer`)
        sparse layer        = attention + experts * one expert + router + shared expert + norms
        params              = vocab * hidden (embedding) + dense layers * dense layer
                              + sparse layers * sparse layer + hidden (final norm)
                              + vocab * hidden (LM head, unless tied)
        active params       = params - sparse layers * (experts - experts_per_tok) * one expert
                              (what one token computes with: the matmul FLOPs are 2 * active params a token)

    Weight bytes a forward pass over B tokens reads (`step_weight_bytes`), experts routed uniformly:

        experts hit(B)      = experts * (1 - (1 - experts_per_tok / experts) ** B)      per sparse layer
        step weight bytes   = weight bytes - sparse layers * (experts - experts hit(B)) * one expert's bytes

    Sparse layers: `num_sparse_layers` of the `num_layers` (None = all of them when num_experts > 0).
    Sliding-window layers: `num_sliding_layers` (None = all of them when sliding_window is set) attend
    to at most the last `sliding_window` keys; KV bytes per token and attention FLOPs per pair are split
    into the full-attention layers' and the sliding layers' parts (their sum is over all layers).
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    dtype_bytes: int = 2
    # quantized formats: bytes per weight of the decoder's linear layers, scales included (None = dtype_bytes;
    # the embedding and LM head stay in the model dtype), bytes per KV element (None = dtype_bytes), and the
    # matmul rate relative to the measured bf16 one (2 for FP8 W8A8; 1 for weight-only formats, whose math is bf16)
    linear_weight_bytes: float | None = None
    kv_element_bytes: int | None = None
    matmul_rate_factor: float = 1.0
    # the families' extras to Llama's layer
    norms_per_layer: int = 2                    # RMSNorms of width hidden (Gemma: 4)
    qk_norm: bool = False                       # RMSNorm of width head_dim on q and on k (Qwen3, Gemma 3)
    qkv_bias: bool = False                      # Qwen2, GPT-OSS
    o_bias: bool = False                        # GPT-OSS
    attention_sinks: bool = False               # GPT-OSS
    # mixture of experts (num_experts = 0: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_sparse_layers: Optional[int] = None
    shared_expert_intermediate_size: int = 0    # Qwen2-MoE
    expert_bias: bool = False                   # GPT-OSS
    # sliding-window attention
    sliding_window: Optional[int] = None
    num_sliding_layers: Optional[int] = None

    @classmethod
    def from_hf_config(cls, config: Any, dtype_bytes: int = 2) -> "ModelShape":
        """The shape of a transformers config of a Llama-built family: Llama, Mistral, Qwen2/3, Phi-3,
        Gemma 2/3, Qwen2/3-MoE, Mixtral, GPT-OSS (which layers are sparse or windowed: as transformers
        decides)."""
        num_heads = int(config.num_attention_heads)
        model_type = str(getattr(config, "model_type", "") or "")
        num_layers = int(config.num_hidden_layers)
        num_experts = int(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0)
        sparse = _sparse_layer_count(config, num_experts, num_layers)
        window, sliding = _sliding_layers(config, model_type, num_layers)
        if model_type in ("qwen2", "qwen2_moe"):          # q/k/v biases, none on o
            qkv_bias, o_bias = bool(getattr(config, "qkv_bias", True)), False
        else:                                             # Llama's attention_bias: q, k, v and o
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or num_heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // num_heads),
            vocab_size=int(config.vocab_size),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            dtype_bytes=dtype_bytes,
            norms_per_layer=4 if model_type.startswith("gemma") else 2,
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text", "gemma3"),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            attention_sinks=model_type == "gpt_oss",
            num_experts=num_experts if sparse else 0,
            num_experts_per_tok=int(getattr(config, "num_experts_per_tok", 0) or 0) if sparse else 0,
            # Mixtral's and GPT-OSS's only MLP size is the experts'
            moe_intermediate_size=int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)
            if sparse else 0,
            num_sparse_layers=sparse if sparse else None,
            shared_expert_intermediate_size=int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
            if sparse else 0,
            expert_bias=model_type == "gpt_oss",
            sliding_window=window,
            num_sliding_layers=sliding if window else None,
        )

    # -- parameters ------------------------------------------------------------------------------------
    @property
    def sparse_layers(self) -> int:
        if self.num_experts <= 0:
            return 0
        return self.num_layers if self.num_sparse_layers is None else self.num_sparse_layers

    @property
    def attention_params_per_layer(self) -> int:
        hidden, head_dim = self.hidden_size, self.head_dim
        params = hidden * head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)      # q, o + k, v
        if self.qkv_bias:
            params += (self.num_heads + 2 * self.num_kv_heads) * head_dim
        if self.o_bias:
            params += hidden
        if self.attention_sinks:
            params += self.num_heads
        return params

    @property
    def norm_params_per_layer(self) -> int:
        return self.norms_per_layer * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def params_per_layer(self) -> int:
        """A dense layer: attention + gate/up/down of intermediate_size + norms."""
        mlp = 3 * self.hidden_size * self.intermediate_size                             # gate, up, down
        return self.attention_params_per_layer + mlp + self.norm_params_per_layer

    @property
    def expert_params(self) -> int:
        """One expert's gate, up and down projections (and their biases)."""
        hidden, inter = self.hidden_size, self.moe_intermediate_size
        return 3 * hidden * inter + ((2 * inter + hidden) if self.expert_bias else 0)

    @property
    def params_per_sparse_layer(self) -> int:
        """A sparse layer, every expert counted: attention + experts + router + shared expert + norms."""
        router = self.num_experts * self.hidden_size + (self.num_experts if self.expert_bias else 0)
        shared = self.shared_expert_intermediate_size
        shared_params = 3 * self.hidden_size * shared + self.hidden_size if shared else 0
        return (self.attention_params_per_layer + self.num_experts * self.expert_params + router + shared_params
                + self.norm_params_per_layer)

    @property
    def active_params_per_sparse_layer(self) -> int:
        """A sparse layer as one token uses it: only its num_experts_per_tok experts."""
        return self.params_per_sparse_layer - (self.num_experts - self.num_experts_per_tok) * self.expert_params

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Every weight: embedding, layers, final norm, and the LM head unless tied to the embedding."""
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params
        sparse = self.sparse_layers
        layers = (self.num_layers - sparse) * self.params_per_layer + sparse * self.params_per_sparse_layer
        return self.embedding_params + layers + self.hidden_size + lm_head

    @property
    def active_params(self) -> int:
        """The params one token computes with (= num_params for a dense model)."""
        return self.num_params - self.sparse_layers * (self.num_experts - self.num_experts_per_tok) * self.expert_params

    @property
    def linear_params(self) -> int:
        """The layers' weights less their norms (what a quantized format stores in linear_weight_bytes)."""
        sparse = self.sparse_layers
        layers = (self.num_layers - sparse) * self.params_per_layer + sparse * self.params_per_sparse_layer
        return layers - self.num_layers * self.norm_params_per_layer

    @property
    def weight_bytes(self) -> int:
        if self.linear_weight_bytes is None:
            return self.num_params * self.dtype_bytes
        rest = self.num_params - self.linear_params
        return int(self.linear_params * self.linear_weight_bytes + rest * self.dtype_bytes)

    @property
    def expert_bytes(self) -> float:
        per_weight = self.dtype_bytes if self.linear_weight_bytes is None else self.linear_weight_bytes
        return self.expert_params * per_weight

    def experts_hit(self, num_tokens: float) -> float:
        """Expected number of distinct experts a sparse layer runs for `num_tokens` tokens routed
        uniformly at random, each to num_experts_per_tok of the num_experts (E, k):
        E * (1 - (1 - k / E) ** num_tokens). 1 token: k; many: E."""
        if self.sparse_layers == 0:
            return 0.0
        experts, k = self.num_experts, self.num_experts_per_tok
        return experts * (1.0 - (1.0 - k / experts) ** num_tokens)

    def step_weight_bytes(self, num_tokens: float) -> float:
        """Weight bytes a forward pass over `num_tokens` tokens reads: everything but the experts
        (embedding and LM head whole, by the floor's convention), plus per sparse layer the experts
        the batch hits (`experts_hit`). For a dense model: weight_bytes."""
        if self.sparse_layers == 0:
            return self.weight_bytes
        idle = self.num_experts - self.experts_hit(num_tokens)
        return self.weight_bytes - self.sparse_layers * idle * self.expert_bytes

    # -- attention ---------------------------------------------------------------------------------------
    @property
    def sliding_layers(self) -> int:
        if not self.sliding_window:
            return 0
        return self.num_layers if self.num_sliding_layers is None else self.num_sliding_layers

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        element = self.dtype_bytes if self.kv_element_bytes is None else self.kv_element_bytes
        return 2 * self.num_kv_heads * self.head_dim * element

    @property
    def kv_bytes_per_token(self) -> int:
        """What the cache stores per token, all layers (a sliding layer's KV is read for the window only)."""
        element = self.dtype_bytes if self.kv_element_bytes is None else self.kv_element_bytes
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * element

    @property
    def kv_bytes_per_token_full(self) -> int:
        """kv_bytes_per_token of the full-attention layers only (= kv_bytes_per_token without a window)."""
        if not self.sliding_layers:
            return self.kv_bytes_per_token
        return (self.num_layers - self.sliding_layers) * self.kv_bytes_per_token_per_layer

    @property
    def kv_bytes_per_token_sliding(self) -> int:
        return self.sliding_layers * self.kv_bytes_per_token_per_layer

    def quantized(self, quantization: str | None, kv_cache_dtype: str = "auto") -> "ModelShape":
        """This shape served with `--quantization` / `--kv-cache-dtype` (the floor model's view of them)."""
        import dataclasses

        changes: dict[str, Any] = {}
        if quantization == "fp8":                      # 1-byte weights + a float32 scale per output row
            changes.update(linear_weight_bytes=1.0, matmul_rate_factor=2.0)
        elif quantization in ("gptq", "awq"):          # BENCH_QUANTIZATION_CONFIGS: 4 bits + fp16 scales per 128
            changes.update(linear_weight_bytes=0.5 + 2 / 128)
        elif quantization is not None:
            raise ValueError(f"no floor model for quantization={quantization!r}")
        if kv_cache_dtype.startswith("fp8"):
            changes.update(kv_element_bytes=1)
        return dataclasses.replace(self, **changes)

    @property
    def attention_flops_per_pair(self) -> int:
        """FLOPs of one (query token, key token) pair over all layers: q.k and p.v, 2 FLOPs per MAC each."""
        return 4 * self.num_layers * self.num_heads * self.head_dim

    @property
    def attention_flops_per_pair_full(self) -> int:
        """attention_flops_per_pair of the full-attention layers only (= the total without a window)."""
        if not self.sliding_layers:
            return self.attention_flops_per_pair
        return 4 * (self.num_layers - self.sliding_layers) * self.num_heads * self.head_dim

    @property
    def attention_flops_per_pair_sliding(self) -> int:
        return 4 * self.sliding_layers * self.num_heads * self.head_dim


def _sparse_layer_count(config: Any, num_experts: int, num_layers: int) -> int:
    """Layers with experts, as transformers' Qwen2/3-MoE decoder layer decides: not in `mlp_only_layers`
    and (index + 1) divisible by `decoder_sparse_step` (Mixtral's and GPT-OSS's configs have neither:
    every layer)."""
    if num_experts <= 0:
        return 0
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    dense_only = set(getattr(config, "mlp_only_layers", None) or [])
    return sum(1 for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0)


def _sliding_layers(config: Any, model_type: str, num_layers: int) -> tuple[Optional[int], int]:
    """(window, number of layers that use it), as the model classes read a config: `sliding_window`
    unless `use_sliding_window` is false, on the layers `layer_types` marks sliding (without the list:
    Gemma 2 every other layer, Gemma 3 all but every `sliding_window_pattern`-th; others every layer)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None, 0
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None and model_type.startswith("gemma"):
        pattern = 2 if model_type == "gemma2" else int(getattr(config, "sliding_window_pattern", None) or 6)
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else SLIDING_ATTENTION for i in range(num_layers)]
    if layer_types is None:
        return int(window), num_layers
    return int(window), sum(1 for t in layer_types if t == SLIDING_ATTENTION)


def shape_config(name: str, dtype: str = "bfloat16") -> dict[str, Any]:
    """The config.json contents for the shape `name` (a key of SHAPES): its family's shared fields
    (FAMILY_CONFIGS) overridden by the shape's own."""
    family = shape_family(name)
    fields = dict(SHAPES[name])
    if family != "llama":
        # as the published checkpoint spells it (rope_theta / rope_scaling), which the family's config
        # class reads (transformers 5 turns them into rope_parameters itself)
        return {"bos_token_id": 1, "eos_token_id": 2, **FAMILY_CONFIGS[family], **fields,
                "dtype": dtype, "torch_dtype": dtype}
    rope_theta = fields.pop("rope_theta")
    return {
        **FAMILY_CONFIGS["llama"],
        "bos_token_id": 1,
        "eos_token_id": 2,          # irrelevant: benchmarks ignore EOS
        # both spellings: transformers 5 reads rope_parameters, older versions rope_theta
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "dtype": dtype,
        "torch_dtype": dtype,
        **fields,
    }


# What a random-weight shape's config.json says for a pre-quantized format (`--quantization gptq`/`awq`
# with `--model <shape>-random`): 4-bit weights in groups of 128, as most published INT4 checkpoints.
BENCH_QUANTIZATION_CONFIGS: dict[str, dict[str, Any]] = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
}


def write_shape_config(name: str, directory: Path, dtype: str = "bfloat16", quantization: str | None = None) -> Path:
    """Writes `directory/config.json` for the shape `name` (with the quantization_config of a
    pre-quantized `quantization`, see BENCH_QUANTIZATION_CONFIGS); returns `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = shape_config(name, dtype)
    if quantization in BENCH_QUANTIZATION_CONFIGS:
        config["quantization_config"] = BENCH_QUANTIZATION_CONFIGS[quantization]
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


@dataclass(frozen=True)
class BenchModel:
    """A model as the benchmark loads it.

    model: what `LLM(model=...)` takes ("default", a path, or the config-only directory of a random model).
    load_format: "dummy" for random-weight shapes (no weight files exist), else "auto".
    name: what the user asked for, for printouts.
    """

    model: str
    load_format: str
    name: str

    @property
    def is_random(self) -> bool:
        return self.load_format == "dummy"


_temp_dirs: list[Path] = []


def _remove_temp_dirs() -> None:
    for directory in _temp_dirs:
        shutil.rmtree(directory, ignore_errors=True)


atexit.register(_remove_temp_dirs)


def resolve_bench_model(name: str, dtype: str = "bfloat16", quantization: str | None = None) -> BenchModel:
    """"default" or a path pass through; "<shape>-random" (llama3-8b-random, qwen3-30b-a3b-random,
    gemma3-12b-random, tiny-random, ...: a key of SHAPES) writes that shape's config.json into a
    temporary directory (removed at exit), with the quantization_config of a pre-quantized
    `quantization` (gptq, awq) when given."""
    if name.endswith(RANDOM_SUFFIX):
        shape = name[: -len(RANDOM_SUFFIX)]
        if shape not in SHAPES:
            choices = ", ".join(f"{s}{RANDOM_SUFFIX}" for s in sorted(SHAPES))
            raise ValueError(f"--model {name!r} is not a known random-weight shape; choose one of {choices}")
        directory = Path(tempfile.mkdtemp(prefix=f"pagoda-bench-{shape}-"))
        _temp_dirs.append(directory)
        write_shape_config(shape, directory, dtype, quantization)
        return BenchModel(model=str(directory), load_format="dummy", name=name)
    return BenchModel(model=name, load_format="auto", name=name)


def server_engine_args(bench_model: BenchModel, device: str, dtype: str, overrides: list[str]) -> dict[str, Any]:
    """The engine options a benchmarked server gets: the device, the dtype (float32 on CPU), the
    model's load format, then each `--engine-arg NAME=VALUE` (VALUE read as JSON where it parses)."""
    engine_args: dict[str, Any] = {"device": device, "dtype": dtype if device != "cpu" else "float32",
                                   "load_format": bench_model.load_format}
    for item in overrides:
        name, _, value = item.partition("=")
        try:
            engine_args[name] = json.loads(value)
        except json.JSONDecodeError:
            engine_args[name] = value
    return engine_args
