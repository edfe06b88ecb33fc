"""bench/tune_moe.py: its arguments, its search space, and one run of its search loop for a tiny
shape in the Triton interpreter (a subprocess: the interpreter is chosen when Triton kernels are
imported), whose JSON is then what `get_config` returns."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))                                  # the repo root, for `import bench`

from bench import tune_moe  # noqa: E402


def test_parse_args_and_rejects_bad_values():
    args = tune_moe.parse_args(["--tokens", "16,1,16", "--block-m", "64,16"])
    assert args.tokens == [1, 16] and args.block_m == [16, 64] and args.experts == 128
    for bad in (["--tokens", "0"], ["--block-m", "24"], ["--top-k", "200"], ["--tokens", "a"]):
        with pytest.raises(SystemExit):
            tune_moe.parse_args(bad)


def test_search_space_respects_shared_memory_and_row_tiles():
    tiles = list(tune_moe.tiles(128, "full", 768, 2048, True, 2))
    assert tiles and all((128 * t.block_k + 2 * t.block_k * t.block_n) * 2 * t.num_stages
                         <= tune_moe.SHARED_MEMORY_BYTES for t in tiles)
    assert len(tiles) < len(list(tune_moe.tiles(128, "full", 768, 2048, False, 2)))   # two accumulators: fewer fit
    assert tune_moe.block_m_candidates(8, 128, [16, 32, 64, 128]) == [16]                # decode: 16-row tiles only
    assert tune_moe.block_m_candidates(16384, 128, [16, 32, 64, 128]) == [16, 32, 64, 128]


def test_search_loop_writes_what_get_config_reads(tmp_path, monkeypatch):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "bench.tune_moe", "--experts", "4", "--n", "32", "--hidden", "48",
               "--top-k", "2", "--tokens", "1,40", "--space", "tiny", "--block-m", "16,32",
               "--output-dir", str(tmp_path), "--device-name", "Test GPU"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp_path / "E=4,N=32,H=48,device=Test_GPU.json"
    table = json.loads(path.read_text())
    assert sorted(table, key=int) == ["2", "80"]                  # M = T * top_k
    assert table["2"]["block_m"] == 16

    from pagoda.kernels import moe_triton

    monkeypatch.setattr(moe_triton, "device_name", lambda device: "Test GPU")
    config = moe_triton.get_config(4, 32, 48, 80, torch.device("cpu"), tmp_path)
    assert config == moe_triton.MoeConfig.from_json(table["80"])
