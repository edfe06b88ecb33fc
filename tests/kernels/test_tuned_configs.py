"""kernels/tuned_configs.py: GPU file names, where each family's tables live, reading a table once, the
"smallest tuned M at or above" lookup, and the files each kernel family reads through it."""
from __future__ import annotations

import json

import torch

from pagoda.kernels import fp8_triton, moe_triton, tuned_configs, weight_only_triton

CPU = torch.device("cpu")


def test_file_names_keep_the_families_layouts(tmp_path):
    assert tuned_configs.device_name(CPU) == "cpu"
    assert tuned_configs.file_safe("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert tuned_configs.file_safe("odd/name") == "odd_name"
    assert tuned_configs.config_dir("moe") == moe_triton.CONFIG_DIR
    assert moe_triton.CONFIG_DIR.name == "moe_configs" and moe_triton.CONFIG_DIR.parent.name == "kernels"
    assert weight_only_triton.CONFIG_DIR.name == "weight_only_configs" and fp8_triton.CONFIG_DIR.name == "fp8_configs"
    # the moe tables' names (committed files must still be found), one per shape
    assert moe_triton.config_file(8, 1024, 4096, "NVIDIA H100 80GB HBM3") == \
        moe_triton.CONFIG_DIR / "E=8,N=1024,H=4096,device=NVIDIA_H100_80GB_HBM3.json"
    assert weight_only_triton.config_file("A B", tmp_path) == tmp_path / "A_B.json"
    assert fp8_triton.config_file("A B") == fp8_triton.CONFIG_DIR / "A_B.json"


def test_at_or_above_takes_the_smallest_tuned_m():
    per_m = {"16": "b", "2": "a", "128": "c"}
    assert [tuned_configs.at_or_above(per_m, m) for m in (1, 2, 3, 16, 17, 128)] == ["a", "a", "b", "b", "c", "c"]
    assert tuned_configs.at_or_above(per_m, 129) is None
    assert tuned_configs.at_or_above({}, 1) is None and tuned_configs.at_or_above(None, 1) is None
    assert tuned_configs.at_or_above({4: "int keys"}, 3) == "int keys"
    assert tuned_configs.largest(per_m) == "c"                     # by number, not by string ("16" > "128")


def test_a_table_is_read_once_until_rewritten(tmp_path):
    path = tuned_configs.table_file("fp8", "Fake GPU", directory=tmp_path)
    assert tuned_configs.read_table(path) == {}
    tuned_configs.write_table(path, {"N=8,K=16": {"16": {"x": 2}, "2": {"x": 1}}})
    lines = path.read_text().splitlines()
    assert lines[1] == ' "N=8,K=16": {"2": {"x": 1}, "16": {"x": 2}}'    # one line per shape, M in order
    table = tuned_configs.load_table("fp8", "Fake GPU", directory=tmp_path)
    assert table == {"N=8,K=16": {"2": {"x": 1}, "16": {"x": 2}}}
    path.write_text(json.dumps({"changed": {}}))                         # behind the cache's back
    assert tuned_configs.read_table(path) is table
    tuned_configs.write_table(path, {"1": {"y": 1}, "10": {"y": 2}, "9": {"y": 3}})    # flat {M: entry} (moe)
    assert list(tuned_configs.read_table(path)) == ["1", "9", "10"]


def test_fp8_tuned_entries_are_checked_and_picked(tmp_path, monkeypatch):
    good = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, num_warps=8, num_stages=3)
    table = {fp8_triton.shape_key(4096, 4096): {"4": good, "16": {**good, "BLOCK_N": 24}},     # 24: not a tile
             fp8_triton.shape_key(64, 512): {"16": {**good, "extra": 1}}}
    fp8_triton.config_file("Fake GPU", tmp_path).write_text(json.dumps(table))
    lookup = lambda m, n=4096, k=4096: fp8_triton.tuned_config(m, n, k, "Fake GPU", tmp_path)  # noqa: E731
    assert lookup(1) == good and lookup(4) == good
    assert lookup(5) is None and lookup(17) is None and lookup(1, k=8192) is None
    assert lookup(1, n=64, k=512) is None
    # pick_small_m_config: the table of this device's name, else the heuristics
    monkeypatch.setattr(tuned_configs, "config_dir", lambda family: tmp_path)
    monkeypatch.setattr(tuned_configs, "device_name", lambda device: "Fake GPU")
    fp8_triton._small_m.cache_clear()
    try:
        assert fp8_triton.pick_small_m_config(2, 4096, 4096, CPU) == good
        assert fp8_triton.pick_small_m_config(8, 4096, 4096, CPU) == fp8_triton.small_m_config(8, 4096, 4096, 132)
        fp8_triton.pick_small_m_config(2, 4096, 4096, CPU)["BLOCK_N"] = 64          # a caller's copy
        assert fp8_triton.pick_small_m_config(2, 4096, 4096, CPU) == good
    finally:
        fp8_triton._small_m.cache_clear()
