"""Models to benchmark: the default model, a local checkpoint, or a random-weight model of a real shape.

No weights can be downloaded, and with EOS ignored GPU throughput does not depend on the weights'
values, so GPU numbers use random-weight models of real shapes (bench/README.md). For those,
`resolve_bench_model("llama3-8b-random")` writes a `config.json` (nothing else) into a temporary
directory; pagoda then builds the model from it with `load_format="dummy"` (random weights made
directly on the device) and Hugging Face with `AutoModelForCausalLM.from_config`.

`ModelShape` is what the ceilings/floor arithmetic needs of a model: sizes, and from them parameter
count, weight bytes and KV bytes per token.
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# name -> the config.json fields that differ between shapes. Everything else is shared (below).
SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3-8B: 16.06 GB of bf16 weights; KV 131,072 bytes per token (32 layers x K,V x 8 heads x 128 x 2 B).
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0),
    # Llama-3-70B: 141 GB of bf16 weights, for tensor parallelism over 4 GPUs.
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0),
    # A few-million-parameter llama for CPU smoke runs of the harness. Its vocabulary exceeds 10,000 so
    # that W256's token ids (randint(0, 10000)) are valid.
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=16384, max_position_embeddings=4096,
                 rope_theta=10000.0),
}
RANDOM_SUFFIX = "-random"


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder, and what follows from them.

    dtype_bytes: bytes per weight and per KV element (2 for bf16/fp16, 4 for fp32).
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

    @classmethod
    def from_hf_config(cls, config: Any, dtype_bytes: int = 2) -> "ModelShape":
        num_heads = int(config.num_attention_heads)
        return cls(
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or num_heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // num_heads),
            vocab_size=int(config.vocab_size),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            dtype_bytes=dtype_bytes,
        )

    @property
    def params_per_layer(self) -> int:
        hidden, head_dim = self.hidden_size, self.head_dim
        attention = hidden * head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)    # q, o + k, v
        mlp = 3 * hidden * self.intermediate_size                                       # gate, up, down
        norms = 2 * hidden
        return attention + mlp + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Every weight: embedding, layers, final norm, and the LM head unless tied to the embedding."""
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + self.num_layers * self.params_per_layer + self.hidden_size + lm_head

    @property
    def linear_params(self) -> int:
        return self.num_layers * (self.params_per_layer - 2 * self.hidden_size)

    @property
    def weight_bytes(self) -> int:
        if self.linear_weight_bytes is None:
            return self.num_params * self.dtype_bytes
        rest = self.num_params - self.linear_params
        return int(self.linear_params * self.linear_weight_bytes + rest * self.dtype_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        element = self.dtype_bytes if self.kv_element_bytes is None else self.kv_element_bytes
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * element

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


def shape_config(name: str, dtype: str = "bfloat16") -> dict[str, Any]:
    """The config.json contents for the shape `name` (a key of SHAPES)."""
    if name not in SHAPES:
        raise ValueError(f"model shape must be one of {sorted(SHAPES)}, got {name!r}")
    fields = dict(SHAPES[name])
    rope_theta = fields.pop("rope_theta")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
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
    """"default" or a path pass through; "<shape>-random" (llama3-8b-random, llama3-70b-random,
    tiny-random) writes that shape's config.json into a temporary directory (removed at exit), with
    the quantization_config of a pre-quantized `quantization` (gptq, awq) when given."""
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
