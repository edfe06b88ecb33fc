"""bench/tune_weight_only.py: its arguments, the sweep it builds (no timing), and one dry run in the
Triton interpreter (a subprocess) whose JSON the kernel's lookup reads back."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))                                  # the repo root, for `import bench`

from bench import tune_weight_only  # noqa: E402
from interpreted import run_main  # noqa: E402


def test_sweep_covers_the_sms_and_fits_the_groups():
    from pagoda.kernels.weight_only_triton import _fit_block_k

    for m in (1, 2, 4, 8, 16):
        configs = tune_weight_only.candidates(m, 4096, 4096, 4, 128, "full", 132)
        assert configs
        for c in configs:
            assert (4096 // c.block_n) * c.split_k >= 132                 # at least one program per SM
            assert _fit_block_k(c.block_k, 128, 4096) == c.block_k
            assert c.gemv == (c.block_m < 16) and (not c.gemv or c.block_m >= m)
        assert any(c.gemv for c in configs) == (m <= 8)
        assert any(not c.gemv for c in configs) == (m >= 2)
    # a shape too small to fill the GPU keeps the configs with the most programs, never none
    tiny = tune_weight_only.candidates(1, 48, 96, 4, 32, "tiny", 132)
    assert tiny and all(c.split_k == 2 for c in tiny)


def test_whole_default_sweep_is_bounded():
    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    configs = [c for n, k in shapes for m in (1, 2, 4, 8, 16)
               for c in tune_weight_only.candidates(m, n, k, 4, 128, "full", 132)]
    compiled = {(c.block_m, c.block_n, c.block_k, c.split_k > 1, c.num_warps, c.num_stages) for c in configs}
    assert len(configs) < 1000 and len(compiled) < 120                  # a few minutes on one H100


@pytest.mark.parametrize("bits", [4, 6])
def test_dry_run_writes_a_table_the_kernel_reads(tmp_path, bits):
    results, _, _ = run_main("bench.tune_weight_only", ["--shapes", "48x96", "--m", "1,3", "--group-size", "32",
                                                        "--bits", str(bits), "--space", "tiny",
                                                        "--output-dir", str(tmp_path)], timeout_s=300)
    assert [(r["n"], r["k"], r["m"]) for r in results] == [(48, 96, 1), (48, 96, 3)]
    from pagoda.kernels import weight_only_triton as wt

    table = json.loads((tmp_path / "cpu.json").read_text())
    assert set(table[wt.shape_key(48, 96, bits, 32)]) == {"1", "3"}
    assert wt.tuned_config(1, 48, 96, bits, 32, "cpu", tmp_path) == wt.GemmConfig(**results[0]["best"])


def test_bad_arguments_are_named():
    for bad in (["--shapes", "48by96"], ["--m", "65"], ["--shapes", "0x4"], ["--shapes", "64x100"]):
        with pytest.raises(SystemExit):
            tune_weight_only.parse_args(bad)
