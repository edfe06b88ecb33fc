"""Tensor-parallel linear layers (Megatron style), written for any TP size from the start.

- ColumnParallelLinear: the output dim is split across ranks; no communication.
- MergedColumnParallelLinear: several column-parallel outputs stored as one matrix
  (gate_proj + up_proj), each split separately so every rank holds its slice of each.
- QKVParallelLinear: q, k, v heads in one matrix; KV heads are replicated when there are fewer
  KV heads than ranks.
- RowParallelLinear: the input dim is split; partial outputs are summed with an all-reduce.

Weights are (out_features, in_features) as in torch.nn.Linear and Hugging Face checkpoints. Each
parameter has a `weight_loader(param, weight, shard_id)` that reads only this rank's slice from a
lazy checkpoint tensor (`weight.load(dim, start, length)`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed.parallel_state import divide, get_tp_rank, get_tp_size, tp_all_reduce, tp_linear_partial


def _load_full(param: nn.Parameter, weight: Any) -> None:
    tensor = weight.load(dtype=param.dtype)
    if tensor.shape != param.shape:
        raise ValueError(f"checkpoint tensor {weight.name} has shape {tuple(tensor.shape)}, "
                         f"expected {tuple(param.shape)}")
    param.data.copy_(tensor)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        _load_full(param, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        super().__init__(in_features, divide(out_features, self.tp_size, "output features"), bias, dtype)

    def weight_loader(self, param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        size = param.shape[0]
        param.data.copy_(weight.load(dim=0, start=self.tp_rank * size, length=size, dtype=param.dtype))


class MergedColumnParallelLinear(ColumnParallelLinear):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype)

    def weight_loader(self, param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        assert isinstance(shard_id, int)
        shard_size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, shard_size).copy_(
            weight.load(dim=0, start=self.tp_rank * shard_size, length=shard_size, dtype=param.dtype))


class QKVParallelLinear(ColumnParallelLinear):
    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32) -> None:
        tp_size = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp_size, "number of attention heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = divide(num_kv_heads, tp_size, "number of KV heads")
            self.kv_replicas = 1
        else:
            # fewer KV heads than ranks: each KV head is replicated on tp_size / num_kv_heads ranks
            self.kv_replicas = divide(tp_size, num_kv_heads, "tensor parallel size vs KV heads")
            self.num_kv_heads = 1
        out_features = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out_features, bias, dtype)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        if shard_id == "q":
            offset, size, rank_index = 0, self.q_size, self.tp_rank
        elif shard_id == "k":
            offset, size, rank_index = self.q_size, self.kv_size, self.tp_rank // self.kv_replicas
        elif shard_id == "v":
            offset, size, rank_index = self.q_size + self.kv_size, self.kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"QKV shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        param.data.narrow(0, offset, size).copy_(
            weight.load(dim=0, start=rank_index * size, length=size, dtype=param.dtype))


class RowParallelLinear(LinearBase):
    """Input features split over ranks; the output is summed over ranks, or, with
    reduce_results=False, returned unreduced (bias included once, on rank 0) for the
    `RMSNorm.reduce_add` that follows to sum (see distributed.tp_all_reduce_add_rms_norm;
    `partial_slot` names its symmetric-memory slot)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, reduce_results: bool = True, partial_slot: int = 0) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        super().__init__(divide(in_features, self.tp_size, "input features"), out_features, bias, dtype)
        self.reduce_results = reduce_results
        self.partial_slot = partial_slot

    def weight_loader(self, param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        if param.dim() == 1:            # bias: added once, on rank 0's partial sum
            _load_full(param, weight)
            return
        size = param.shape[1]
        param.data.copy_(weight.load(dim=1, start=self.tp_rank * size, length=size, dtype=param.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce_results:
            if self.bias is None:
                return tp_linear_partial(x, self.weight, self.partial_slot)   # (T, out), this rank's share
            return F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        bias: Optional[torch.Tensor] = self.bias if self.tp_rank == 0 else None
        return tp_all_reduce(F.linear(x, self.weight, bias))
