"""Hugging Face transformers on a benchmark workload: the baselines pagoda is compared with.

- static batching (`run_hf_static`): chunks of `batch_size` requests in workload order, left-padded,
  one `generate` per chunk. `generate` runs a chunk to its longest output, so a chunk costs
  max(output_len) steps for every row; only each request's own `output_len` tokens count as useful
  output (the tokens a row generates past its own length are waste, reported separately).
- continuous batching (`run_hf_continuous`): transformers' own paged continuous batching
  (`model.init_continuous_batching`), each request with its own `max_new_tokens`; timed from the
  first request added to the last result, after the manager's warm-up (CUDA graph capture).

EOS is disabled in both (every request produces exactly its output length). Greedy when
temperature is 0; otherwise multinomial sampling at that temperature with top_k / top_p off, as
pagoda samples.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .models import BenchModel
from .workloads import BenchRequest


@dataclass
class HFRunResult:
    label: str
    wall_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int                 # useful: each request's own output_len
    generated_tokens: int              # what the model computed, padding rows included
    notes: list[str] = field(default_factory=list)


def load_hf_model(bench_model: BenchModel, device: torch.device, dtype: torch.dtype,
                  attn_implementation: str | None = None) -> Any:
    """The same model for transformers: random weights of the shape (built on `device`) for a random
    model; the same checkpoint (GGUF dequantized by transformers, or safetensors) otherwise."""
    import transformers

    from pagoda.engine.model_loader.model_source import resolve_model

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if bench_model.is_random:
        config = transformers.AutoConfig.from_pretrained(bench_model.model)
        # NOTE: built directly on the device: from_config's init (normal_) runs there, in seconds for 8B.
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        source = resolve_model(bench_model.model)
        if source.gguf_file is not None:
            kwargs["gguf_file"] = source.gguf_file.name
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source.path), local_files_only=True, **kwargs)
        model.to(device)
    model.eval()
    # EOS off: generate() fills unset generation fields from model.generation_config, so clear it there.
    model.generation_config.eos_token_id = None
    return model


def _pad_token_id(model: Any) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _sampling_kwargs(temperature: float) -> dict[str, Any]:
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    return {"do_sample": False}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_hf_static(model: Any, requests: Sequence[BenchRequest], batch_size: int, temperature: float = 0.0,
                  label: str = "hf static") -> HFRunResult:
    """`generate` over chunks of `batch_size` requests, in order; see the module docstring."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    device = model.device
    pad_id = _pad_token_id(model)
    generated = 0
    _synchronize(device)
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        chunk = requests[first:first + batch_size]
        width = max(r.prompt_len for r in chunk)
        new_tokens = max(r.output_len for r in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, request in enumerate(chunk):                       # left padding
            input_ids[row, width - request.prompt_len:] = torch.tensor(request.prompt_token_ids)
            attention_mask[row, width - request.prompt_len:] = 1
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=pad_id,
            **_sampling_kwargs(temperature),
        )
        produced = out.shape[1] - width                              # syncs with the device
        if produced != new_tokens:
            raise RuntimeError(f"HF generate produced {produced} tokens for a chunk that needs {new_tokens}; "
                               "EOS was not disabled")
        generated += len(chunk) * new_tokens
    _synchronize(device)
    wall = time.perf_counter() - start
    useful = sum(r.output_len for r in requests)
    notes = [f"static batches of {batch_size} in workload order, left-padded; each batch runs to its longest "
             f"output: {generated:,} tokens generated, {useful:,} useful ({100 * useful / generated:.0f}%); "
             "only useful tokens count"]
    return HFRunResult(label, wall, len(requests), sum(r.prompt_len for r in requests), useful, generated, notes)


def _accepted(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of `kwargs` that `fn` accepts (the continuous-batching API changes between releases)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


@torch.no_grad()   # NOTE: not inference_mode: the CB manager updates its cache tensors from its own thread
def run_hf_continuous(model: Any, requests: Sequence[BenchRequest], temperature: float = 0.0,
                      label: str = "hf continuous", timeout_s: float = 3600.0) -> HFRunResult:
    """transformers' continuous batching, each request with its own max_new_tokens and EOS off."""
    from transformers import GenerationConfig

    generation_config = copy.deepcopy(model.generation_config) if model.generation_config else GenerationConfig()
    generation_config.eos_token_id = -1             # -1: no EOS (what init_continuous_batching uses for None)
    generation_config.max_new_tokens = max(r.output_len for r in requests)
    generation_config.pad_token_id = _pad_token_id(model)
    for key, value in _sampling_kwargs(temperature).items():
        setattr(generation_config, key, value)

    init_kwargs: dict[str, Any] = {"generation_config": generation_config}
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        cb_fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        # keep the attention implementation the model was loaded with (no silent switch to flash)
        init_kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
            **({"auto_switch_to_flash": False} if "auto_switch_to_flash" in cb_fields else {}))
    except ImportError:
        pass
    try:
        from transformers.generation.continuous_batching.continuous_api import WorkloadHints

        init_kwargs["workload_hints"] = WorkloadHints(
            max_prompt_length=max(r.prompt_len for r in requests),
            max_generated_length=generation_config.max_new_tokens, num_requests=len(requests))
    except (ImportError, TypeError):
        pass
    manager = model.init_continuous_batching(**_accepted(model.init_continuous_batching, init_kwargs))
    if hasattr(manager, "warmup"):
        manager.warmup()
    manager.start()
    attn = getattr(model.config, "_attn_implementation", "?")
    outputs: dict[str, Any] = {}
    try:
        _synchronize(model.device)
        start = time.perf_counter()
        ids = []
        for index, request in enumerate(requests):
            request_id = f"bench-{index}"
            manager.add_request(**_accepted(manager.add_request, dict(
                input_ids=list(request.prompt_token_ids), request_id=request_id,
                max_new_tokens=request.output_len, eos_token_id=-1)))
            ids.append(request_id)
        deadline = start + timeout_s
        while len(outputs) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                outputs[result.request_id] = result
            elif result is None and not manager.is_running():
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"HF continuous batching did not finish within {timeout_s} s")
        _synchronize(model.device)
        wall = time.perf_counter() - start
    finally:
        manager.stop(block=True)
        if hasattr(manager, "destroy"):
            manager.destroy()
    missing = [i for i in ids if i not in outputs]
    if missing:
        raise RuntimeError(f"HF continuous batching lost {len(missing)} requests, e.g. {missing[:3]}")
    for index, request in enumerate(requests):
        result = outputs[f"bench-{index}"]
        if getattr(result, "error", None):
            raise RuntimeError(f"HF continuous batching failed request {index}: {result.error}")
        if len(result.generated_tokens) != request.output_len:
            raise RuntimeError(f"HF continuous batching produced {len(result.generated_tokens)} tokens for request "
                               f"{index}, which asked for {request.output_len}")
    useful = sum(r.output_len for r in requests)
    notes = [f"transformers continuous batching (init_continuous_batching), attention {attn!r}, per-request "
             "max_new_tokens; timed after its warm-up"]
    return HFRunResult(label, wall, len(requests), sum(r.prompt_len for r in requests), useful, useful, notes)
