"""The MoE layer (engine/layers/moe.py) against direct torch computations, on CPU in one process.

- Routing: softmax or sigmoid scores, top-k, renormalised or not.
- Loading: the same experts given per expert (Qwen / Mixtral names) or stacked (transformers 5's
  (E, 2N, H) form, gpt-oss's input-major interleaved form, with biases), on one rank, as the two
  ranks of tensor parallelism (intermediate slices) and of expert parallelism (whole experts): the
  ranks' unreduced outputs sum to the full layer's output, with each down bias counted once.
- The block: router + experts + gated shared expert; bad checkpoint tensors are refused by name.

Ranks are emulated by setting the TP group's rank and size while a layer is built: loading and the
unreduced forward pass need no collective.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pagoda.engine.distributed import parallel_state
from pagoda.engine.layers.moe import (GPT_OSS_STACKED, TRANSFORMERS_STACKED, FusedMoE, SparseMoeBlock,
                                      check_moe_parallel, select_experts)
from pagoda.engine.model_loader.weights import LazyWeight
from pagoda.engine.models.llama import LlamaMLP
from pagoda.engine.quantization.base import init_dummy_weights

E, K, H, N = 4, 2, 16, 8      # experts, top-k, hidden, expert intermediate
T = 5                         # tokens


class TensorWeight(LazyWeight):
    """An in-memory checkpoint tensor."""

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        super().__init__(name, tuple(tensor.shape))
        self.tensor = tensor

    def _load(self, dim, start, length) -> torch.Tensor:
        return self.tensor.clone() if dim is None else self.tensor.narrow(dim, start, length).contiguous()


@contextlib.contextmanager
def as_rank(rank: int, world_size: int) -> Iterator[None]:
    saved = parallel_state._TP
    parallel_state._TP = parallel_state.TPGroup(rank=rank, world_size=world_size)
    try:
        yield
    finally:
        parallel_state._TP = saved


def random_experts(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(E, N, H, generator=g) * 0.3, "w3": torch.randn(E, N, H, generator=g) * 0.3,
            "w2": torch.randn(E, H, N, generator=g) * 0.3, "b1": torch.randn(E, N, generator=g) * 0.1,
            "b3": torch.randn(E, N, generator=g) * 0.1, "b2": torch.randn(E, H, generator=g) * 0.1}


def reference(x: torch.Tensor, experts: dict[str, torch.Tensor], weights: torch.Tensor, ids: torch.Tensor,
              bias: bool) -> torch.Tensor:
    """sum_k w[t, k] * (W2 (silu(W1 x + b1) * (W3 x + b3)) + b2) of expert ids[t, k], token by token."""
    out = torch.zeros(x.shape[0], H)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = experts["w1"][e] @ x[t], experts["w3"][e] @ x[t]
            if bias:
                gate, up = gate + experts["b1"][e], up + experts["b3"][e]
            y = experts["w2"][e] @ (F.silu(gate) * up)
            out[t] += weights[t, k] * (y + experts["b2"][e] if bias else y)
    return out


def per_expert_tensors(experts: dict[str, torch.Tensor], bias: bool, names=("gate_proj", "up_proj", "down_proj")):
    """(checkpoint name, our parameter, shard id, tensor) one expert and projection at a time."""
    for e in range(E):
        for which, name in zip(("w1", "w3", "w2"), names):
            kind = "w2" if which == "w2" else "w13"
            yield f"experts.{e}.{name}.weight", f"{kind}_weight", (e, which), experts[which][e]
            if bias:
                yield f"experts.{e}.{name}.bias", f"{kind}_bias", (e, which), experts["b" + which[1]][e]


def stacked_tensors(experts: dict[str, torch.Tensor], bias: bool, layout):
    if layout is TRANSFORMERS_STACKED:
        gate_up = torch.cat([experts["w1"], experts["w3"]], dim=1)               # (E, 2N, H)
        down = experts["w2"]                                                     # (E, H, N)
        gate_up_bias = torch.cat([experts["b1"], experts["b3"]], dim=1)
    else:                                   # gpt-oss: x @ W, gate and up features alternating
        gate_up = torch.stack([experts["w1"], experts["w3"]], dim=2).reshape(E, 2 * N, H).transpose(1, 2)
        down = experts["w2"].transpose(1, 2)                                     # (E, N, H)
        gate_up_bias = torch.stack([experts["b1"], experts["b3"]], dim=2).reshape(E, 2 * N)
    yield "experts.gate_up_proj", "w13_weight", "w13", gate_up.contiguous()
    yield "experts.down_proj", "w2_weight", "w2", down.contiguous()
    if bias:
        yield "experts.gate_up_proj_bias", "w13_bias", "w13", gate_up_bias
        yield "experts.down_proj_bias", "w2_bias", "w2", experts["b2"]


def load(layer: FusedMoE, tensors) -> None:
    params = dict(layer.named_parameters())
    filled = set()
    for name, param_name, shard, tensor in tensors:
        layer.weight_loader(params[param_name], TensorWeight(name, tensor), shard)
        filled.add((param_name, shard))
    for param_name in params:                     # what the model's loader checks after the last tensor
        assert {(param_name, s) for s in layer.expected_shards(param_name)} <= filled


def routing(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    return x, *select_experts(torch.randn(T, E, generator=g), K, "softmax", renormalize=True)


# -- routing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_select_experts_matches_a_direct_computation(scoring, renormalize):
    logits = torch.randn(7, 6, generator=torch.Generator().manual_seed(0))
    weights, ids = select_experts(logits, 3, scoring, renormalize)
    assert weights.dtype == torch.float32 and ids.shape == (7, 3)
    for t in range(7):
        scores = [float(v) for v in (torch.softmax(logits[t], 0) if scoring == "softmax" else torch.sigmoid(logits[t]))]
        best = sorted(range(6), key=lambda e: -scores[e])[:3]
        chosen = [scores[e] for e in best]
        total = sum(chosen) if renormalize else 1.0
        assert ids[t].tolist() == best
        assert weights[t].tolist() == pytest.approx([c / total for c in chosen], abs=1e-6)
    if renormalize:
        assert weights.sum(-1) == pytest.approx(torch.ones(7), abs=1e-6)
    elif scoring == "sigmoid":
        assert (weights.sum(-1) > 1).any()          # independent per-expert scores: no sum-to-one


def test_select_experts_refuses_an_unknown_scoring():
    with pytest.raises(ValueError, match="router scoring must be 'softmax' or 'sigmoid', got 'relu'"):
        select_experts(torch.zeros(1, 4), 2, "relu")  # type: ignore[arg-type]


# -- loading and the tensor- / expert-parallel splits ----------------------------------------------------
FORMATS = [pytest.param("per-expert", None, id="per-expert"),
           pytest.param("mixtral-names", None, id="mixtral-names"),
           pytest.param("stacked", TRANSFORMERS_STACKED, id="stacked-transformers"),
           pytest.param("stacked", GPT_OSS_STACKED, id="stacked-gpt-oss")]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("fmt, layout", FORMATS)
@pytest.mark.parametrize("world_size, expert_parallel", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "ep2"])
def test_ranks_sum_to_the_full_layer(fmt, layout, bias, world_size, expert_parallel):
    experts = random_experts()
    x, weights, ids = routing()
    expected = reference(x, experts, weights, ids, bias)
    total = torch.zeros(T, H)
    for rank in range(world_size):
        with as_rank(rank, world_size):
            layer = FusedMoE(E, K, H, N, torch.float32, bias=bias, enable_expert_parallel=expert_parallel,
                             stacked_layout=layout or TRANSFORMERS_STACKED)
        if fmt == "stacked":
            load(layer, stacked_tensors(experts, bias, layout))
        else:
            names = ("w1", "w3", "w2") if fmt == "mixtral-names" else ("gate_proj", "up_proj", "down_proj")
            load(layer, per_expert_tensors(experts, bias, names))
        if expert_parallel:
            assert layer.w13_weight.shape == (E // world_size, 2 * N, H)
            assert layer.expert_map.tolist() == [i - rank * 2 if rank * 2 <= i < rank * 2 + 2 else -1 for i in range(E)]
        else:
            assert layer.w13_weight.shape == (E, 2 * N // world_size, H)
        total += layer(x, weights, ids)                 # this rank's unreduced share
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=1e-5)


def test_a_rank_skips_other_ranks_experts():
    experts = random_experts()
    with as_rank(1, 2):
        layer = FusedMoE(E, K, H, N, torch.float32, enable_expert_parallel=True)
    layer.w13_weight.data.fill_(7.0)
    param = dict(layer.named_parameters())["w13_weight"]
    layer.weight_loader(param, TensorWeight("experts.0.gate_proj.weight", experts["w1"][0]), (0, "w1"))
    assert (layer.w13_weight == 7.0).all()                          # expert 0 lives on rank 0
    layer.weight_loader(param, TensorWeight("experts.3.gate_proj.weight", experts["w1"][3]), (3, "w1"))
    torch.testing.assert_close(layer.w13_weight[1, :N], experts["w1"][3])    # local expert 1 = global 3


@pytest.mark.parametrize("shard, tensor, message", [
    ((4, "w1"), torch.zeros(N, H), "is expert 4, but the model has num_experts=4"),
    ((0, "w1"), torch.zeros(N + 1, H), r"has shape \(9, 16\), expected \(8, 16\)"),
    ((0, "w2"), torch.zeros(H, N), "projection 'w2' does not go to w13_weight"),
    ((0, "gate"), torch.zeros(N, H), r"expert shard id must be \(expert, 'w1' \| 'w3' \| 'w2'\)"),
    ("w2", torch.zeros(E, H, N), "stacked shard 'w2' does not fit w13_weight"),
    ("w13", torch.zeros(E, 2 * N, H + 1), r"has shape \(4, 16, 17\), expected \(4, 16, 16\)"),
])
def test_bad_expert_tensors_are_refused_by_name(shard, tensor, message):
    layer = FusedMoE(E, K, H, N, torch.float32)
    with pytest.raises(ValueError, match=message):
        layer.weight_loader(layer.w13_weight, TensorWeight("model.layers.0.mlp.experts.x", tensor), shard)


def test_mixing_stacked_and_per_expert_tensors_is_refused():
    layer = FusedMoE(E, K, H, N, torch.float32)
    layer.weight_loader(layer.w13_weight, TensorWeight("experts.gate_up_proj", torch.zeros(E, 2 * N, H)), "w13")
    assert layer.expected_shards("w13_weight") == {"w13"}
    with pytest.raises(ValueError, match="got both a stacked tensor of all experts and per-expert tensors"):
        layer.weight_loader(layer.w13_weight, TensorWeight("experts.0.up_proj.weight", torch.zeros(N, H)), (0, "w3"))


@pytest.mark.parametrize("args, message", [
    ((6, 2, 8, 4, True), "num_experts=6 is not divisible by tensor_parallel_size=4"),
    ((8, 2, 6, 4, False), "intermediate size 6 is not divisible by tensor_parallel_size=4"),
    ((8, 9, 8, 1, False), r"num_experts_per_tok \(top_k\) must be in \[1, num_experts=8\], got 9"),
    ((0, 1, 8, 1, False), "num_experts must be an integer >= 1, got 0"),
])
def test_check_moe_parallel_names_the_value(args, message):
    with pytest.raises(ValueError, match=message):
        check_moe_parallel(*args)
    check_moe_parallel(8, 2, 6, 4, True)            # whole experts: the intermediate size need not divide


# -- the block -----------------------------------------------------------------------------------------
def test_block_with_a_gated_shared_expert_matches_a_direct_computation():
    experts = random_experts(seed=3)
    g = torch.Generator().manual_seed(4)
    gate_w, shared_gate_w = torch.randn(E, H, generator=g), torch.randn(1, H, generator=g)
    shared = {"gate_proj": torch.randn(12, H, generator=g) * 0.3, "up_proj": torch.randn(12, H, generator=g) * 0.3,
              "down_proj": torch.randn(H, 12, generator=g) * 0.3}
    x = torch.randn(T, H, generator=g)
    # direct: softmax router, top-2 not renormalised, plus sigmoid(gate) * shared MLP
    probs = torch.softmax(x @ gate_w.t(), -1)
    weights, ids = probs.topk(K, -1)
    shared_out = shared["down_proj"] @ (F.silu(shared["gate_proj"] @ x.t()) * (shared["up_proj"] @ x.t()))
    expected = reference(x, experts, weights, ids, bias=False) + torch.sigmoid(x @ shared_gate_w.t()) * shared_out.t()

    total = torch.zeros(T, H)
    for rank in range(2):
        with as_rank(rank, 2):
            mlp = LlamaMLP(SimpleNamespace(hidden_size=H, intermediate_size=12, hidden_act="silu"),
                           torch.float32, None, "mlp.shared_expert")
            block = SparseMoeBlock(FusedMoE(E, K, H, N, torch.float32), torch.float32, scoring="softmax",
                                   renormalize=False, shared_expert=mlp, shared_expert_gate=True)
        load(block.experts, per_expert_tensors(experts, bias=False))
        block.gate.weight.data.copy_(gate_w)
        block.shared_expert_gate.weight.data.copy_(shared_gate_w)
        mlp.gate_up_proj.weight_loader(mlp.gate_up_proj.weight, TensorWeight("g", shared["gate_proj"]), 0)
        mlp.gate_up_proj.weight_loader(mlp.gate_up_proj.weight, TensorWeight("u", shared["up_proj"]), 1)
        mlp.down_proj.weight_loader(mlp.down_proj.weight, TensorWeight("d", shared["down_proj"]), None)
        total += block(x)
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=1e-5)


def test_dummy_init_fills_every_expert_parameter():
    block = SparseMoeBlock(FusedMoE(E, K, H, N, torch.float32, bias=True), torch.float32)
    for param in block.parameters():
        param.data.fill_(float("nan"))
    init_dummy_weights(block, torch.Generator().manual_seed(0))
    for name, param in block.named_parameters():
        assert torch.isfinite(param).all() and param.abs().max() <= 1e-3 and param.abs().max() > 0, name
    assert torch.isfinite(block(torch.randn(T, H))).all()
