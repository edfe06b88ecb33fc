"""Weight-only quantized linear layers (W4A16, W8A16): what GPTQ, AWQ and compressed-tensors'
pack-quantized checkpoints share, and the compressed-tensors layout itself.

Each checkpoint layout loads into parameters of its own names and shapes (so `load_shard` slices
them for tensor parallelism from their ParamLayouts), then `process_weights_after_loading` converts
them, exactly, into the one format the GEMM reads (`kernels.weight_only.GroupQuantWeight`: uint8
(N, K/2) nibbles or (N, K) bytes, (N, groups) scales and zero points), registers those tensors as
buffers of the layer (`wo_qweight`, `wo_scales`, `wo_zeros`, `wo_perm`) and drops the checkpoint's.

    layout              packed weight (int32)          scales          zero points (int32)
    GPTQ    gptq.py     qweight (K/pack, N) along K    (K/g, N) fp16   qzeros (K/g, N/pack), stores z - 1
    AWQ     awq.py      qweight (K, N/8) along N,      (K/g, N) fp16   qzeros (K/g, N/8), same order
                        nibbles interleaved
    compressed-tensors  weight_packed (N, K/pack)      (N, K/g)        weight_zero_point (N/pack, K/g),
    (here)              along K, value + 2^(bits-1)    model dtype     asymmetric only, + 2^(bits-1)

    pack = 32 / bits values per int32, lowest bits first; g = the group size (per channel: g = K).

Act-order (GPTQ desc_act, compressed-tensors actorder "group"): `g_idx[k]` is input feature k's
group, in an order of the quantizer's own. Sorting the features by group makes every group contiguous
again: the stored weight's column j is input feature perm[j] and the GEMM reads x[:, perm]. With
tensor parallelism splitting the input features (row-parallel layers) a rank's features would hold
parts of groups: that is refused with an error naming the layer.

A last, partial group (K not a multiple of group_size: AutoGPTQ then stores ceil(K / g) groups, e.g.
for SmolLM2's 576 features in groups of 128) is held as groups of gcd(K, g), each checkpoint group's
scale and zero point repeated; a layer whose input features tensor parallelism splits must not have one.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn

from pagoda.kernels.weight_only import GroupQuantWeight, pack_int4, weight_only_linear

from .base import LinearMethod, ParamLayout, checkpoint_modules, new_param

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs

# buffers a converted layer holds (the GEMM's operands)
BUFFERS = ("wo_qweight", "wo_scales", "wo_zeros", "wo_perm")
def quantized_module(prefix: str, not_converted: tuple[str, ...], only: Optional[tuple[str, ...]]) -> bool:
    """Whether our layer `prefix` is quantized in the checkpoint; a fused layer must be all or nothing."""
    parts = checkpoint_modules(prefix)
    flags = [not any(skip in part for skip in not_converted)
             and (only is None or any(part.endswith(name) for name in only)) for part in parts]
    if len(set(flags)) > 1:
        raise ValueError(f"layer {prefix} fuses {[p.rpartition('.')[2] for p in parts]}, of which the "
                         f"checkpoint quantizes only some; mixed fused layers are not supported")
    return flags[0]


def unpack_int32(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (R, C) holding 32/bits values each, lowest bits first -> uint8 (R, C * 32/bits) in order.

    NOTE: reads the words' bytes, so it assumes a little-endian device (x86, ARM and CUDA are)."""
    data = words.contiguous().view(torch.uint8)                   # (R, 4C): byte b of word w at 4w + b
    if bits == 8:
        return data
    return torch.stack([data & 0xF, data >> 4], dim=-1).reshape(words.shape[0], -1)


def zeros_or_constant(zeros: torch.Tensor, bits: int) -> tuple[Optional[torch.Tensor], int]:
    """(N, groups) integer zero points -> (None, z) when all equal the symmetric midpoint z (nothing to
    store), else the smallest integer tensor that holds them (GPTQ's z can be 2^bits)."""
    middle = 1 << (bits - 1)
    if bool((zeros == middle).all()):
        return None, middle
    if int(zeros.max()) <= 255 and int(zeros.min()) >= 0:
        return zeros.to(torch.uint8).contiguous(), 0
    return zeros.to(torch.int16).contiguous(), 0


