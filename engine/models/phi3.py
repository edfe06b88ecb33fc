"""Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini (`Phi3ForCausalLM`): a Llama decoder whose checkpoint fuses
q/k/v into `qkv_proj` and gate/up into `gate_up_proj`.

Our QKVParallelLinear / MergedColumnParallelLinear load one shard (q, k, v; gate, up) at a time and
slice each for this tensor-parallel rank, so every fused checkpoint tensor is split into its shards
first (lazily: only this rank's rows are ever read) and handed on under the unfused names
(`q_proj`, ...), which the Llama loader routes as usual. What else the family needs lives in shared
layers: longrope and partial rotary (engine/layers/rotary.py), the sliding window of configs that set
one (`sliding_window_for` in models/llama.py).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import torch

from ..quantization.base import layout_of
from .llama import LlamaForCausalLM

# checkpoint module -> (its shards' module names, in the order the checkpoint stacks them)
FUSED_CHECKPOINT_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class ShardOfWeight:
    """Rows [offset, offset + rows) along `dim` of a lazy checkpoint tensor, itself lazy (the
    `LazyWeight` interface the layers' weight loaders read: name, shape, load(dim, start, length, dtype))."""

    def __init__(self, weight: Any, dim: int, offset: int, rows: int, shard_name: str) -> None:
        self.weight = weight
        self.dim = dim
        self.offset = offset
        self.name = f"{weight.name} ({shard_name} part)"
        shape = list(weight.shape)
        shape[dim] = rows
        self.shape = tuple(shape)

    def load(self, dim: Optional[int] = None, start: int = 0, length: Optional[int] = None,
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        if dim is None:
            dim, start, length = self.dim, 0, self.shape[self.dim]
        if length is None:
            length = self.shape[dim] - start
        if start < 0 or length < 1 or start + length > self.shape[dim]:
            raise ValueError(f"weight {self.name!r} of shape {self.shape}: slice start={start}, length={length} "
                             f"along dim {dim} is out of range")
        if dim == self.dim:
            return self.weight.load(dim=dim, start=self.offset + start, length=length, dtype=dtype)
        rows = self.weight.load(dim=self.dim, start=self.offset, length=self.shape[self.dim], dtype=dtype)
        return rows.narrow(dim, start, length).contiguous()


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any, max_position: int, dtype: torch.dtype, quant_config: Any = None) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported for Phi3ForCausalLM (only 'silu')")
        super().__init__(config, max_position, dtype, quant_config)

    def shard_features(self, module: str) -> list[int]:
        """The output features of each shard of checkpoint module `module` (whole model, not per rank)."""
        config = self.config
        if module == "qkv_proj":
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            return [config.num_attention_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        return [config.intermediate_size, config.intermediate_size]

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        super().load_weights(self._split_fused(weights))

    def _split_fused(self, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """Every fused checkpoint tensor as its shards under the unfused names; other tensors as they are."""
        params = dict(self.named_parameters(remove_duplicate=False))
        for name, weight in weights:
            module = next((m for m in FUSED_CHECKPOINT_MODULES if f".{m}." in name), None)
            if module is None:
                yield name, weight
                continue
            shard_names = FUSED_CHECKPOINT_MODULES[module]
            unfused = [name.replace(f".{module}.", f".{shard}.") for shard in shard_names]
            target, _ = self.checkpoint_target(unfused[0])
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}")
            layout = layout_of(param)
            if layout.per_shard or layout.output_dim is None:
                # one value for the whole fused module (a per-tensor scale): the same for every shard
                for shard_name in unfused:
                    yield shard_name, weight
                continue
            dim = layout.output_dim
            features = self.shard_features(module)
            if any(f % layout.output_pack for f in features):
                raise ValueError(f"checkpoint tensor {name!r}: shard sizes {features} are not multiples of "
                                 f"{layout.output_pack} features per stored element")
            rows = [f // layout.output_pack for f in features]
            if sum(rows) != weight.shape[dim]:
                raise ValueError(f"checkpoint tensor {name!r} has {weight.shape[dim]} rows along dim {dim}, "
                                 f"expected {sum(rows)} (shards of {features} features)")
            offset = 0
            for shard_name, shard, count in zip(unfused, shard_names, rows):
                yield shard_name, ShardOfWeight(weight, dim, offset, count, shard)
                offset += count
