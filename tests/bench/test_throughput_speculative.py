"""bench.throughput with --speculative-config: the warm-up verifies drafts (its kernels' shapes run
before the clock), the baseline of --compare-baseline does not speculate. The default model: a real
model continues a repeated block, so prompt lookup finds drafts (a random-weight one rarely does)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))                                  # the repo root, for `import bench`

from bench import throughput  # noqa: E402
from bench.workloads import BenchRequest, make_s64  # noqa: E402


def test_the_warm_up_verifies_drafts_before_the_timed_run(monkeypatch):
    requests = [BenchRequest(r.prompt_token_ids[:24], 6) for r in make_s64(49152, 2)]
    monkeypatch.setattr(throughput, "make_workload", lambda *args, **kwargs: requests)
    report = throughput.main(["--model", "default", "--workload", "s64", "--device", "cpu",
                              "--warmup-requests", "2", "--ceilings", "off", "--compare-baseline",
                              "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    baseline, speculative = report["results"]
    assert speculative["label"].endswith("speculative") and "speculative" not in baseline["label"]
    assert speculative["stats"]["warmup_spec_draft_tokens"] > 0
    assert "warmup_spec_draft_tokens" not in baseline["stats"]
    assert speculative["output_tokens"] == baseline["output_tokens"] == 12
