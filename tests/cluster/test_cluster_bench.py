"""bench/cluster_bench.py (the lead's GPU run of issue 6) end to end on CPU: one small layout joining the
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


@pytest.mark.timeout(300)
def test_cluster_bench_smoke(ray_cluster, tmp_path):
    # the replica runs its model in a worker process (':mp'); the client sends from two processes
    out = tmp_path / "cluster.json"
    command = [sys.executable, "-m", "bench.cluster_bench", "--address", ray_cluster["address"],
               "--port", str(ray_cluster["port"]), "--device", "cpu", "--model", "tiny-random", "--layouts", "1xtp1:mp",
               "--client-processes", "2", "--workload", "s64", "--vocab-size", "16384", "--num-prompts", "4", "--warmup-requests", "1",
               "--engine-arg", "kv_cache_memory_bytes=16777216", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [row] = json.loads(out.read_text())["rows"]
    assert row["layout"] == "1xtp1:mp" and row["result"]["completed"] == 4 and row["result"]["failed"] == 0
    assert sum(row["generation_tokens_per_replica"].values()) >= row["result"]["output_tokens"]
    assert "out tok/s" in result.stdout
