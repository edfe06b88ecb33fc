"""bench/sweep_decode.py: its arguments, and one run of its sweep on tiny shapes in the Triton
interpreter (a subprocess: the interpreter is chosen when Triton kernels are imported), for a bf16 and
an FP8 cache: every variant goes through the shipped wrapper and agrees with the shipped launch."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))                                  # the repo root, for `import bench`

from bench import sweep_decode  # noqa: E402
from interpreted import run_main  # noqa: E402


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_sweep_runs_every_variant_through_the_wrapper(kv_cache_dtype):
    results, _, stderr = run_main("bench.sweep_decode", ["--shapes", "2x40,1x100", "--kv-cache-dtype", kv_cache_dtype])
    assert "failed" not in stderr, stderr[-2000:]
    assert [(r["batch"], r["context"], r["kv_cache_dtype"]) for r in results] == [
        (2, 40, kv_cache_dtype), (1, 100, kv_cache_dtype)]
    for result in results:
        # the tiny space: 2 tile widths x (splits 1, 2 and the default count)
        assert len(result["variants"]) >= 4
        assert {v["launch"]["block_n"] for v in result["variants"]} == {16, 32}
        # a split or a tile width changes the summation order only
        assert max(v["max_diff"] for v in result["variants"]) < 2e-2
        assert all(v["us"] > 0 for v in result["variants"])


def test_bad_shapes_are_named(capsys):
    for bad in ("256by1024", "0x10", "4x"):
        with pytest.raises(SystemExit):
            sweep_decode.parse_args(["--shapes", bad])
        assert "--shapes" in capsys.readouterr().err