def random_bytes_(param: torch.Tensor, generator: torch.Generator) -> None:
    """Fills an integer tensor with uniformly random bits (every packed value random)."""
    data = param.data.view(torch.uint8)
    data.copy_(torch.randint(0, 256, data.shape, generator=generator, device=data.device, dtype=torch.uint8))


def small_scales_(param: torch.Tensor, bits: int, generator: torch.Generator) -> None:
    """Scales that keep |w| below about 1e-3 (the unquantized dummy weights' range)."""
    param.data.uniform_(0.5e-3, 1e-3, generator=generator).div_(1 << (bits - 1))


class WeightOnlyLinearMethod(LinearMethod):
    """The part every layout shares: geometry checks, act-order, the GEMM's buffers and `apply`.

    Subclasses create the checkpoint's parameters (`create_checkpoint_params`), say which of them the
    conversion consumes (`checkpoint_params`) and convert them (`convert`). group_size -1 = one group
    per output channel (of this rank's input features)."""

    #: the parameter holding act-order's group indices (None: the layout has none)
    g_idx_name: Optional[str] = None
    #: values per int32 along the output features in some parameter (e.g. packed zero points), else 1
    output_pack: int = 1

    def __init__(self, bits: int, group_size: int, prefix: str) -> None:
        self.bits, self.group_size, self.prefix = bits, group_size, prefix
        self.pack = 32 // bits
        self.zero = 1 << (bits - 1)        # set by process_weights_after_loading
        # set by create_weights: the checkpoint's group (in_features when per channel) and its number of
        # groups on this rank (the last may be partial), and the held format's group (divides in_features)
        self.checkpoint_group = self.checkpoint_groups = self.group = 0
        self.g_idx_start: Optional[int] = None   # the rank's first input feature, once g_idx is loaded

    # -- layout hooks ----------------------------------------------------------------------------------
    def create_checkpoint_params(self, layer: nn.Module, in_features: int, out_features: int,
                                 dtype: torch.dtype) -> None:
        raise NotImplementedError

    def checkpoint_params(self) -> tuple[str, ...]:
        raise NotImplementedError

    def convert(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """(qweight uint8 in the format, scales (N, groups), zeros or None, the constant zero)."""
        raise NotImplementedError

    # -- LinearMethod ----------------------------------------------------------------------------------
    def group_dim(self, dim: int) -> Optional[int]:
        """The input-feature dim of a per-group parameter for its ParamLayout: None (not sliced by rank)
        when its groups are not whole slices of the input features (per channel, a partial last group)."""
        return None if self.group_size == -1 or self.group != self.checkpoint_group else dim

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        group = in_features if self.group_size == -1 else self.group_size
        tp = getattr(layer, "tp_size", 1)
        split = f" (with tensor_parallel_size={tp} each rank holds {in_features})" if tp > 1 else ""
        if in_features % group and tp > 1 and _splits_input_features(layer):
            raise ValueError(f"layer {self.prefix}: its input features{split} are not a multiple of the "
                             f"checkpoint's group_size {group}; a tensor-parallel size that splits "
                             f"no quantization group is needed")
        self.checkpoint_group, self.checkpoint_groups = group, -(-in_features // group)
        self.group = math.gcd(in_features, group)
        if in_features % 8:
            raise ValueError(f"layer {self.prefix}: its input features{split} are not a multiple of 8 "
                             f"(the GEMM reads the weight 8 int4 or 4 int8 values per int32)")
        for index, size in enumerate(output_sizes):
            if size % self.output_pack:
                raise ValueError(f"layer {self.prefix}: output shard {index} has {size} features on each "
                                 f"rank, not a multiple of {self.output_pack} (values per packed int32 of its "
                                 f"zero points or weight); this tensor-parallel size splits a packed element")
        self.create_checkpoint_params(layer, in_features, sum(output_sizes), dtype)
        if self.g_idx_name is not None:
            g_idx = new_param((in_features,), torch.int32, ParamLayout(output_dim=None, input_dim=0, optional=True))
            g_idx.weight_loader = functools.partial(self._load_g_idx, layer)  # type: ignore[attr-defined]
            setattr(layer, self.g_idx_name, g_idx)

    def _load_g_idx(self, layer: nn.Module, param: nn.Parameter, weight: Any, shard_id: Any = None) -> None:
        """Act-order indices: this rank's input features' entries; every fused shard must agree (they
        share the input, so a quantizer orders their features alike)."""
        shard = layer.shard_slice(shard_id)
        values = weight.load(dtype=torch.int32).reshape(-1)
        if values.numel() < shard.in_start + shard.in_len:
            raise ValueError(f"checkpoint tensor {weight.name} has {values.numel()} entries, expected one per "
                             f"input feature ({shard.in_start + shard.in_len} or more)")
        local = values[shard.in_start:shard.in_start + shard.in_len].to(param.device)
        if self.g_idx_start is not None and not torch.equal(param.data, local):
            raise ValueError(f"layer {self.prefix}: the fused checkpoint tensors' g_idx differ ({weight.name} "
                             f"orders its input features unlike the shard loaded before it); act-order "
                             f"layers fused into one GEMM must share one order")
        param.data.copy_(local)
        self.g_idx_start = shard.in_start

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if hasattr(layer, "wo_qweight"):
            return                                             # converted already
        qweight, scales, zeros, self.zero = self.convert(layer)
        perm = None
        if self.g_idx_name is not None and self.g_idx_start is not None:
            perm = self._act_order(getattr(layer, self.g_idx_name).data)
        if self.group != self.checkpoint_group:                # a partial last group: finer groups
            repeat, held = self.checkpoint_group // self.group, qweight.shape[1] * 8 // self.bits // self.group
            scales = scales.repeat_interleave(repeat, dim=1)[:, :held]
            zeros = None if zeros is None else zeros.repeat_interleave(repeat, dim=1)[:, :held].contiguous()
        for name in self.checkpoint_params() + ((self.g_idx_name,) if self.g_idx_name else ()):
            delattr(layer, name)
        if perm is not None:                                   # columns sorted by group
            qweight = _permute_columns(qweight, perm, self.bits)
        for name, tensor in zip(BUFFERS, (qweight, scales.contiguous(), zeros, perm)):
            if tensor is not None:
                layer.register_buffer(name, tensor, persistent=False)

    def _act_order(self, g_idx: torch.Tensor) -> Optional[torch.Tensor]:
        """The permutation that sorts this rank's input features by group, or None when they are in order."""
        if self.group_size == -1:
            return None            # one group per row, over every rank's features: any order is that group
        k, group, groups = g_idx.numel(), self.checkpoint_group, self.checkpoint_groups
        local = g_idx.long() - self.g_idx_start // group
        if torch.equal(local, torch.arange(k, device=local.device) // group):
            return None
        sizes = torch.full((groups,), group, device=local.device)
        sizes[-1] = k - (groups - 1) * group
        in_range = bool(((local >= 0) & (local < groups)).all())
        if not in_range or not torch.equal(torch.bincount(local, minlength=groups), sizes):
            raise ValueError(f"layer {self.prefix}: its g_idx (act-order) does not give each of this rank's "
                             f"{groups} groups its group_size={group} input features; with tensor "
                             f"parallelism splitting a layer's input features an act-order checkpoint's groups "
                             f"span ranks (use tensor_parallel_size=1 or a checkpoint without act-order)")
        return torch.argsort(local, stable=True).to(torch.int32)

    def quantized_weight(self, layer: nn.Module) -> GroupQuantWeight:
        """The layer's weight as the GEMM takes it, built on first use and kept on the layer.

        NOTE: kept while its tensors are the layer's buffers (an identity check, no device work): a
        `module.to()` or `_apply` replaces the buffers, and the next call rebuilds it from the new ones."""
        cached: Optional[GroupQuantWeight] = layer.__dict__.get("_wo_weight")
        if cached is not None and cached.qweight is layer.wo_qweight and cached.scales is layer.wo_scales \
                and cached.zeros is getattr(layer, "wo_zeros", None) and cached.perm is getattr(layer, "wo_perm", None):
            return cached
        weight = GroupQuantWeight(layer.wo_qweight, self.bits, self.group, layer.wo_scales,
                                  zeros=getattr(layer, "wo_zeros", None), zero=self.zero,
                                  perm=getattr(layer, "wo_perm", None))
        layer.__dict__["_wo_weight"] = weight        # a plain attribute: not a buffer, not in state_dict
        return weight

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor],
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return weight_only_linear(x, self.quantized_weight(layer), bias, out=out)

    def init_dummy_g_idx(self, layer: nn.Module) -> None:
        if self.g_idx_name is not None:
            g_idx = getattr(layer, self.g_idx_name)
            g_idx.data.copy_(torch.arange(g_idx.numel(), device=g_idx.device) // self.checkpoint_group)
            self.g_idx_start = 0


def _splits_input_features(layer: nn.Module) -> bool:
    from ..layers.linear import RowParallelLinear

    return isinstance(layer, RowParallelLinear)


def _permute_columns(qweight: torch.Tensor, perm: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored column j <- input feature perm[j] (qweight in the format, uint8)."""
    index = perm.to(qweight.device).long()
    if bits == 8:
        return qweight.index_select(1, index).contiguous()
    values = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)
    return pack_int4(values.index_select(1, index))


# ------------------------------------------------------------------------------ compressed-tensors


class CompressedTensorsWeightOnlyMethod(WeightOnlyLinearMethod):
    """compressed-tensors' pack-quantized W4A16 / W8A16 (group or channel strategy, symmetric or with
    zero points, optional act-order g_idx). Its `weight_shape` tensor (the unpacked shape) is skipped
    by the config's `checkpoint_ignored`."""

    g_idx_name = "weight_g_idx"

    def __init__(self, bits: int, group_size: int, symmetric: bool, prefix: str) -> None:
        super().__init__(bits, group_size, prefix)
        self.symmetric = symmetric
        self.output_pack = 1 if symmetric else self.pack
        self.name = f"compressed-tensors w{bits}a16 " + (f"g{group_size}" if group_size > 0 else "per-channel") + \
            ("" if symmetric else " asym")

    def create_checkpoint_params(self, layer: nn.Module, in_features: int, out_features: int,
                                 dtype: torch.dtype) -> None:
        groups, group = self.checkpoint_groups, self.checkpoint_group
        layer.weight_packed = new_param((out_features, in_features // self.pack), torch.int32,
                                        ParamLayout(output_dim=0, input_dim=1, input_pack=self.pack))
        layer.weight_scale = new_param((out_features, groups), dtype,
                                       ParamLayout(output_dim=0, input_dim=self.group_dim(1), input_pack=group))
        if not self.symmetric:
            layer.weight_zero_point = new_param(
                (out_features // self.pack, groups), torch.int32,
                ParamLayout(output_dim=0, output_pack=self.pack, input_dim=self.group_dim(1), input_pack=group))

    def checkpoint_params(self) -> tuple[str, ...]:
        return ("weight_packed", "weight_scale") + (() if self.symmetric else ("weight_zero_point",))

    def convert(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        # weight_packed's bytes are already the format's: value i of a row at bits [bits*i, bits*(i+1))
        qweight = layer.weight_packed.data.view(torch.uint8)
        if self.symmetric:
            return qweight, layer.weight_scale.data, None, self.zero
        # zero points are packed along the output dim: unpack them as rows of the transpose
        zeros = unpack_int32(layer.weight_zero_point.data.t(), self.bits).t()
        stored, zero = zeros_or_constant(zeros, self.bits)
        return qweight, layer.weight_scale.data, stored, zero

    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        random_bytes_(layer.weight_packed, generator)
        small_scales_(layer.weight_scale, self.bits, generator)
        if not self.symmetric:
            random_bytes_(layer.weight_zero_point, generator)
        self.init_dummy_g_idx(layer)


def compressed_tensors_weight_only(weights: "QuantizationArgs", prefix: str) -> LinearMethod:
    """The method of a compressed-tensors layer whose weights are int4/int8 pack-quantized and whose
    activations stay unquantized (W4A16 / W8A16). Raises ValueError naming what is unsupported."""
    def bad(what: str) -> ValueError:
        return ValueError(f"layer {prefix}: compressed-tensors weight-only quantization with {what} is not "
                          f"supported (supported: int weights of 4 or 8 bits, strategy 'group' or 'channel', "
                          f"static scales)")

    kind = str(getattr(weights.type, "value", weights.type))
    strategy = str(getattr(weights.strategy, "value", weights.strategy))
    if kind != "int":
        raise bad(f"type={kind!r}")
    if weights.num_bits not in (4, 8):
        raise bad(f"num_bits={weights.num_bits}")
    if strategy not in ("group", "channel"):
        raise bad(f"strategy={strategy!r}")
    if weights.dynamic:
        raise bad(f"dynamic={weights.dynamic!r}")
    group = weights.group_size if strategy == "group" else -1
    if strategy == "group" and (not group or group <= 0):
        raise bad(f"group_size={group!r}")
    return CompressedTensorsWeightOnlyMethod(weights.num_bits, group, bool(weights.symmetric), prefix)
