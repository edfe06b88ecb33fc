"""The opt-in step profiler (PAGODA_TORCH_PROFILER_DIR): its window and its files."""
from __future__ import annotations

import gzip
import json

import pytest
import torch

from pagoda.engine.worker.step_profiler import StepProfiler, parse_steps


def test_parse_steps_names_the_bad_value():
    assert parse_steps("3,2") == (3, 2)
    for bad in ("3", "a,b", "-1,2", "3,0", "1,2,3"):
        with pytest.raises(ValueError, match="PAGODA_TORCH_PROFILER_STEPS"):
            parse_steps(bad)


def test_from_env_is_off_without_a_directory(monkeypatch):
    monkeypatch.delenv("PAGODA_TORCH_PROFILER_DIR", raising=False)
    assert StepProfiler.from_env(0, torch.device("cpu")) is None


def test_window_records_only_its_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGODA_TORCH_PROFILER_DIR", str(tmp_path))
    monkeypatch.setenv("PAGODA_TORCH_PROFILER_STEPS", "2,3")
    profiler = StepProfiler.from_env(1, torch.device("cpu"))
    x = torch.ones(8, 8)
    marks = []
    for step in range(8):
        profiler.before_step()
        with torch.profiler.record_function(f"step{step}"):
            x = x @ x / 8
        marks.append(step)
    assert profiler.done
    with gzip.open(tmp_path / "rank1.trace.json.gz", "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"step2", "step3", "step4"} <= names
    assert not names & {"step0", "step1", "step5", "step6"}
    summary = (tmp_path / "rank1.summary.txt").read_text()
    assert summary.startswith("rank 1: steps 2..4 (3)") and "aten::mm" in summary


def test_an_engine_run_writes_the_window(tiny_checkpoint, tmp_path, monkeypatch):
    from pagoda.engine import LLM, SamplingParams

    monkeypatch.setenv("PAGODA_TORCH_PROFILER_DIR", str(tmp_path / "prof"))
    monkeypatch.setenv("PAGODA_TORCH_PROFILER_STEPS", "1,2")
    llm = LLM(model=str(tiny_checkpoint()), enforce_eager=True)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=6, ignore_eos=True, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 6
    summary = (tmp_path / "prof" / "rank0.summary.txt").read_text()
    assert summary.startswith("rank 0: steps 1..2 (2)")
    assert (tmp_path / "prof" / "rank0.trace.json.gz").stat().st_size > 0
