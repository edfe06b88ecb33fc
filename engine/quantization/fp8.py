"""FP8 W8A8 (e4m3): FP8 weights with a float32 scale per output channel, activations quantized to
FP8 per token at run time (or with a calibrated static scale); the matmul is `kernels/fp8.py`'s.

Where the FP8 weights come from:

    --quantization fp8 on a bf16/fp16/fp32 checkpoint   (online) the layer's weight is created in the
        model dtype and loaded as usual; once a layer has all its shards it is quantized per output
        channel (scale = amax(row) / 448) and the model-dtype copy is freed
    config.json quant_method "fp8" (vLLM / AutoFP8)     `weight` e4m3 and a per-tensor `weight_scale`;
        activation_scheme "static" adds a per-tensor `input_scale`
    compressed-tensors float 8-bit schemes              (compressed_tensors.py) the same method with a
        per-channel (N, 1) or per-tensor `weight_scale`

After loading, every layer holds the same thing: `weight` float8_e4m3fn (N, K), `weight_scale`
float32 (N,) and, for static activations, `input_scale` float32 (1,). Per-tensor checkpoint scales of
a fused layer's shards (q/k/v, gate/up) become per-channel at load, which is exact: each row keeps
its shard's scale. The fused layer's input scale is the largest of its shards' (they see the same
input, so calibration gives them the same value).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, TypeVar

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, ValidationError

from pagoda.kernels.fp8 import FP8_DTYPE, FP8_MAX, fp8_linear, quantize_weight_per_channel

from .base import (LinearMethod, ParamLayout, QuantizationConfig, UnquantizedLinearMethod, checkpoint_modules,
                   new_param, set_layout)

# --load-format dummy: weights uniform in +-DUMMY_WEIGHT_RANGE (the unquantized layers' range), and
# a static input scale that represents activations up to +-1 (a dummy model's are far smaller)
DUMMY_WEIGHT_RANGE = 1e-3
DUMMY_INPUT_SCALE = 1.0 / FP8_MAX

T = TypeVar("T")


def one_per_layer(prefix: str, of_module: Callable[[str], T], what: str) -> T:
    """`of_module` of every checkpoint module behind `prefix`, which must agree: a fused layer is
    one matrix with one format."""
    modules = checkpoint_modules(prefix)
    values = [of_module(module) for module in modules]
    if any(value != values[0] for value in values[1:]):
        detail = ", ".join(f"{module}: {'unquantized' if value is None else value}"
                           for module, value in zip(modules, values))
        raise ValueError(f"the checkpoint gives the parts of {prefix} different {what} ({detail}); pagoda "
                         f"runs them as one fused matrix, which needs one {what} for all of them")
    return values[0]


@dataclass(frozen=True)
class Fp8Scheme:
    """weights: 'online' (model dtype in the checkpoint, quantized per channel after loading),
    'tensor' (one checkpoint scale per shard) or 'channel' (a (N, 1) checkpoint scale);
    static_input: a per-tensor `input_scale` from the checkpoint, else dynamic per-token scales."""
    weights: Literal["online", "tensor", "channel"]
    static_input: bool = False

    def describe(self) -> str:
        weights = {"online": "per channel, quantized at load", "tensor": "per-tensor scales",
                   "channel": "per-channel scales"}[self.weights]
        activations = "static per-tensor scale" if self.static_input else "dynamic per token"
        return f"FP8 e4m3 W8A8 (weights {weights}; activations {activations})"

    __str__ = describe


class Fp8LinearMethod(LinearMethod):
    """One linear layer's FP8 weight (see the module docstring for the parameters)."""

    name = "fp8"

    def __init__(self, scheme: Fp8Scheme) -> None:
        self.scheme = scheme

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        _check_device_supports_fp8()
        out_features, shards = sum(output_sizes), len(output_sizes)
        per_shard = ParamLayout(output_dim=None, input_dim=None, per_shard=True)
        if self.scheme.weights == "online":
            # NOTE: no memory until the checkpoint's first shard arrives (the loader allocates it), and
            # quantized as soon as the last one is in: the model-dtype weights of one layer at a time
            # exist, never the whole model's (which may not fit the GPU the FP8 model fits)
            device = self.device = torch.get_default_device()
            layer.weight = set_layout(nn.Parameter(torch.empty((out_features, in_features), dtype=dtype,
                                                               device="meta"), requires_grad=False), ParamLayout())
            layer.weight.weight_loader = _QuantizeWhenLoaded(layer, shards, device)
        else:
            layer.weight = new_param((out_features, in_features), FP8_DTYPE, ParamLayout())
            if self.scheme.weights == "tensor":
                layer.weight_scale = new_param((shards,), torch.float32, per_shard)
            else:
                layer.weight_scale = new_param((out_features, 1), torch.float32,
                                               ParamLayout(output_dim=0, input_dim=None))
        if self.scheme.static_input:
            layer.input_scale = new_param((shards,), torch.float32, per_shard)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.scheme.weights == "online":
            _quantize_layer(layer)
        elif self.scheme.weights == "tensor" and layer.weight_scale.numel() != layer.out_features:
            # one scale per shard -> one per row: row r keeps the scale of the shard it belongs to
            sizes = torch.tensor(layer.output_sizes, device=layer.weight_scale.device)
            _replace(layer, "weight_scale", layer.weight_scale.data.float().repeat_interleave(sizes))
        elif layer.weight_scale.dim() != 1:
            _replace(layer, "weight_scale", layer.weight_scale.data.float().reshape(-1).contiguous())
        if self.scheme.static_input and layer.input_scale.numel() != 1:
            _replace(layer, "input_scale", layer.input_scale.data.float().amax().reshape(1))

    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Random e4m3 codes over the whole range with scales that make the weights uniform in
        +-DUMMY_WEIGHT_RANGE; loaded as if from a checkpoint of this scheme (so process_weights
        turns them into the final layout like real ones)."""
        out_features, in_features = layer.weight.shape
        device = self.device if layer.weight.is_meta else layer.weight.device
        weight = torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device)
        for start in range(0, out_features, 4096):
            rows = weight[start:start + 4096]
            values = torch.empty(rows.shape, dtype=torch.float32, device=device)
            rows.copy_(values.uniform_(-FP8_MAX, FP8_MAX, generator=generator).to(FP8_DTYPE))
        scale = torch.full((out_features,), DUMMY_WEIGHT_RANGE / FP8_MAX, dtype=torch.float32, device=device)
        _replace(layer, "weight", weight)
        if self.scheme.weights == "online":
            _replace(layer, "weight_scale", scale)
        else:
            layer.weight_scale.data = (scale.reshape(-1, 1) if self.scheme.weights == "channel"
                                       else scale[:layer.weight_scale.numel()])
        if self.scheme.static_input:
            layer.input_scale.data.fill_(DUMMY_INPUT_SCALE)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor],
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        input_scale = layer.input_scale if self.scheme.static_input else None
        return fp8_linear(x, layer.weight, layer.weight_scale, input_scale, bias, out=out)


class _QuantizeWhenLoaded:
    """The online weight's loader: the layer's own loader, then, once every shard is in, the
    quantization (and the model-dtype copy is freed right away, not after the whole model)."""

    def __init__(self, layer: nn.Module, num_shards: int, device: torch.device) -> None:
        self.layer, self.num_shards, self.device = layer, num_shards, device
        self.loaded: set[Any] = set()

    def __call__(self, param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        if self.layer.weight.is_meta:           # the layer's first shard: its model-dtype room, now
            real = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=self.device), requires_grad=False)
            real.weight_loader = self  # type: ignore[attr-defined]
            self.layer.weight = set_layout(real, ParamLayout())
        self.layer.weight_loader(self.layer.weight, weight, shard_id)
        self.loaded.add(shard_id)
        if len(self.loaded) == self.num_shards:
            _quantize_layer(self.layer)


def _quantize_layer(layer: nn.Module) -> None:
    """Online quantization of a loaded model-dtype weight (a no-op once done)."""
    if layer.weight.dtype == FP8_DTYPE:
        return
    original = layer.weight
    weight, scale = quantize_weight_per_channel(original.data)
    _replace(layer, "weight", weight)
    _replace(layer, "weight_scale", scale)
    # NOTE: the loader still holds the old Parameter object until loading ends; dropping its data
    # now is what frees the model-dtype copy.
    original.data = torch.empty(0, dtype=original.dtype, device=original.device)


def _replace(layer: nn.Module, name: str, tensor: torch.Tensor) -> None:
    setattr(layer, name, nn.Parameter(tensor, requires_grad=False))


def _check_device_supports_fp8() -> None:
    device = torch.get_default_device()
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"FP8 W8A8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper, ...); "
                         f"this one is {major}.{minor}. Use an unquantized or a weight-only (int4/int8) "
                         f"checkpoint on it")


def _matches(name: str, pattern: str) -> bool:
    """A checkpoint module name against an ignore-list entry: the name, or `re:<regex>`."""
    return re.match(pattern[3:], name) is not None if pattern.startswith("re:") else name == pattern


class _Fp8CheckpointConfig(BaseModel):
    """config.json's quantization_config of an FP8 checkpoint (vLLM / AutoFP8 / transformers)."""
    model_config = ConfigDict(extra="ignore")

    activation_scheme: Literal["dynamic", "static"] = "dynamic"
    ignored_layers: list[str] = []
    modules_to_not_convert: Optional[list[str]] = None        # transformers' name for the same list
    weight_block_size: Optional[list[int]] = None


