"""Tensor-parallel linear layers (Megatron style), written for any TP size from the start.

- ColumnParallelLinear: the output dim is split across ranks; no communication.
- MergedColumnParallelLinear: several column-parallel outputs stored as one matrix
  (gate_proj + up_proj), each split separately so every rank holds its slice of each.
- QKVParallelLinear: q, k, v heads in one matrix; KV heads are replicated when there are fewer
  KV heads than ranks.
- RowParallelLinear: the input dim is split; partial outputs are summed with an all-reduce.

A layer knows its geometry; its `quant_method` (engine/quantization) owns the weight: which
parameters hold it (a bf16 (out, in) matrix, an FP8 matrix and its scales, packed int4 and group
scales, ...) and how to multiply by it. Every parameter has a `weight_loader(param, weight,
shard_id)` that reads only this rank's slice of a lazy checkpoint tensor (`weight.load(dim, start,
length)`), in whatever format, from the parameter's `ParamLayout`:

    checkpoint q_proj (out = H*D features)      this rank's qkv_proj parameter
    |  rank 0 | rank 1 |                         | q (rank r) | k (rank r) | v (rank r) |
              ^ out_start, out_len (features)    ^ dest_offset along the output dim
    stored elements = features / layout.output_pack   (8 int4 values per int32, a scale per group)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from ..distributed.parallel_state import (divide, get_tp_rank, get_tp_size, tp_all_reduce,
                                          tp_partial_output)
from ..quantization.base import LinearMethod, ParamLayout, UnquantizedLinearMethod, layout_of, new_param


@dataclass(frozen=True)
class ShardSlice:
    """Where one checkpoint tensor's slice goes, in features (not stored elements).

    index: the fused shard (0 for an unfused layer); out_start/out_len: this rank's rows of the
    checkpoint tensor's output features; dest_offset: where they start in the fused parameter;
    in_start/in_len: this rank's input features (all of them unless row-parallel)."""
    index: int
    out_start: int
    out_len: int
    dest_offset: int
    in_start: int
    in_len: int


def _packed(features: int, pack: int, what: str, param_name: str) -> int:
    if features % pack:
        raise ValueError(f"{what} ({features} features) is not a multiple of {pack}, the features per "
                         f"stored element of {param_name}; this tensor-parallel size splits a packed "
                         f"element or a quantization group")
    return features // pack


def load_shard(param: nn.Parameter, weight: Any, shard: ShardSlice, num_shards: int) -> None:
    """Copies this rank's slice of checkpoint tensor `weight` into `param` (see ShardSlice)."""
    layout = layout_of(param)
    name = weight.name
    if layout.per_shard:
        value = weight.load(dtype=param.dtype)
        if value.numel() != 1:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(value.shape)}, expected one scalar")
        param.data[shard.index] = value.reshape(())
        return
    dim: Optional[int] = None
    start, length = 0, None
    if layout.output_dim is not None and shard.out_len != weight.shape[layout.output_dim] * layout.output_pack:
        dim = layout.output_dim
        start = _packed(shard.out_start, layout.output_pack, "the shard's first output feature", name)
        length = _packed(shard.out_len, layout.output_pack, "the shard's output features", name)
    elif layout.input_dim is not None and shard.in_len != weight.shape[layout.input_dim] * layout.input_pack:
        dim = layout.input_dim
        start = _packed(shard.in_start, layout.input_pack, "the rank's first input feature", name)
        length = _packed(shard.in_len, layout.input_pack, "the rank's input features", name)
    tensor = weight.load(dim=dim, start=start, length=length, dtype=param.dtype)
    dest = param.data
    if layout.output_dim is not None and num_shards > 1:
        dest = dest.narrow(layout.output_dim, _packed(shard.dest_offset, layout.output_pack, "a shard's offset", name),
                           _packed(shard.out_len, layout.output_pack, "the shard's output features", name))
    if tensor.shape != dest.shape:
        raise ValueError(f"checkpoint tensor {name} has shape {tuple(weight.shape)}, which does not match "
                         f"this layer's parameter (expected a slice of shape {tuple(dest.shape)})")
    dest.copy_(tensor)


