"""From `--quantization` and the checkpoint to one `QuantizationConfig` (or None: unquantized).

    checkpoint                               --quantization      result
    config.json quantization_config          (none) or its name  that scheme, loaded as is
    a bf16/fp16 checkpoint                   fp8                 FP8 W8A8, quantized at load
    a bf16/fp16 checkpoint                   (none)              unquantized
    a .gguf file                             (none) or gguf      its blocks kept quantized (CUDA; on CPU
                                                                 only with `gguf`, else dequantized)
    a .gguf file                             fp8                 dequantized, then FP8 W8A8 at load

A scheme pagoda cannot run is an error that names it and the supported ones, never a silent
fallback to bf16 (which would double the memory the user planned for).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..model_loader.model_source import ModelSource
from .base import QuantizationConfig

# every name `--quantization` takes
QUANTIZATION_NAMES = ("fp8", "compressed-tensors", "gptq", "awq", "gguf", "mxfp4")
# checkpoint `quant_method`s pagoda loads, and the `--quantization` names that quantize an unquantized
# checkpoint (or a GGUF file's dequantized weights) at load
CHECKPOINT_METHODS = ("awq", "compressed-tensors", "fp8", "gptq", "mxfp4")
ONLINE_METHODS = ("fp8",)


def _from_checkpoint(method: str, config: dict[str, Any]) -> QuantizationConfig:
    """The scheme of a checkpoint's quantization_config. NOTE: each scheme's module is imported only
    when a model needs it: they pull in compressed-tensors and the kernels, which an unquantized
    model's cold start should not wait for."""
    if method == "fp8":
        from .fp8 import Fp8Config

        return Fp8Config.from_checkpoint(config)
    if method == "compressed-tensors":
        from .compressed_tensors import CompressedTensorsConfig

        return CompressedTensorsConfig.from_checkpoint(config)
    if method == "gptq":
        from .gptq import GPTQConfig

        return GPTQConfig.from_config(config)
    if method == "mxfp4":          # gpt-oss: the experts, dequantized at load by the model
        from .mxfp4 import Mxfp4Config

        return Mxfp4Config.from_checkpoint(config)
    assert method == "awq", method
    from .awq import AWQConfig

    return AWQConfig.from_config(config)


def _online(name: str) -> QuantizationConfig:
    if name not in ONLINE_METHODS:
        raise ValueError(f"quantization={name!r} needs a checkpoint quantized that way (a quantization_config "
                         f"in config.json); an unquantized checkpoint can be quantized at load with: "
                         f"{list(ONLINE_METHODS)}")
    from .fp8 import Fp8Config

    return Fp8Config.online()


def _gguf(file: Path) -> QuantizationConfig:
    from .gguf import GGUFConfig

    return GGUFConfig.from_file(file)


def checkpoint_quantization(hf_config: Any) -> Optional[dict[str, Any]]:
    """The checkpoint's `quantization_config` as a dict, or None."""
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    if not isinstance(config, dict):
        config = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return config


def resolve_quantization(requested: Optional[str], hf_config: Any, source: ModelSource,
                         device: torch.device) -> Optional[QuantizationConfig]:
    if requested is not None and requested not in QUANTIZATION_NAMES:
        raise ValueError(f"quantization must be one of {list(QUANTIZATION_NAMES)}, got {requested!r}")
    if source.gguf_file is not None:
        if requested in ONLINE_METHODS:        # the file's blocks dequantized, then quantized this way
            return _online(requested)
        if requested not in (None, "gguf"):
            raise ValueError(f"quantization={requested!r} does not apply to a GGUF file ({source.gguf_file.name}), "
                             f"whose tensors carry their own quantization; leave it unset, pass 'gguf', or "
                             f"re-quantize it at load with one of {list(ONLINE_METHODS)}")
        if requested == "gguf" or device.type == "cuda":
            return _gguf(source.gguf_file)
        return None        # CPU: dequantized to the compute dtype at load, as the CPU matmuls want
    checkpoint = checkpoint_quantization(hf_config)
    if checkpoint is not None:
        method = str(checkpoint.get("quant_method", "")).lower().replace("_", "-")
        if requested is not None and requested != method:
            raise ValueError(f"quantization={requested!r} does not match the checkpoint, which is quantized "
                             f"with quant_method {method!r} (config.json quantization_config); leave it unset")
        if method not in CHECKPOINT_METHODS:
            raise ValueError(f"the checkpoint's quantization (quant_method {method!r}) is not supported; "
                             f"supported: {list(CHECKPOINT_METHODS)}")
        return _from_checkpoint(method, checkpoint)
    if requested is None:
        return None
    return _online(requested)
