"""Engine configuration: the user-facing `EngineArgs` and one validated dataclass per subsystem.

`EngineArgs` mirrors vLLM's argument names. `EngineArgs.create_config()` resolves the model, reads
its Hugging Face config, picks the device and dtype and checks every value, raising `ValueError`
that names the parameter and the value. KV-cache capacity (and so the final `max_model_len`) is
known only once the executor has sized the cache; `EngineConfig.finalize_capacity` applies it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from .generation_defaults import GenerationDefaults, load_generation_defaults, log_generation_defaults
from .model_loader.model_source import ModelSource, load_hf_config, resolve_model
from .quantization.base import QuantizationConfig
from .quantization.registry import resolve_quantization

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


@dataclass
class ModelConfig:
    source: ModelSource
    hf_config: Any                      # transformers.PretrainedConfig
    dtype: torch.dtype
    max_model_len: int                  # prompt + output tokens of one sequence
    served_model_name: str
    load_format: Literal["auto", "dummy"] = "auto"   # dummy = random weights of the real shape
    # the weights' quantization scheme (engine/quantization); None = the checkpoint's dtype as is
    quantization: Optional[QuantizationConfig] = None
    skip_tokenizer_init: bool = False
    seed: int = 0
    # the model's sampling defaults (generation_config.json; engine/generation_defaults.py)
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        return archs[0] if archs else "<none>"

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)


@dataclass
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: Optional[int] = None      # explicit budget; on CPU the default is 1 GiB
    num_blocks: Optional[int] = None                  # set by the executor once the cache is sized
    # the cache's element type: the model dtype ('auto') or torch.float8_e4m3fn ('fp8'), which stores
    # K and V divided by per-layer scales (from the checkpoint, 1.0, or calibrated when asked)
    kv_cache_dtype: Optional[torch.dtype] = None
    calculate_kv_scales: bool = False


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    # "fcfs": arrival order, request priority ignored; "priority": lower priority value first, and
    # preemption takes the lowest priority first (engine/core/scheduler.py)
    policy: Literal["fcfs", "priority"] = "fcfs"
    # schedule step N+1 while step N runs on the device (its sampled tokens feed N+1 there)
    async_scheduling: bool = False


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    executor_backend: Literal["uni", "mp", "ray"] = "uni"
    # A step (or one collective in it) running longer than this means a worker hung: the executor
    # raises ExecutorError and the engine turns dead instead of waiting forever.
    step_timeout_s: float = 300.0
    # The serving engine (AsyncEngine) runs its EngineCore in a process of its own, so the step loop
    # never waits for the server's Python work (engine/core/core_process.py). The offline LLM ignores it.
    engine_core_process: bool = False
    # Mixture-of-experts models: each rank holds num_experts / tp whole experts instead of a 1/tp
    # slice of every expert (engine/layers/moe.py)
    enable_expert_parallel: bool = False


# -- speculative decoding ----------------------------------------------------------------------------
# When the user gives no disable_by_batch_size, whether a step speculates is measured, not guessed: a
# small batch leaves a decode step memory-bound, so verifying K more tokens per request costs little,
# while a large one makes it compute-bound and the rejected drafts' work shows. The crossover depends on
# the model, the GPU and the acceptance rate, so the engine times its own verification and decode
# graphs at start-up and speculates only where the acceptance it observes pays for the measured cost
# (engine/spec_decode/step_costs.py). Where nothing can be timed (no CUDA graphs: the CPU, eager mode,
# a draft model, whose drafting the graphs do not include), a step speculates only below this batch size.
DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE = 16
MAX_SPECULATIVE_TOKENS = 16              # K per step; more only adds rejected work at n-gram acceptance rates
SPEC_METHODS = ("ngram", "draft_model")
_SPEC_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
              "disable_by_batch_size", "model")
DEFAULT_PROMPT_LOOKUP_MIN = 2
DEFAULT_PROMPT_LOOKUP_MAX = 4


@dataclass
class SpeculativeConfig:
    """Speculative decoding (engine/spec_decode), as vLLM's `--speculative-config` JSON.

    method                  "ngram": drafts looked up in the request's own prompt and output;
                            "draft_model": drafts are a smaller model's greedy tokens, made on the worker
                            (engine/spec_decode/draft_model.py)
    num_speculative_tokens  K >= 1: drafts verified per request and step (at most MAX_SPECULATIVE_TOKENS)
    prompt_lookup_min/max   ngram only: n-gram lengths matched, longest first (1 <= min <= max); one
                            given sets the other's default around it
    disable_by_batch_size   a step speculates only while fewer requests run; None (JSON null) or 0 =
                            at any batch size; absent (`auto_cutoff`): measured where it can be
                            (`measured_cutoff`), else DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE
    auto_cutoff             set when disable_by_batch_size is absent (the engine chooses)
    model                   draft_model only: the draft checkpoint, in any form the target's `model`
                            accepts (a local directory, a GGUF file, a cached Hub id); its vocabulary
                            must be the target's. `EngineArgs.create_config` resolves it into `draft`:
                            the target's dtype, max_model_len, load_format and seed, the draft's own
                            quantization (read from its checkpoint), sharded over the target's TP ranks.
    """

    method: Literal["ngram", "draft_model"]
    num_speculative_tokens: int
    prompt_lookup_min: int = DEFAULT_PROMPT_LOOKUP_MIN
    prompt_lookup_max: int = DEFAULT_PROMPT_LOOKUP_MAX
    disable_by_batch_size: Optional[int] = DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE
    model: Optional[str] = None
    auto_cutoff: bool = False
    draft: Optional[ModelConfig] = None      # draft_model: set by `resolve_draft`

    @classmethod
    def parse(cls, value: Any) -> Optional["SpeculativeConfig"]:
        """A dict or a JSON object string (None = speculation off) -> a validated config; every bad
        value raises ValueError naming `speculative_config.<key>`."""
        if value is None:
            return None
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"speculative_config is not valid JSON ({error}): {value!r}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object (a dict), got {value!r}")
        unknown = sorted(set(value) - set(_SPEC_KEYS))
        if unknown:
            raise ValueError(f"speculative_config has unknown key(s) {unknown}; accepted: {list(_SPEC_KEYS)}")

        def bad(key: str, rule: str) -> ValueError:
            return ValueError(f"speculative_config.{key} must be {rule}, got {value[key]!r}")

        def integer(key: str) -> bool:
            return isinstance(value.get(key), int) and not isinstance(value.get(key), bool)

        method = value.get("method")
        if method is None and "model" in value:
            method = "ngram" if value["model"] in ("ngram", "[ngram]") else "draft_model"
        if method not in SPEC_METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(SPEC_METHODS)}, got {method!r}")
        draft_path = None
        if method == "draft_model":
            draft_path = value.get("model")
            if not isinstance(draft_path, str) or not draft_path.strip():
                raise ValueError("speculative_config.model is required with method 'draft_model' (the draft "
                                 f"checkpoint: a local path or a cached Hub id), got {draft_path!r}")
            for key in ("prompt_lookup_min", "prompt_lookup_max"):
                if key in value:
                    raise ValueError(f"speculative_config.{key} does not apply to method 'draft_model' (it "
                                     f"bounds the n-gram proposer's matches), got {value[key]!r}")
        elif value.get("model", "ngram") not in ("ngram", "[ngram]"):
            raise ValueError(f"speculative_config.model does not apply to method 'ngram' (it names a draft "
                             f"model: use method 'draft_model'), got {value['model']!r}")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config.num_speculative_tokens is required (the drafts per step, >= 1)")
        if not integer("num_speculative_tokens") or not 1 <= value["num_speculative_tokens"] <= MAX_SPECULATIVE_TOKENS:
            raise bad("num_speculative_tokens", f"an integer in [1, {MAX_SPECULATIVE_TOKENS}]")
        for key in ("prompt_lookup_min", "prompt_lookup_max"):
            if value.get(key) is not None and (not integer(key) or value[key] < 1):
                raise bad(key, "an integer >= 1")
        low, high = value.get("prompt_lookup_min"), value.get("prompt_lookup_max")
        if low is None:
            low = min(DEFAULT_PROMPT_LOOKUP_MIN, high) if high is not None else DEFAULT_PROMPT_LOOKUP_MIN
        if high is None:
            high = max(DEFAULT_PROMPT_LOOKUP_MAX, low)
        if low > high:
            raise ValueError(f"speculative_config.prompt_lookup_min must be <= prompt_lookup_max, got "
                             f"prompt_lookup_min={low} and prompt_lookup_max={high}")
        limit = value.get("disable_by_batch_size", DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE)
        if "disable_by_batch_size" in value and limit is not None:
            if not integer("disable_by_batch_size") or limit < 0 or limit == 1:
                raise bad("disable_by_batch_size", "an integer >= 2, or 0 / null for no limit")
            limit = limit or None
        return cls(method=method, num_speculative_tokens=value["num_speculative_tokens"], prompt_lookup_min=low,
                   prompt_lookup_max=high, disable_by_batch_size=limit, model=draft_path,
                   auto_cutoff="disable_by_batch_size" not in value)

    @property
    def measured_cutoff(self) -> bool:
        """Whether the engine measures per step where speculation stops paying (module note above):
        the user set no limit, and the drafts cost nothing beyond the verification (n-gram lookup; a
        draft model's forward passes are not in the timed graphs)."""
        return self.auto_cutoff and self.method == "ngram"

    def resolve_draft(self, target: ModelConfig, tensor_parallel_size: int, device: torch.device,
                      download_dir: Optional[str] = None) -> None:
        """draft_model: loads the draft's config into `draft` and checks it against the target (same
        vocabulary, a split over the target's TP ranks); a no-op for n-gram. ValueError names
        `speculative_config.model` and the value."""
        if self.method != "draft_model":
            return
        assert self.model is not None
        name = f"speculative_config.model={self.model!r}"
        try:
            source = resolve_model(self.model, download_dir=download_dir)
            hf_config = load_hf_config(source)
        except (ValueError, OSError) as error:
            raise ValueError(f"{name} cannot be loaded: {error}") from None
        from .models.registry import check_parallel

        archs = getattr(hf_config, "architectures", None) or ["<none>"]
        try:
            # NOTE: the draft's experts are split like a dense model's (no expert parallelism for it)
            check_parallel(archs[0], hf_config, tensor_parallel_size, False)
        except ValueError as error:
            raise ValueError(f"{name} cannot serve as a draft model here: {error}") from None
        draft_vocab = int(getattr(hf_config, "vocab_size", -1))
        if draft_vocab != target.vocab_size:
            raise ValueError(f"{name} has a vocabulary of {draft_vocab} tokens, the target's has "
                             f"{target.vocab_size}: a draft must share the target's vocabulary")
        try:
            quantization = resolve_quantization(None, hf_config, source, device)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        self.draft = ModelConfig(source=source, hf_config=hf_config, dtype=target.dtype,
                                 max_model_len=target.max_model_len, served_model_name=source.name,
                                 load_format=target.load_format, quantization=quantization, skip_tokenizer_init=True,
                                 seed=target.seed)
        draft_params, target_params = approx_num_params(hf_config), approx_num_params(target.hf_config)
        if draft_params > target_params:
            logger.warning("the draft model %s (~%.2fB parameters) is larger than the target (~%.2fB): each "
                           "draft costs more than the verification it is meant to save", self.model,
                           draft_params / 1e9, target_params / 1e9)
        draft_len = getattr(hf_config, "max_position_embeddings", None)
        if draft_len is not None and draft_len < target.max_model_len:
            logger.warning("the draft model %s was trained for %d positions, fewer than max_model_len=%d: its "
                           "drafts past them are likely rejected (outputs stay exact)", self.model, draft_len,
                           target.max_model_len)


def approx_num_params(hf_config: Any) -> int:
    """A dense transformer's parameter count from its config (embeddings, attention, MLP); enough to
    compare a draft with its target."""
    hidden = int(getattr(hf_config, "hidden_size", 0) or 0)
    layers = int(getattr(hf_config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(hf_config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    intermediate = int(getattr(hf_config, "intermediate_size", 0) or 0)
    vocab = int(getattr(hf_config, "vocab_size", 0) or 0)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    return 2 * vocab * hidden + layers * (attention + 3 * hidden * intermediate)


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: torch.device
    enforce_eager: bool = False
    max_model_len_explicit: bool = False
    speculative: Optional[SpeculativeConfig] = None          # None = no speculative decoding

    def serving_format(self) -> dict[str, Optional[str]]:
        """What the start-up log and /v1/models say of the weights and the KV cache: the quantization
        scheme's name (None = unquantized), its one-line description, and the cache's element type."""
        quantization = self.model.quantization
        kv_dtype = self.cache.kv_cache_dtype or self.model.dtype
        return {"quantization": quantization.name if quantization is not None else None,
                "weights": quantization.describe() if quantization is not None else str(self.model.dtype).removeprefix("torch."),
                "kv_cache_dtype": str(kv_dtype).removeprefix("torch.")}

    def finalize_capacity(self, num_blocks: int) -> None:
        """Records the sized KV cache and makes sure one sequence of max_model_len fits in it.

        Invariant afterwards: any single request with prompt + max_tokens <= max_model_len can be
        scheduled alone, so the scheduler never waits forever for blocks.
        """
        if num_blocks < 1:
            raise ValueError(
                "the KV cache budget leaves no room for a single block "
                f"(block_size={self.cache.block_size}); raise kv_cache_memory_bytes or gpu_memory_utilization"
            )
        self.cache.num_blocks = num_blocks
        capacity_tokens = num_blocks * self.cache.block_size
        if self.model.max_model_len > capacity_tokens:
            if self.max_model_len_explicit:
                raise ValueError(
                    f"max_model_len={self.model.max_model_len} needs more KV cache than the budget holds "
                    f"({num_blocks} blocks x {self.cache.block_size} = {capacity_tokens} tokens); lower "
                    "max_model_len or raise kv_cache_memory_bytes / gpu_memory_utilization"
                )
            self.model.max_model_len = capacity_tokens
            self.scheduler.max_model_len = capacity_tokens


@dataclass
class EngineArgs:
    model: str = "default"
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: Optional[int] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    load_format: str = "auto"
    skip_tokenizer_init: bool = False
    served_model_name: Optional[str] = None
    scheduling_policy: str = "fcfs"            # "fcfs" or "priority" (SchedulerConfig.policy)
    enforce_eager: bool = False
    distributed_executor_backend: Optional[str] = None
    async_scheduling: Optional[bool] = None     # None = on on CUDA, else off
    # None = on on CUDA with the uniproc and multiproc executors, else off. With 'ray' the engine
    # needs an executor that connects the core process to Ray (pagoda.cluster's replicas pass one).
    engine_core_process: Optional[bool] = None
    quantization: Optional[str] = None          # see engine/quantization/registry.py
    kv_cache_dtype: str = "auto"                # "auto" (the model dtype) or "fp8" / "fp8_e4m3"
    calculate_kv_scales: bool = False
    # speculative decoding: a dict or a JSON object string (SpeculativeConfig); None = off
    speculative_config: Optional[dict[str, Any] | str] = None
    # a Hub id ("org/name") is looked up in the local Hugging Face cache (never downloaded): at this
    # branch, tag or commit (None = main), in download_dir first (a cache folder, as vLLM's flag)
    revision: Optional[str] = None
    download_dir: Optional[str] = None
    # where sampling defaults come from: "auto" (the model's generation_config.json), "vllm" (pagoda's
    # own), or a folder holding a generation_config.json
    generation_config: str = "auto"
    enable_expert_parallel: bool = False        # MoE models: whole experts per TP rank (ParallelConfig)

    def create_config(self) -> EngineConfig:
        def bad(name: str, value: object, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {value!r}")

        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise bad("tensor_parallel_size", self.tensor_parallel_size, "an integer >= 1")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise bad("max_num_seqs", self.max_num_seqs, "an integer >= 1")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise bad("block_size", self.block_size, "one of 8, 16, 32, 64, 128")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise bad("gpu_memory_utilization", self.gpu_memory_utilization, "in (0, 1]")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise bad("kv_cache_memory_bytes", self.kv_cache_memory_bytes, "a positive number of bytes")
        if self.load_format not in ("auto", "dummy"):
            raise bad("load_format", self.load_format, "'auto' or 'dummy'")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            raise bad("kv_cache_dtype", self.kv_cache_dtype, "'auto', 'fp8' or 'fp8_e4m3'")
        if self.calculate_kv_scales and self.kv_cache_dtype == "auto":
            raise ValueError("calculate_kv_scales=True needs kv_cache_dtype='fp8' (the scales are the FP8 "
                             "cache's); got kv_cache_dtype='auto'")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise bad("scheduling_policy", self.scheduling_policy, "'fcfs' or 'priority'")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise bad("max_model_len", self.max_model_len, "an integer >= 1")
        if self.max_num_batched_tokens is not None and (
            not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1
        ):
            raise bad("max_num_batched_tokens", self.max_num_batched_tokens, "an integer >= 1")
        speculative = SpeculativeConfig.parse(self.speculative_config)

        device = _resolve_device(self.device)
        source = resolve_model(self.model, revision=self.revision, download_dir=self.download_dir)
        hf_config = load_hf_config(source)
        generation_defaults = load_generation_defaults(self.generation_config, source.path)
        log_generation_defaults(generation_defaults, self.generation_config)
        dtype = _resolve_dtype(self.dtype, hf_config, device)
        quantization = resolve_quantization(self.quantization, hf_config, source, device)

        derived_len = _derived_max_model_len(hf_config)
        if self.max_model_len is not None and self.max_model_len > derived_len:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's limit of {derived_len} tokens"
            )
        max_model_len = self.max_model_len or derived_len
        max_num_batched_tokens = self.max_num_batched_tokens or 8192
        backend = self.distributed_executor_backend or ("uni" if self.tensor_parallel_size == 1 else "mp")
        if backend not in ("uni", "mp", "ray"):
            raise bad("distributed_executor_backend", backend, "'uni', 'mp' or 'ray'")
        if backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError(
                f"distributed_executor_backend='uni' runs one process; tensor_parallel_size="
                f"{self.tensor_parallel_size} needs 'mp' or 'ray'"
            )
        engine_core_process = (device.type == "cuda" and backend in ("uni", "mp")
                               if self.engine_core_process is None else bool(self.engine_core_process))

        model = ModelConfig(
            source=source,
            hf_config=hf_config,
            dtype=dtype,
            max_model_len=max_model_len,
            served_model_name=self.served_model_name or source.name,
            load_format=self.load_format,  # type: ignore[arg-type]
            quantization=quantization,
            skip_tokenizer_init=self.skip_tokenizer_init,
            seed=self.seed,
            generation_defaults=generation_defaults,
        )
        from .models.registry import check_parallel

        if not isinstance(self.enable_expert_parallel, bool):
            raise bad("enable_expert_parallel", self.enable_expert_parallel, "True or False")
        # NOTE: ParallelConfig carries the expert-parallel choice to every worker, whose model runner
        # hands it to the model
        check_parallel(model.architecture, hf_config, self.tensor_parallel_size, self.enable_expert_parallel)
        if speculative is not None:
            speculative.resolve_draft(model, self.tensor_parallel_size, device, self.download_dir)
        return EngineConfig(
            model=model,
            cache=CacheConfig(
                block_size=self.block_size,
                enable_prefix_caching=self.enable_prefix_caching,
                gpu_memory_utilization=self.gpu_memory_utilization,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                kv_cache_dtype=dtype if self.kv_cache_dtype == "auto" else torch.float8_e4m3fn,
                calculate_kv_scales=self.calculate_kv_scales,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
                policy=self.scheduling_policy,  # type: ignore[arg-type]
                async_scheduling=(device.type == "cuda"
                                  if self.async_scheduling is None else bool(self.async_scheduling)),
            ),
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size, executor_backend=backend,  # type: ignore[arg-type]
                                    engine_core_process=engine_core_process,
                                    enable_expert_parallel=self.enable_expert_parallel),
            device=device,
            enforce_eager=self.enforce_eager,
            max_model_len_explicit=self.max_model_len is not None,
            speculative=speculative,
        )


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available on this machine")
    return torch.device(device)


def _resolve_dtype(dtype: str, hf_config: Any, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32   # CPU matmuls are fastest (and HF-exact) in fp32
        config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(config_dtype, str):
            config_dtype = _DTYPES.get(config_dtype)
        return config_dtype if config_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _derived_max_model_len(hf_config: Any) -> int:
    # (sliding-window layers attend within their window at any length: the kernels skip the rest)
    return int(getattr(hf_config, "max_position_embeddings", 2048) or 2048)