class Fp8Config(QuantizationConfig):
    """FP8 W8A8: `online()` for `--quantization fp8`, `from_checkpoint(dict)` for quant_method fp8."""

    name = "fp8"

    def __init__(self, scheme: Fp8Scheme, ignored_layers: tuple[str, ...] = ()) -> None:
        self.scheme = scheme
        self.ignored_layers = ignored_layers

    @classmethod
    def online(cls) -> "Fp8Config":
        return cls(Fp8Scheme("online"))

    @classmethod
    def from_checkpoint(cls, config: dict[str, Any]) -> "Fp8Config":
        try:
            parsed = _Fp8CheckpointConfig.model_validate(config)
        except ValidationError as error:
            raise ValueError(f"the checkpoint's FP8 quantization_config is invalid: {error}") from None
        if parsed.weight_block_size is not None:
            raise ValueError(f"the checkpoint's FP8 quantization_config has weight_block_size="
                             f"{parsed.weight_block_size} (block-wise weight scales), which pagoda does not run; "
                             f"supported: per-tensor weight scales (weight_block_size absent)")
        ignored = tuple(parsed.ignored_layers) + tuple(parsed.modules_to_not_convert or ())
        return cls(Fp8Scheme("tensor", static_input=parsed.activation_scheme == "static"), ignored)

    def linear_method(self, prefix: str) -> LinearMethod:
        scheme = one_per_layer(prefix, lambda module: None if any(_matches(module, p) for p in self.ignored_layers)
                               else self.scheme, "quantization (ignored_layers)")
        return UnquantizedLinearMethod() if scheme is None else Fp8LinearMethod(scheme)

    def checkpoint_ignored(self, name: str) -> bool:
        # a dynamic-activation checkpoint may still carry calibration-time input scales
        return not self.scheme.static_input and name.endswith(".input_scale")

    def describe(self) -> str:
        return f"fp8: {self.scheme.describe()}"
