"""Mixture-of-experts feed-forward block: a router picks `top_k` of `num_experts` gated MLPs per
token, and the block returns the routing-weighted sum of their outputs.

    x (T, H) --gate (replicated linear)--> logits (T, E) --select_experts--> weights (T, K) fp32, ids (T, K)
      |                                                                        |
      +-- FusedMoE: sum_k weights[t, k] * W2[ids[t, k]] act(W13[ids[t, k]] x[t])  <--+
      +-- (optional) shared expert, scaled by sigmoid(shared_expert_gate(x))

The output is this rank's unreduced share, like RowParallelLinear(reduce_results=False): the next
norm's `reduce_add` sums it over the tensor-parallel group. Two ways to split the experts over the
`tp` ranks, both ending in that one all-reduce:

- tensor parallel (default): every rank holds every expert, a 1/tp slice of its intermediate
  dimension (rows of gate and up in w13, columns of w2), so its output is a partial sum over the
  intermediate features, exactly as a dense MLP's down projection.
- expert parallel (`enable_expert_parallel`): rank r holds whole experts r*E/tp .. (r+1)*E/tp - 1
  and an `expert_map` (global id -> local index, -1 elsewhere); the kernel skips (token, expert)
  pairs of other ranks, so each rank's output is the sum over its own experts. NOTE: no all-to-all
  is needed in this layout: after the attention all-reduce every rank already holds every token's
  activations (they are replicated over the TP group), so each rank routes all tokens itself and
  the same all-reduce that sums tensor-parallel partials sums the per-rank expert partials (the
  router, small, runs on every rank). Why choose it: each expert's matmuls keep their full
  intermediate width (N / tp can be too narrow for efficient tiles, or not divide), at the price
  of imbalance when the routing favours one rank's experts.

Weights arrive in either of the two forms checkpoints use (`FusedMoE.weight_loader`): one tensor
per expert and projection (`experts.3.gate_proj.weight`, Mixtral's `experts.3.w1.weight`), or one
stacked tensor of all experts (`experts.gate_up_proj`), laid out as `StackedLayout` says.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn as nn

from ..distributed.parallel_state import get_tp_rank, get_tp_size, tp_partial_output
from ..quantization.base import ParamLayout, UnquantizedLinearMethod, new_param
from .linear import LinearBase

Scoring = Literal["softmax", "sigmoid"]
Activation = Literal["silu", "swigluoai"]
# one expert's projection in a checkpoint: Llama's gate/up/down = Mixtral's w1/w3/w2
PROJECTIONS = ("w1", "w3", "w2")
# `w13` / `w2`: a stacked tensor of all experts for that parameter
STACKED_SHARDS = ("w13", "w2")


@dataclass(frozen=True)
class MoeOptions:
    """Construction-time choices of a mixture-of-experts model that do not come from its Hugging Face
    config: the model runner builds one from the engine config (ParallelConfig) and hands it to the
    MoE families (`MoeForCausalLM(..., moe_options=...)`), which pass it on to every FusedMoE."""
    enable_expert_parallel: bool = False    # whole experts per TP rank (see the module docstring)


def check_moe_parallel(num_experts: int, top_k: int, intermediate_size: int, tp_size: int,
                       enable_expert_parallel: bool) -> None:
    """Raises ValueError naming the value when the experts do not split over `tp_size` ranks."""
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok (top_k) must be in [1, num_experts={num_experts}], got {top_k!r}")
    if enable_expert_parallel:
        if num_experts % tp_size:
            raise ValueError(f"enable_expert_parallel: num_experts={num_experts} is not divisible by "
                             f"tensor_parallel_size={tp_size} (each rank holds num_experts / tp whole experts)")
    elif intermediate_size % tp_size:
        raise ValueError(f"the experts' intermediate size {intermediate_size} is not divisible by "
                         f"tensor_parallel_size={tp_size}; use a size that divides it, or "
                         f"enable_expert_parallel (whole experts per rank)")


def select_experts(logits: torch.Tensor, top_k: int, scoring: Scoring = "softmax",
                   renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (T, E) -> (weights (T, top_k) float32, expert ids (T, top_k) int64).

    scoring: softmax over the experts (Mixtral, Qwen) or an independent sigmoid per expert;
    renormalize: the chosen weights rescaled to sum to 1 (Mixtral always, Qwen `norm_topk_prob`)."""
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(logits.float())
    else:
        raise ValueError(f"router scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class ReplicatedLinear(LinearBase):
    """A small linear layer every rank holds whole (the router, the shared-expert gate): the same
    logits on every rank, so every rank routes every token alike. Never quantized."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__(in_features, [out_features], False, dtype, UnquantizedLinearMethod())


@dataclass(frozen=True)
class StackedLayout:
    """How a checkpoint stores all experts of a layer in one tensor.

    input_major: gate_up (E, H, 2N) and down (E, N, H), i.e. x @ W (gpt-oss); otherwise the
        torch.nn.Linear orientation, gate_up (E, 2N, H) and down (E, H, N) (transformers 5's
        in-memory MoE experts).
    interleaved: gate and up features alternate along 2N (gpt-oss); otherwise N gate features
        then N up features.
    """
    input_major: bool = False
    interleaved: bool = False


TRANSFORMERS_STACKED = StackedLayout(input_major=False, interleaved=False)
GPT_OSS_STACKED = StackedLayout(input_major=True, interleaved=True)


def _read(weight: Any, dim: int, start: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """`[start, start + length)` of `weight` along `dim`; the whole tensor read at once when that is all of it."""
    if start == 0 and length == weight.shape[dim]:
        return weight.load(dtype=dtype)
    return weight.load(dim=dim, start=start, length=length, dtype=dtype)


def _every_other(t: torch.Tensor, dim: int, first: int) -> torch.Tensor:
    index = [slice(None)] * t.dim()
    index[dim] = slice(first, None, 2)
    return t[tuple(index)]


class FusedMoE(nn.Module):
    """The experts of one MoE layer: w13 (E_local, 2 N_local, H) = gate rows then up rows, w2
    (E_local, H, N_local), optional biases (E_local, 2 N_local) / (E_local, H). See the module
    docstring for the tensor- and expert-parallel splits."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 *, activation: Activation = "silu", bias: bool = False, enable_expert_parallel: bool = False,
                 stacked_layout: StackedLayout = TRANSFORMERS_STACKED, partial_slot: int = 0) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        check_moe_parallel(num_experts, top_k, intermediate_size, self.tp_size, enable_expert_parallel)
        if activation not in ("silu", "swigluoai"):
            raise ValueError(f"expert activation must be 'silu' or 'swigluoai', got {activation!r}")
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.activation = activation
        self.expert_parallel = enable_expert_parallel
        self.stacked_layout = stacked_layout
        self.partial_slot = partial_slot
        if enable_expert_parallel:
            self.num_local_experts = num_experts // self.tp_size
            self.first_expert = self.tp_rank * self.num_local_experts
            self.local_intermediate, self.first_feature = intermediate_size, 0
            expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
            expert_map[self.first_expert:self.first_expert + self.num_local_experts] = torch.arange(
                self.num_local_experts, dtype=torch.int32)
            self.register_buffer("expert_map", expert_map, persistent=False)
        else:
            self.num_local_experts, self.first_expert = num_experts, 0
            self.local_intermediate = intermediate_size // self.tp_size
            self.first_feature = self.tp_rank * self.local_intermediate
            self.expert_map = None
        experts, n = self.num_local_experts, self.local_intermediate
        self.w13_weight = new_param((experts, 2 * n, hidden_size), dtype, ParamLayout(output_dim=1, input_dim=2))
        self.w2_weight = new_param((experts, hidden_size, n), dtype, ParamLayout(output_dim=1, input_dim=2))
        if bias:
            self.w13_bias = new_param((experts, 2 * n), dtype, ParamLayout(output_dim=1, input_dim=None))
            self.w2_bias = new_param((experts, hidden_size), dtype, ParamLayout(output_dim=1, input_dim=None))
        else:
            self.w13_bias = self.w2_bias = None
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        # parameter name -> whether it was loaded from a stacked tensor (True) or per expert (False)
        self._stacked: dict[str, bool] = {}

    # -- loading -----------------------------------------------------------------------------------
    def expected_shards(self, param_name: str) -> set[Any]:
        """The shard ids loading must fill for parameter `param_name` (`w13_weight`, ...): the one
        stacked tensor if the checkpoint gave one, else every expert's projections (all experts,
        also those of other ranks: every rank reads every checkpoint tensor and skips the rest)."""
        kind = param_name.split("_")[0]
        if self._stacked.get(param_name):
            return {kind}
        projections = ("w1", "w3") if kind == "w13" else ("w2",)
        return {(expert, p) for expert in range(self.num_experts) for p in projections}

    def _param_name(self, param: nn.Parameter) -> str:
        for name, own in self.named_parameters(recurse=False):
            if own is param:
                return name
        raise ValueError("FusedMoE.weight_loader was given a parameter of another layer")

    def weight_loader(self, param: nn.Parameter, weight: Any, shard_id: Any) -> None:
        """Loads checkpoint tensor `weight` into `param`: shard_id `(expert, "w1" | "w3" | "w2")` for one
        expert's gate / up / down projection in torch.nn.Linear orientation ((N, H), (N, H), (H, N);
        biases (N,) / (H,)), or `"w13"` / `"w2"` for a stacked tensor of all experts."""
        name = self._param_name(param)
        kind, is_bias = name.split("_")[0], name.endswith("_bias")
        stacked = isinstance(shard_id, str)
        if self._stacked.setdefault(name, stacked) != stacked:
            raise ValueError(f"checkpoint tensor {weight.name!r}: {name} got both a stacked tensor of all experts "
                             f"and per-expert tensors; a checkpoint must use one form")
        if stacked:
            if shard_id != kind:
                raise ValueError(f"checkpoint tensor {weight.name!r}: stacked shard {shard_id!r} does not fit {name}")
            value = (self._stacked_gate_up if kind == "w13" else self._stacked_down)(weight, is_bias, param.dtype)
            self._copy(param.data, value, weight)
            return
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and isinstance(shard_id[0], int)
                and shard_id[1] in PROJECTIONS):
            raise ValueError(f"checkpoint tensor {weight.name!r}: expert shard id must be (expert, 'w1' | 'w3' | "
                             f"'w2') or 'w13' / 'w2', got {shard_id!r}")
        expert, projection = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"checkpoint tensor {weight.name!r} is expert {expert}, but the model has "
                             f"num_experts={self.num_experts}")
        if (projection == "w2") != (kind == "w2"):
            raise ValueError(f"checkpoint tensor {weight.name!r}: projection {projection!r} does not go to {name}")
        local = expert - self.first_expert
        if not 0 <= local < self.num_local_experts:
            return                                  # another rank's expert (expert parallel)
        n, n0 = self.local_intermediate, self.first_feature
        if projection == "w2":
            self._check_shape(weight, (self.hidden_size,) if is_bias else (self.hidden_size, self.intermediate_size))
            value = weight.load(dtype=param.dtype) if is_bias else _read(weight, 1, n0, n, param.dtype)
            dest = param.data[local]
        else:
            self._check_shape(weight, (self.intermediate_size,) if is_bias else
                              (self.intermediate_size, self.hidden_size))
            value = _read(weight, 0, n0, n, param.dtype)
            dest = param.data[local].narrow(0, 0 if projection == "w1" else n, n)
        self._copy(dest, value, weight)

    def _stacked_gate_up(self, weight: Any, is_bias: bool, dtype: torch.dtype) -> torch.Tensor:
        """This rank's (E_local, 2 N_local[, H]) from a stacked gate_up tensor (weight or bias)."""
        layout, full, n, n0 = self.stacked_layout, self.intermediate_size, self.local_intermediate, self.first_feature
        h = self.hidden_size
        if is_bias:
            feature_dim, shape = 1, (self.num_experts, 2 * full)
        elif layout.input_major:
            feature_dim, shape = 2, (self.num_experts, h, 2 * full)
        else:
            feature_dim, shape = 1, (self.num_experts, 2 * full, h)
        self._check_shape(weight, shape)
        if self.expert_parallel:
            t = _read(weight, 0, self.first_expert, self.num_local_experts, dtype)
            if layout.interleaved:
                gate, up = _every_other(t, feature_dim, 0), _every_other(t, feature_dim, 1)
            else:
                gate, up = t.narrow(feature_dim, 0, full), t.narrow(feature_dim, full, full)
        elif layout.interleaved:        # this rank's features are one contiguous run of gate/up pairs
            t = _read(weight, feature_dim, 2 * n0, 2 * n, dtype)
            gate, up = _every_other(t, feature_dim, 0), _every_other(t, feature_dim, 1)
        else:
            gate = _read(weight, feature_dim, n0, n, dtype)
            up = _read(weight, feature_dim, full + n0, n, dtype)
        if layout.input_major and not is_bias:
            gate, up = gate.transpose(1, 2), up.transpose(1, 2)
        return torch.cat([gate, up], dim=1)

    def _stacked_down(self, weight: Any, is_bias: bool, dtype: torch.dtype) -> torch.Tensor:
        """This rank's (E_local, H[, N_local]) from a stacked down tensor (weight or bias)."""
        layout, full, n, n0, h = (self.stacked_layout, self.intermediate_size, self.local_intermediate,
                                  self.first_feature, self.hidden_size)
        if is_bias:
            self._check_shape(weight, (self.num_experts, h))
            return _read(weight, 0, self.first_expert, self.num_local_experts, dtype)
        feature_dim = 1 if layout.input_major else 2
        self._check_shape(weight, (self.num_experts, full, h) if layout.input_major else (self.num_experts, h, full))
        if self.expert_parallel:
            t = _read(weight, 0, self.first_expert, self.num_local_experts, dtype)
        else:
            t = _read(weight, feature_dim, n0, n, dtype)
        return t.transpose(1, 2) if layout.input_major else t

    @staticmethod
    def _check_shape(weight: Any, expected: tuple[int, ...]) -> None:
        if tuple(weight.shape) != tuple(expected):
            raise ValueError(f"checkpoint tensor {weight.name!r} has shape {tuple(weight.shape)}, expected "
                             f"{tuple(expected)} for this model's experts")

    @staticmethod
    def _copy(dest: torch.Tensor, value: torch.Tensor, weight: Any) -> None:
        if tuple(value.shape) != tuple(dest.shape):
            raise ValueError(f"checkpoint tensor {weight.name!r} gives a slice of shape {tuple(value.shape)}, "
                             f"expected {tuple(dest.shape)}")
        dest.copy_(value)

    # -- compute -----------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(T, H) -> this rank's unreduced (T, H) share of the routed experts' weighted sum."""
        from pagoda.kernels.moe import fused_moe

        # NOTE: the down bias belongs to the expert's output once: with tensor parallelism every rank
        # computes a partial of every expert, so only rank 0 adds it; with expert parallelism the
        # expert's one owner does.
        w2_bias = self.w2_bias if (self.expert_parallel or self.tp_rank == 0) else None
        return fused_moe(hidden, self.w13_weight, self.w2_weight, topk_weights, topk_ids,
                         activation=self.activation, w13_bias=self.w13_bias, w2_bias=w2_bias,
                         expert_map=self.expert_map, out=out)


