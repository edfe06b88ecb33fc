"""bench/cluster_bench.py (the Ray Serve GPU benchmark) end to end on CPU: one small layout joining the
test's Ray cluster, through the HTTP ingress."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cluster_bench import parse_layout

ROOT = Path(__file__).resolve().parents[2]


def test_layouts_parse():
    assert parse_layout("2xtp1") == (2, 1, None) and parse_layout("1xtp2") == (1, 2, None)
    assert parse_layout("1xtp1:mp") == (1, 1, "mp")
    for bad in ("2x", "tp2", "0xtp1", "standalone", "1xtp1:threads"):
        with pytest.raises(ValueError, match="NxtpK"):
            parse_layout(bad)


@pytest.mark.timeout(420)
def test_cluster_bench_smoke(ray_cluster, tmp_path):
    # Both replicas run their engine core in its own process (the GPU default): one with its model in
    # a worker process under it (':mp'), one driving two Ray worker actors from it (the core process
    # joins the cluster as a driver of its own). The client sends from two processes.
    out = tmp_path / "cluster.json"
    command = [sys.executable, "-m", "bench.cluster_bench", "--address", ray_cluster["address"],
               "--port", str(ray_cluster["port"]), "--device", "cpu", "--model", "tiny-random", "--layouts", "1xtp1:mp", "1xtp2",
               "--client-processes", "2", "--workload", "s64", "--vocab-size", "16384", "--num-prompts", "4", "--warmup-requests", "1",
               "--engine-arg", "kv_cache_memory_bytes=16777216", "--engine-arg", "engine_core_process=true",
               "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["layout"] for row in rows] == ["1xtp1:mp", "1xtp2"]
    for row in rows:
        assert row["result"]["completed"] == 4 and row["result"]["failed"] == 0
        assert sum(row["generation_tokens_per_replica"].values()) >= row["result"]["output_tokens"]
    assert "out tok/s" in result.stdout