class LinearBase(nn.Module):
    """in_features / output_sizes are this rank's; the weight's parameters come from `quant_method`."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, dtype: torch.dtype,
                 quant_method: Optional[LinearMethod]) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = output_sizes
        self.out_features = sum(output_sizes)
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, output_sizes, dtype)
        if bias:
            self.bias = new_param((self.out_features,), dtype, ParamLayout(output_dim=0, input_dim=None))
        else:
            self.register_parameter("bias", None)
        for param in self.parameters(recurse=False):
            if getattr(param, "weight_loader", None) is None:     # a method may load a parameter its own way
                param.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def shard_slice(self, shard_id: Any) -> ShardSlice:
        """This rank's slice for checkpoint shard `shard_id` (replicated: everything)."""
        return ShardSlice(0, 0, self.out_features, 0, 0, self.in_features)

    def weight_loader(self, param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        load_shard(param, weight, self.shard_slice(shard_id), len(self.output_sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, quant_method: Optional[LinearMethod] = None) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        super().__init__(in_features, [divide(out_features, self.tp_size, "output features")], bias, dtype,
                         quant_method)

    def shard_slice(self, shard_id: Any) -> ShardSlice:
        size = self.out_features
        return ShardSlice(0, self.tp_rank * size, size, 0, 0, self.in_features)


class MergedColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32, quant_method: Optional[LinearMethod] = None) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        per_rank = [divide(size, self.tp_size, "output features") for size in output_sizes]
        super().__init__(in_features, per_rank, bias, dtype, quant_method)

    def shard_slice(self, shard_id: Any) -> ShardSlice:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"merged shard id must be an int in [0, {len(self.output_sizes)}), got {shard_id!r}")
        size = self.output_sizes[shard_id]
        return ShardSlice(shard_id, self.tp_rank * size, size, sum(self.output_sizes[:shard_id]),
                          0, self.in_features)


class QKVParallelLinear(LinearBase):
    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 quant_method: Optional[LinearMethod] = None) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, self.tp_size, "number of attention heads")
        if num_kv_heads >= self.tp_size:
            self.num_kv_heads = divide(num_kv_heads, self.tp_size, "number of KV heads")
            self.kv_replicas = 1
        else:
            # fewer KV heads than ranks: each KV head is replicated on tp_size / num_kv_heads ranks
            self.kv_replicas = divide(self.tp_size, num_kv_heads, "tensor parallel size vs KV heads")
            self.num_kv_heads = 1
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias, dtype, quant_method)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def shard_slice(self, shard_id: Any) -> ShardSlice:
        if shard_id == "q":
            return ShardSlice(0, self.tp_rank * self.q_size, self.q_size, 0, 0, self.in_features)
        if shard_id in ("k", "v"):
            index = 1 if shard_id == "k" else 2
            start = (self.tp_rank // self.kv_replicas) * self.kv_size
            return ShardSlice(index, start, self.kv_size, self.q_size + (index - 1) * self.kv_size,
                              0, self.in_features)
        raise ValueError(f"QKV shard id must be 'q', 'k' or 'v', got {shard_id!r}")


class RowParallelLinear(LinearBase):
    """Input features split over ranks; the output is summed over ranks, or, with
    reduce_results=False, returned unreduced (bias included once, on rank 0) for the
    `RMSNorm.reduce_add` that follows to sum (see distributed.tp_all_reduce_add_rms_norm;
    `partial_slot` names its symmetric-memory slot)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, reduce_results: bool = True, partial_slot: int = 0,
                 quant_method: Optional[LinearMethod] = None) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        super().__init__(divide(in_features, self.tp_size, "input features"), [out_features], bias, dtype,
                         quant_method)
        self.reduce_results = reduce_results
        self.partial_slot = partial_slot

    def shard_slice(self, shard_id: Any) -> ShardSlice:
        size = self.in_features
        return ShardSlice(0, 0, self.out_features, 0, self.tp_rank * size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias: Optional[torch.Tensor] = self.bias if self.tp_rank == 0 else None
        if not self.reduce_results:
            # this rank's unreduced share, written straight into the fused all-reduce's slot where it runs
            out = tp_partial_output(x, self.out_features, self.partial_slot) if self.bias is None else None
            return self.quant_method.apply(self, x, bias, out=out)           # (T, out)
        return tp_all_reduce(self.quant_method.apply(self, x, bias))