class SparseMoeBlock(nn.Module):
    """A decoder layer's feed-forward block: router `gate`, `experts`, and optionally a
    `shared_expert` (a dense MLP every token goes through) scaled per token by
    sigmoid(`shared_expert_gate`(x)) (Qwen2-MoE). Returns the unreduced (T, H) share (module docstring)."""

    def __init__(self, experts: FusedMoE, dtype: torch.dtype, *, scoring: Scoring = "softmax",
                 renormalize: bool = False, shared_expert: Optional[nn.Module] = None,
                 shared_expert_gate: bool = False) -> None:
        super().__init__()
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"router scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
        if shared_expert_gate and shared_expert is None:
            raise ValueError("shared_expert_gate needs a shared_expert")
        self.scoring, self.renormalize = scoring, renormalize
        self.gate = ReplicatedLinear(experts.hidden_size, experts.num_experts, dtype)
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = ReplicatedLinear(experts.hidden_size, 1, dtype) if shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(self.gate(x), self.experts.top_k, self.scoring, self.renormalize)
        if self.shared_expert is None:
            # straight into the fused all-reduce's slot where that kernel runs (as RowParallelLinear)
            out = tp_partial_output(x, self.experts.hidden_size, self.experts.partial_slot)
            return self.experts(x, topk_weights, topk_ids, out=out)
        # NOTE: the shared expert's down projection may write into the fused all-reduce's slot, so it
        # runs first and the routed experts (in memory of their own) are added into it afterwards.
        shared = self.shared_expert(x)                                                 # (T, H) unreduced
        if self.shared_expert_gate is not None:
            shared.mul_(torch.sigmoid(self.shared_expert_gate(x)))       # a replicated per-token scale
        return shared.add_(self.experts(x, topk_weights, topk_ids))

