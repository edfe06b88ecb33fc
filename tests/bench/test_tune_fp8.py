"""bench/tune_fp8.py: its arguments, and one run of its sweep on a tiny shape in the Triton
interpreter (a subprocess: the interpreter is chosen when Triton kernels are imported), which checks
every tile's result against the reference and writes a table the kernel's lookup reads back."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))                                  # the repo root, for `import bench`

from bench import tune_fp8  # noqa: E402
from interpreted import run_main  # noqa: E402


def test_sweep_runs_on_a_tiny_shape_and_writes_a_table_the_kernel_reads(tmp_path):
    (tmp_path / "cpu.json").write_text(json.dumps({"N=8,K=16": {"4": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16,
                                                                      "SPLIT_K": 1, "num_warps": 4,
                                                                      "num_stages": 1}}}))
    results, stdout, _ = run_main("bench.tune_fp8", ["--shapes", "48x96", "--m", "1,3", "--top", "1",
                                                     "--output-dir", str(tmp_path)], timeout_s=300)
    assert [(r["n"], r["k"], r["m"]) for r in results] == [(48, 96, 1), (48, 96, 3)]
    assert all(r["best_us"] > 0 and r["best"]["SPLIT_K"] in (1, 2) for r in results)
    assert "48x96 M=1: small_m_config" in stdout

    from pagoda.kernels import fp8_triton

    table = json.loads((tmp_path / "cpu.json").read_text())
    assert set(table) == {"N=8,K=16", fp8_triton.shape_key(48, 96)}          # an earlier shape is kept
    assert set(table[fp8_triton.shape_key(48, 96)]) == {"1", "3"}
    for m, result in ((1, results[0]), (2, results[1]), (3, results[1])):      # the smallest tuned M at or above
        assert fp8_triton.tuned_config(m, 48, 96, "cpu", tmp_path) == result["best"]
    assert fp8_triton.tuned_config(4, 48, 96, "cpu", tmp_path) is None


def test_bad_arguments_are_named():
    for bad in (["--shapes", "48by96"], ["--m", "17"], ["--shapes", "0x4"]):
        with pytest.raises(SystemExit):
            tune_fp8.parse_args(bad)
