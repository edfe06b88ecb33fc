"""The weight-only GEMV (M <= 8), its single-launch split-K, and the tuned-config lookup.

The GEMV sums (q - z) * x over a group before applying the scale, so it matches the reference within
the summation-order tolerances of test_weight_only.py, not bit for bit."""
from __future__ import annotations

import json

import pytest
import torch
from test_weight_only import assert_close, make_weight

from pagoda.kernels import weight_only_triton as wt
from pagoda.kernels.weight_only import weight_only_linear_ref
from pagoda.kernels.weight_only_triton import GemmConfig

FORMATS = [(4, 64, "zeros"), (4, 32, "constant"), (4, 32, "mins"), (4, 32, "super"), (8, 32, "zeros16"),
           (8, 16, "super_int8")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,block_m", [(1, 1), (3, 4), (8, 8)])
@pytest.mark.parametrize("block_k", [32, 128])            # one group per tile, or several
@pytest.mark.parametrize("bits,group,variant", FORMATS, ids=str)
def test_gemv_matches_reference(bits, group, variant, block_k, m, block_m, dtype, device):
    n, k = 40, 256
    weight = make_weight(n, k, bits, group, variant, device, seed=m)
    if wt._fit_block_k(block_k, group, k) != block_k:
        pytest.skip("tile does not fit the groups")
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    got = wt.weight_only_linear(x, weight, bias, config=GemmConfig(block_m, 16, block_k, split_k=2))
    assert_close(got, weight_only_linear_ref(x, weight, bias))


def test_split_k_counters_reset_and_sum_is_deterministic(device):
    """Every split of a tile bumps its counter; the last adds the partials and zeroes it for the next call."""
    weight = make_weight(48, 512, 4, 32, "zeros", device, seed=4)
    x = torch.randn(2, 512, device=device)
    for config in (GemmConfig(2, 16, 32, split_k=4), GemmConfig(16, 16, 32, split_k=3)):
        first = wt.weight_only_linear(x, weight, config=config)
        second = wt.weight_only_linear(x, weight, config=config)
        assert torch.equal(first, second)
        assert_close(first, weight_only_linear_ref(x, weight))
        assert int(wt._tile_counters(x.device, 1).abs().sum()) == 0


def test_gemv_takes_act_order_and_rejects_too_many_rows(device):
    weight = make_weight(32, 256, 4, 32, "zeros", device, seed=5)
    weight.perm = torch.randperm(256, generator=torch.Generator().manual_seed(1)).to(torch.int32).to(device)
    x = torch.randn(4, 256, device=device)
    assert_close(wt.weight_only_linear(x, weight, config=GemmConfig(4, 16, 64)), weight_only_linear_ref(x, weight))
    with pytest.raises(ValueError, match="block_m=2 selects the GEMV"):
        wt.weight_only_linear(x, weight, config=GemmConfig(2, 16, 64))


def test_heuristics_choose_the_gemv_up_to_8_rows():
    for m, gemv_rows in ((1, 1), (3, 4), (8, 8)):
        config = wt.default_config(m, 4096, 4096, 4, 128)
        assert config.gemv and config.block_m == gemv_rows
        assert (4096 // config.block_n) * config.split_k >= 4 * 132 or config.split_k > 1
    assert not wt.default_config(9, 4096, 4096, 4, 128).gemv
    assert wt.default_config(1, 28672, 4096, 4, 128).split_k == 1          # 896 row tiles fill the GPU
    assert wt.default_config(1, 4096, 14336, 4, 128).split_k > 1


def test_tuned_table_is_read_for_its_device_and_shape(tmp_path):
    tuned = GemmConfig(2, 64, 128, 4, 8, 1)
    table = {wt.shape_key(4096, 4096, 4, 128): {"2": wt.config_json(tuned),
                                                "16": wt.config_json(GemmConfig(16, 32, 128, 2, 4, 4))},
             wt.shape_key(512, 4096, 4, 128): {"1": wt.config_json(GemmConfig(1, 16, 48, 2))}}   # 48 misfits g128
    wt.config_file("Fake GPU 80GB", tmp_path).write_text(json.dumps(table))
    lookup = lambda m, n=4096, name="Fake GPU 80GB": wt.tuned_config(m, n, 4096, 4, 128, name, tmp_path)  # noqa: E731
    assert wt.config_file("Fake GPU 80GB", tmp_path).name == "Fake_GPU_80GB.json"
    assert lookup(1) == tuned and lookup(2) == tuned                      # the smallest tuned M at or above
    assert lookup(3).block_m == 16                                        # a GEMV of 2 rows cannot take 3
    assert lookup(17) is None                                             # past the table: the heuristics
    assert lookup(1, n=6144) is None                                      # an untuned shape
    assert lookup(1, n=512) is None                                       # a tile across groups is ignored
    assert lookup(1, name="Other GPU") is None                            # no file for that GPU
    assert wt.load_table(wt.config_file("Missing", tmp_path)) == {}


def test_pick_config_falls_back_to_heuristics_without_a_table():
    weight = make_weight(8, 4096, 4, 128, "zeros", "cpu")
    assert wt.pick_config(1, 4096, 4096, weight, torch.device("cpu")) == wt.default_config(1, 4096, 4096, 4, 128)
