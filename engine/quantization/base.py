"""What a quantization scheme is to the engine: a config that picks a `LinearMethod` per layer, and
the method that creates, loads and applies that layer's weight.

    QuantizationConfig (picklable, in ModelConfig)      LinearMethod (one per linear layer)
      name, describe()                                    create_weights(layer, ...)   parameters
      linear_method(prefix) -> LinearMethod                 + their ParamLayout      (how TP slices them)
      checkpoint_ignored(name) -> bool                    process_weights_after_loading(layer)
                                                          init_dummy(layer, generator)   --load-format dummy
                                                          apply(layer, x, bias) -> y     (T, in) -> (T, out)

A linear layer (`layers/linear.py`) knows only its tensor-parallel geometry: which slice of the
checkpoint's output (column-parallel) or input (row-parallel) features this rank holds, and where a
fused shard (q/k/v, gate/up) goes. Each parameter's `ParamLayout` says which of its dims are the
output and input features and how many features one stored element covers along each (8 for int4
packed in int32, the group size for group-wise scales), so the same slicing serves every format.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ParamLayout:
    """How the checkpoint's tensor for one parameter maps onto the layer's features.

    output_dim / input_dim: the dim along which output / input features run (None: the tensor does
    not vary with them, e.g. a per-tensor scale). output_pack / input_pack: features per stored
    element along that dim (int4 packed 8 to an int32: 8; group-wise scales: the group size).
    per_shard: one scalar per fused shard (q, k, v each have their own per-tensor scale); the
    parameter has shape (num_shards,) and shard i's scalar goes to index i.
    from_checkpoint: False for parameters the method derives itself (never expected in a checkpoint).
    optional: a checkpoint may or may not carry it (a static input scale).
    """
    output_dim: Optional[int] = 0
    input_dim: Optional[int] = 1
    output_pack: int = 1
    input_pack: int = 1
    per_shard: bool = False
    from_checkpoint: bool = True
    optional: bool = False


# our fused linear layers -> the checkpoint modules each one holds (models/llama.py's packed_modules_mapping)
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def checkpoint_modules(prefix: str) -> list[str]:
    """The checkpoint's module names behind our layer `prefix`: `...qkv_proj` -> its q/k/v_proj (a
    scheme's per-module settings, ignore lists and tensor names are the checkpoint's)."""
    parent, _, leaf = prefix.rpartition(".")
    if leaf not in FUSED_MODULES:
        return [prefix]
    return [f"{parent}.{part}" if parent else part for part in FUSED_MODULES[leaf]]


def set_layout(param: nn.Parameter, layout: ParamLayout) -> nn.Parameter:
    param.param_layout = layout  # type: ignore[attr-defined]
    return param


def layout_of(param: nn.Parameter) -> ParamLayout:
    return getattr(param, "param_layout", None) or ParamLayout()


def new_param(shape: tuple[int, ...], dtype: torch.dtype, layout: ParamLayout) -> nn.Parameter:
    """A frozen, uninitialised parameter with its layout (on the current default device); loading
    checks that every parameter a checkpoint should fill was filled."""
    return set_layout(nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False), layout)


class LinearMethod(ABC):
    """Creates, loads and applies the weight of one linear layer (see the module docstring).

    Sizes given to `create_weights` are this rank's: `out_features` = sum(`output_sizes`), the
    per-rank sizes of the fused shards in order (one entry for an unfused layer).
    """

    #: what the start-up log and /v1/models call this layer's weight format
    name: str = "unquantized"

    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        """Registers the layer's parameters (not the bias), each with a `ParamLayout`."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turns the loaded parameters into what `apply` reads (repacking, quantizing, merging)."""

    @abstractmethod
    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Random weights of the real shapes (`--load-format dummy`), small so activations stay finite."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor],
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(T, in_features) -> (T, out_features) in x's dtype; written into `out` when given."""


class UnquantizedLinearMethod(LinearMethod):
    """The checkpoint's weight in the model dtype, (out, in) as torch.nn.Linear."""

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        layer.weight = new_param((sum(output_sizes), in_features), dtype, ParamLayout())

    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        layer.weight.data.uniform_(-1e-3, 1e-3, generator=generator)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor],
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if out is not None and bias is None:
            return torch.mm(x, layer.weight.t(), out=out)
        y = F.linear(x, layer.weight, bias)
        return y if out is None else out.copy_(y)


class QuantizationConfig(ABC):
    """A model's quantization scheme, resolved once from `--quantization` and the checkpoint's
    `quantization_config`; picklable (it travels to the engine core and every TP worker)."""

    #: the `--quantization` name (vLLM's): "fp8", "compressed-tensors", "gptq", "awq", "gguf"
    name: str = ""

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod:
        """The method of the linear layer at `prefix` (our module name, e.g.
        `model.layers.0.self_attn.qkv_proj`); `UnquantizedLinearMethod()` for layers left as they are."""

    def checkpoint_ignored(self, name: str) -> bool:
        """Checkpoint tensors this scheme carries that no parameter takes (e.g. a packed weight's
        original shape)."""
        return False

    def describe(self) -> str:
        """One line for the start-up log and /v1/models: the scheme and its parameters."""
        return self.name


def linear_method_for(quant_config: Optional[QuantizationConfig], prefix: str) -> LinearMethod:
    return UnquantizedLinearMethod() if quant_config is None else quant_config.linear_method(prefix)


def process_weights_after_loading(model: nn.Module) -> None:
    """Lets every quantized layer turn its loaded parameters into what it computes with."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, LinearMethod):
            method.process_weights_after_loading(module)


def init_dummy_weights(model: nn.Module, generator: torch.Generator) -> None:
    """`--load-format dummy`: small random values of the real shapes in every parameter (each
    linear layer's method fills its own, e.g. FP8 values and their scales), then as if loaded."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, LinearMethod):
            method.init_dummy(module, generator)
            if getattr(module, "bias", None) is not None:
                module.bias.data.uniform_(-1e-3, 1e-3, generator=generator)
        else:
            for param in module.parameters(recurse=False):
                param.data.uniform_(-1e-3, 1e-3, generator=generator)
    process_weights_after_loading(model)
