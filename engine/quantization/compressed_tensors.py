"""compressed-tensors checkpoints (llm-compressor's format): the quantization_config is parsed and
matched to our layers with the `compressed_tensors` library itself, then each layer gets a method.

    config_groups[g] = {targets, weights, input_activations, format}      ignore = [names, re:...]

    a layer's scheme: the group whose target matches its checkpoint module, as compressed-tensors
        picks it (exact names, then regexes, then the class "Linear"), unless `ignore` matches it;
        a fused layer (qkv_proj, gate_up_proj) must get one scheme for all its modules
    float 8-bit weights, tensor or channel scales, activations       Fp8LinearMethod (fp8.py)
        dynamic per token or static per tensor (float-/naive-quantized)
    int 4/8-bit weights, group or channel scales, no activation       weight_only.py's method
        quantization (pack-quantized: W4A16, W8A16)
    anything else (int8 W8A8, FP8 blocks, NVFP4/MXFP4, 2:4 sparsity, transforms)   ValueError

`kv_cache_scheme` (FP8 KV-cache scales) is parsed and exposed for the KV cache, not applied here.
"""
from __future__ import annotations

import functools
from typing import Any, Union

import torch.nn as nn

from .base import LinearMethod, QuantizationConfig, UnquantizedLinearMethod
from .fp8 import Fp8LinearMethod, Fp8Scheme, one_per_layer

SUPPORTED = ("FP8 W8A8: float 8-bit weights (tensor or channel strategy, format float-quantized or "
             "naive-quantized) with float 8-bit input activations dynamic per token or static per tensor",
             "W4A16 / W8A16: int 4- or 8-bit weights (group or channel strategy, symmetric or not, format "
             "pack-quantized) without activation quantization")
# checkpoint tensors of a module that no parameter of ours takes
_ZERO_POINTS = (".weight_zero_point", ".input_zero_point", ".output_zero_point")
_ALWAYS_IGNORED = (".weight_shape",)          # pack-quantized's record of the unpacked shape


class WeightOnly:
    """An integer weight-only scheme: its `compressed_tensors` QuantizationArgs (compared by value)."""

    def __init__(self, weights: Any) -> None:
        self.weights = weights

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WeightOnly) and self.weights == other.weights

    def __repr__(self) -> str:
        w = self.weights
        group = f" group_size={w.group_size}" if w.group_size else ""
        return f"int{w.num_bits} weights ({w.strategy}{group}, {'symmetric' if w.symmetric else 'asymmetric'})"


# what a layer's scheme resolves to: None (unquantized), an FP8 scheme, or integer weight-only args
_LayerScheme = Union[None, Fp8Scheme, WeightOnly]


class CompressedTensorsConfig(QuantizationConfig):
    """A compressed-tensors checkpoint's schemes; `from_checkpoint(quantization_config dict)`."""

    name = "compressed-tensors"

    def __init__(self, config: dict[str, Any]) -> None:
        from compressed_tensors.quantization import QuantizationConfig as CTQuantizationConfig

        _reject_unsupported_extras(config)
        try:
            self.config = CTQuantizationConfig.model_validate(config)
        except (ValueError, NotImplementedError) as error:
            raise ValueError(f"the checkpoint's compressed-tensors quantization_config is invalid: {error}") from None
        # NOTE: exposed for the FP8 KV cache (None or the parsed QuantizationArgs); not applied here
        self.kv_cache_scheme = self.config.kv_cache_scheme
        # every group's scheme, classified now: an unsupported one fails at start-up, naming itself
        self._schemes = {name: _classify(name, scheme, self.config.format)
                         for name, scheme in self.config.config_groups.items()}
        # target -> group; a later group wins a target two groups share, as in compressed-tensors
        self._target_to_group = {target: name for name, scheme in self.config.config_groups.items()
                                 for target in scheme.targets}
        lm_head = self._module_scheme("lm_head")
        if lm_head is not None:
            raise ValueError(f"the checkpoint quantizes lm_head ({lm_head}); pagoda keeps the output "
                             f"projection unquantized, so it cannot load this checkpoint")

    @classmethod
    def from_checkpoint(cls, config: dict[str, Any]) -> "CompressedTensorsConfig":
        return cls(config)

    # -- matching ----------------------------------------------------------------------------------
    def _module_scheme(self, module: str) -> _LayerScheme:
        """The classified scheme of checkpoint module `module` (a linear layer), None if unquantized."""
        from compressed_tensors.utils.match import is_match, match_targets

        stand_in = _linear_stand_in()
        targets = match_targets(module, stand_in, self._target_to_group)
        if not targets or is_match(module, stand_in, self.config.ignore or []):
            return None
        return self._schemes[self._target_to_group[targets[0]]]

    def linear_method(self, prefix: str) -> LinearMethod:
        scheme = one_per_layer(prefix, self._module_scheme, "compressed-tensors scheme")
        if scheme is None:
            return UnquantizedLinearMethod()
        if isinstance(scheme, Fp8Scheme):
            return Fp8LinearMethod(scheme)
        from .weight_only import compressed_tensors_weight_only

        return compressed_tensors_weight_only(scheme.weights, prefix)

    def checkpoint_ignored(self, name: str) -> bool:
        if name.endswith(_ALWAYS_IGNORED):
            return True
        for suffix in _ZERO_POINTS:
            if name.endswith(suffix):
                scheme = self._module_scheme(name[: -len(suffix)])
                # symmetric schemes' zero points are all zeros (older compressed-tensors wrote them)
                return not (isinstance(scheme, WeightOnly) and not scheme.weights.symmetric
                            and suffix == ".weight_zero_point")
        return False

    def describe(self) -> str:
        groups = "; ".join(f"{name}: {scheme.describe() if isinstance(scheme, Fp8Scheme) else scheme}"
                           for name, scheme in self._schemes.items() if scheme is not None)
        return f"compressed-tensors ({groups or 'no quantized layers'})"


