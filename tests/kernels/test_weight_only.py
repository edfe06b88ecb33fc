"""Triton weight-only GEMM (W4A16 / W8A16) vs the float32 reference `weight_only.dequantize`.

The kernel's dequantized tile equals the reference bit for bit (same float32 operations in the same
order), so the outputs differ only by summation order, plus, on the batch-1 path, the weight not
being rounded to the activations' dtype before the multiply. Tolerances, relative to the output's
largest magnitude: float32 1e-5; bfloat16 one bf16 unit (2^-8) of that magnitude, plus summation noise.

Formats (`make_weight`): zeros per group (GPTQ / AWQ / asymmetric compressed-tensors; int16 for
GPTQ int8's 1..256), a constant zero (symmetric), float mins (GGUF Q4_1), uint8 sub-scales and
sub-mins with float16 super-scales (Q4_K), int8 sub-scales of 16-value groups with a constant zero
32 (Q6_K, 6 bits in a 4-bit and a 2-bit plane); group sizes 32, 128 and one group per row (per-channel); M = 1 (multiply-add path), 3 and
33 (tensor-core path); with and without bias; float32 and bfloat16 activations.
"""
from __future__ import annotations

import pytest
import torch

from pagoda.kernels import weight_only_triton
from pagoda.kernels.backend import use_backend
from pagoda.kernels.weight_only import GroupQuantWeight, dequantize, pack_int4, pack_int6, unpack, \
    weight_only_linear, weight_only_linear_ref
from pagoda.kernels.weight_only_triton import GemmConfig, _launch

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.2e-2}