@functools.lru_cache(maxsize=None)
def _linear_stand_in() -> nn.Module:
    """What compressed-tensors' class targets see of any of our linear layers: a module whose class
    is called "Linear" (its matcher compares class names)."""

    class Linear(nn.Module):
        pass

    return Linear()


def _reject_unsupported_extras(config: dict[str, Any]) -> None:
    sparsity = config.get("sparsity_config") or {}
    if sparsity:
        structure = sparsity.get("sparsity_structure") or sparsity.get("format") or sparsity
        raise ValueError(f"the checkpoint is sparse (compressed-tensors sparsity_config {structure!r}), which "
                         f"pagoda does not run; supported: {'; '.join(SUPPORTED)}")
    if config.get("transform_config"):
        raise ValueError("the checkpoint applies compressed-tensors transforms (transform_config, e.g. rotations), "
                         f"which pagoda does not run; supported: {'; '.join(SUPPORTED)}")


def _classify(group: str, scheme: Any, global_format: str) -> _LayerScheme:
    """The method a config group asks for, or a ValueError naming the group's scheme."""
    weights, inputs = scheme.weights, scheme.input_activations
    fmt = scheme.format or global_format
    if weights is None and inputs is None and scheme.output_activations is None:
        return None
    if weights is not None and scheme.output_activations is None:
        if (weights.type == "float" and weights.num_bits == 8 and weights.strategy in ("tensor", "channel")
                and weights.symmetric and not weights.dynamic and fmt in ("float-quantized", "naive-quantized")
                and inputs is not None and inputs.type == "float" and inputs.num_bits == 8 and inputs.symmetric):
            if inputs.dynamic is True and inputs.strategy == "token":
                return Fp8Scheme(weights.strategy, static_input=False)
            if inputs.dynamic is False and inputs.strategy == "tensor":
                return Fp8Scheme(weights.strategy, static_input=True)
        if (weights.type == "int" and weights.num_bits in (4, 8) and weights.strategy in ("group", "channel")
                and not weights.dynamic and inputs is None and fmt == "pack-quantized"):
            return WeightOnly(weights)
    raise ValueError(f"compressed-tensors config group {group!r} has a scheme pagoda does not run: "
                     f"{_describe_args('weights', weights)}, {_describe_args('input activations', inputs)}"
                     f"{', output activations quantized' if scheme.output_activations is not None else ''}, "
                     f"format {fmt}; supported: {'; '.join(SUPPORTED)}")


def _describe_args(what: str, args: Any) -> str:
    if args is None:
        return f"{what} not quantized"
    details = [f"{args.type}{args.num_bits}", f"strategy {args.strategy}"]
    if args.group_size:
        details.append(f"group_size {args.group_size}")
    if args.block_structure:
        details.append(f"block_structure {args.block_structure}")
    details.append({True: "dynamic", False: "static"}.get(args.dynamic, f"dynamic={args.dynamic}"))
    if not args.symmetric:
        details.append("asymmetric")
    return f"{what} {' '.join(details[:1])} ({', '.join(details[1:])})"