def make_weight(n: int, k: int, bits: int, group: int, variant: str, device, seed: int = 0) -> GroupQuantWeight:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    high = None
    if bits == 6:
        qweight, high = pack_int6(q)
    else:
        qweight = pack_int4(q) if bits == 4 else q
    groups = k // group
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.002).half()
    fields: dict = {}
    if variant == "zeros":
        fields["zeros"] = torch.randint(0, 1 << bits, (n, groups), generator=gen, dtype=torch.uint8)
    elif variant == "zeros16":                          # GPTQ int8's zero points run up to 256
        fields["zeros"] = torch.randint(1, 257, (n, groups), generator=gen, dtype=torch.int16)
    elif variant == "constant":
        fields["zero"] = 1 << (bits - 1)
    elif variant == "mins":                             # Q4_1: w = q * d + m
        fields["mins"] = (torch.randn(n, groups, generator=gen) * 0.05).half()
    elif variant == "super":                            # Q4_K: w = q * (d * sc) - dmin * m
        scales = torch.randint(1, 64, (n, groups), generator=gen, dtype=torch.uint8)
        fields.update(mins=torch.randint(0, 64, (n, groups), generator=gen, dtype=torch.uint8),
                      super_scales=(torch.rand(n, k // 256, generator=gen) * 1e-3 + 1e-4).half(),
                      super_mins=-(torch.rand(n, k // 256, generator=gen) * 1e-3).half())
    elif variant == "super_int8":                       # Q6_K: w = (q - 32) * d * sc, sc signed
        scales = torch.randint(-128, 128, (n, groups), generator=gen, dtype=torch.int8)
        fields.update(zero=32, super_scales=(torch.rand(n, k // 256, generator=gen) * 1e-3).half())
    else:
        raise AssertionError(variant)
    weight = GroupQuantWeight(qweight, bits, group, scales, qweight_high=high, **fields)
    assert torch.equal(unpack(weight), q.to(torch.int32))             # the packing round-trips
    return _to(weight, device)


def _to(weight: GroupQuantWeight, device) -> GroupQuantWeight:
    moved = {f: getattr(weight, f).to(device) for f in ("qweight", "qweight_high", "scales", "zeros", "mins",
                                                         "super_scales", "super_mins", "perm")
             if getattr(weight, f) is not None}
    return GroupQuantWeight(**{**weight.__dict__, **moved})


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = expected.float().abs().max().item()
    tol = TOLERANCE[expected.dtype] * max(scale, 1e-3)
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=0)


# (bits, group, variant): every format the layout allows, at group 32, 128 and per-channel (group = K)
FORMATS = [
    (4, 128, "zeros"), (4, 32, "constant"), (4, None, "constant"), (4, 32, "mins"), (4, 32, "super"),
    (8, 128, "constant"), (8, 32, "zeros16"), (8, None, "zeros"), (8, 16, "super_int8"),
    (6, 16, "super_int8"), (6, 32, "zeros"), (6, None, "constant"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("bits,group,variant", FORMATS, ids=lambda v: str(v))
def test_matches_reference(bits, group, variant, m, dtype, device):
    n, k = 80, 512                       # N not a multiple of any tile width: masked columns
    weight = make_weight(n, k, bits, group or k, variant, device)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if m != 3 else None
    assert_close(weight_only_triton.weight_only_linear(x, weight, bias), weight_only_linear_ref(x, weight, bias))


CONFIGS = [
    pytest.param(1, GemmConfig(1, 32, 128, split_k=4), id="m1-split4"),
    pytest.param(1, GemmConfig(1, 16, 64), id="m1-one-group-per-tile"),
    pytest.param(5, GemmConfig(16, 32, 64, split_k=2), id="m5-split2-one-group"),
    pytest.param(5, GemmConfig(16, 64, 256, split_k=2), id="m5-split2-many-groups"),
    pytest.param(70, GemmConfig(64, 32, 64), id="m70-two-row-tiles"),
    pytest.param(17, GemmConfig(16, 16, 32), id="m17-narrow-tiles"),
    pytest.param(1, GemmConfig(1, 16, 16, split_k=2), id="m1-16-wide-tiles"),     # 6 bits: one top-bits word a row
    pytest.param(2, GemmConfig(2, 32, 256), id="m2-wide-gemv"),
]
# int4 with zeros in groups of 64; 6-bit values (Q6_K's format, joined from two planes) in 16-value groups
# under super-scales
TILED_FORMATS = [pytest.param((4, 64, "zeros", 1), id="int4-g64"), pytest.param((6, 16, "super_int8", 4), id="six-bit")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,config", CONFIGS)
@pytest.mark.parametrize("weight_format", TILED_FORMATS)
def test_explicit_tilings(weight_format, m, config, dtype, device):
    """Split-K (float32 partial sums), tiles of one group or several, several row tiles, GEMV and GEMM."""
    n, k = 48, 512
    bits, group, variant, seed = weight_format
    weight = make_weight(n, k, bits, group, variant, device, seed=seed)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    assert_close(weight_only_triton.weight_only_linear(x, weight, bias, config=config),
                 weight_only_linear_ref(x, weight, bias))


def test_six_bit_layout_and_its_invariants():
    q = torch.arange(64, dtype=torch.uint8).view(2, 32)               # every 6-bit value once
    low, high = pack_int6(q)
    assert low.shape == (2, 16) and high.shape == (2, 8)
    # byte j of the top plane holds the top bits of k = 4j .. 4j+3, two bits each from bit 0
    assert int(high[0, 0]) == 0 and int(high[1, 0]) == (2 | 2 << 2 | 2 << 4 | 2 << 6)
    weight = GroupQuantWeight(low, 6, 32, torch.ones(2, 1), qweight_high=high)
    assert weight.shape == (2, 32) and weight.nbytes() == 2 * 16 + 2 * 8 + 2 * 4
    assert torch.equal(unpack(weight), q.to(torch.int32))
    with pytest.raises(ValueError, match="qweight_high goes with bits=6"):
        GroupQuantWeight(low, 6, 32, torch.ones(2, 1))
    with pytest.raises(ValueError, match="qweight_high goes with bits=6"):
        GroupQuantWeight(low, 4, 32, torch.ones(2, 1), qweight_high=high)
    with pytest.raises(ValueError, match="bits must be 4, 6 or 8, got 5"):
        GroupQuantWeight(low, 5, 32, torch.ones(2, 1))
    narrow = GroupQuantWeight(*pack_int6(torch.zeros(2, 40, dtype=torch.uint8))[:1], 6, 8, torch.ones(2, 5),
                              qweight_high=pack_int6(torch.zeros(2, 40, dtype=torch.uint8))[1])
    assert not weight_only_triton.supported(narrow)          # K = 40: the top plane's words need K % 16 == 0


def test_super_scales_on_split_and_wide_tiles(device):
    """Two-level scales where a tile holds several super-blocks' groups (BLOCK_K 512 > 256)."""
    weight = make_weight(40, 1024, 4, 32, "super", device, seed=2)
    x = torch.randn(3, 1024, device=device)
    got = weight_only_triton.weight_only_linear(x, weight, config=GemmConfig(16, 16, 512, split_k=2))
    assert_close(got, weight_only_linear_ref(x, weight))


@pytest.mark.parametrize("m", [1, 6])
def test_act_order_permutation(m, device):
    """perm: stored column j is input feature perm[j]; the kernel gathers x accordingly."""
    n, k = 32, 256
    weight = make_weight(n, k, 4, 32, "zeros", device, seed=3)
    weight.perm = torch.randperm(k, generator=torch.Generator().manual_seed(0)).to(torch.int32).to(device)
    x = torch.randn(m, k, device=device)
    plain = GroupQuantWeight(**{**weight.__dict__, "perm": None})
    # the reference undoes the permutation: feature perm[j] gets stored column j
    torch.testing.assert_close(dequantize(weight)[:, weight.perm.long()], dequantize(plain))
    assert_close(weight_only_triton.weight_only_linear(x, weight), weight_only_linear_ref(x, weight))


def test_out_strided_input_and_leading_dims(device):
    weight = make_weight(64, 256, 4, 128, "zeros", device)
    wide = torch.randn(4, 512, device=device)
    x = wide[:, :256]                                         # row stride 512
    expected = weight_only_linear_ref(x.contiguous(), weight)
    out_buffer = torch.full((4, 96), float("nan"), device=device)
    out = out_buffer[:, :64]                                  # a strided view, written in place
    result = weight_only_triton.weight_only_linear(x, weight, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close(out, expected)
    assert torch.isnan(out_buffer[:, 64:]).all()
    split_out = torch.empty(4, 64, device=device).to(torch.bfloat16)
    weight_only_triton.weight_only_linear(x.to(torch.bfloat16), weight, out=split_out,
                                          config=GemmConfig(16, 32, 64, split_k=2))
    assert_close(split_out, weight_only_linear_ref(x.to(torch.bfloat16).contiguous(), weight))
    batched = weight_only_triton.weight_only_linear(torch.randn(2, 3, 256, device=device), weight)
    assert batched.shape == (2, 3, 64)
    assert weight_only_triton.weight_only_linear(torch.empty(0, 256, device=device), weight).shape == (0, 64)


def test_dispatch_uses_triton_where_supported(device, monkeypatch):
    weight = make_weight(32, 256, 8, 32, "constant", device)
    x = torch.randn(2, 256, device=device).to(torch.bfloat16)
    calls = []
    monkeypatch.setattr(weight_only_triton, "_launch", lambda *args: calls.append(args) or _launch(*args))
    with use_backend("triton"):
        got = weight_only_linear(x, weight)
    assert len(calls) == 1
    assert_close(got, weight_only_linear_ref(x, weight))
    # groups of 24 fit no power-of-2 tile: the dispatch refuses by name (never a silent per-call dequantize
    # of the whole weight on a GPU); the CPU path takes the reference
    odd = GroupQuantWeight(make_weight(8, 96, 4, 32, "zeros", device).qweight, 4, 24,
                           torch.rand(8, 4, device=device).half(), zero=8)
    x = torch.randn(3, 96, device=device)
    assert not weight_only_triton.supported(odd) and weight_only_triton.supported(weight)
    with use_backend("triton"), pytest.raises(ValueError, match="in groups of 24 is not supported by the GPU kernel"):
        weight_only_linear(x, odd)
    with use_backend("torch"):
        torch.testing.assert_close(weight_only_linear(x, odd), weight_only_linear_ref(x, odd), atol=0, rtol=0)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="group_size 24"):
        weight_only_triton.weight_only_linear(x, odd)


def test_pick_config_fits_groups():
    weight = make_weight(8, 4096, 4, 128, "zeros", "cpu")
    cpu = torch.device("cpu")
    config = weight_only_triton.pick_config(1, 256, 4096, weight, cpu)
    assert config.block_m == 1 and config.split_k > 1                 # batch 1 splits K to fill the device
    assert weight_only_triton.pick_config(256, 4096, 4096, weight, cpu).split_k == 1
    small_groups = make_weight(8, 4096, 8, 16, "super_int8", "cpu")
    assert weight_only_triton.pick_config(256, 4096, 4096, small_groups, cpu).block_k % 16 == 0
    odd = GroupQuantWeight(weight.qweight, 4, 24, weight.scales)    # no power-of-2 tile fits 24
    assert weight_only_triton.pick_config(4, 4096, 4104, odd, cpu) is None


def test_rejects_bad_inputs(device):
    weight = make_weight(32, 256, 4, 32, "zeros", device)
    with pytest.raises(ValueError, match="input features"):
        weight_only_triton.weight_only_linear(torch.randn(2, 128, device=device), weight)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        weight_only_triton.weight_only_linear(torch.ones(2, 256, device=device, dtype=torch.int32), weight)
    with pytest.raises(ValueError, match="bias"):
        weight_only_triton.weight_only_linear(torch.randn(2, 256, device=device), weight,
                                              torch.zeros(16, device=device))
    with pytest.raises(ValueError, match="out must be"):
        weight_only_triton.weight_only_linear(torch.randn(2, 256, device=device), weight,
                                              out=torch.empty(2, 32, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match="block_k=48 does not fit group_size 32"):
        weight_only_triton.weight_only_linear(torch.randn(2, 256, device=device), weight,
                                              config=GemmConfig(16, 16, 48))
