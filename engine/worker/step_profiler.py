"""torch.profiler over a window of a rank's steps: where the step time goes, kernel by kernel.

    PAGODA_TORCH_PROFILER_DIR=/tmp/prof PAGODA_TORCH_PROFILER_STEPS=300,10 python -m bench.throughput ...

Off unless `PAGODA_TORCH_PROFILER_DIR` is set. Every model runner (each TP rank) counts the steps it
launches; from step `first` (0-based) it records `count` steps, then writes
`rank{r}.trace.json.gz` (a Chrome/Perfetto trace; kernels replayed from CUDA graphs included) and
`rank{r}.summary.txt` (device time by kernel, and the device's busy share of the window) into the
directory. The window starts and ends at a device synchronisation, so it slows those two steps only.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

DIR_ENV = "PAGODA_TORCH_PROFILER_DIR"
STEPS_ENV = "PAGODA_TORCH_PROFILER_STEPS"
DEFAULT_STEPS = (100, 10)


def parse_steps(text: str) -> tuple[int, int]:
    """'first,count' -> (first, count); first >= 0, count >= 1."""
    parts = text.split(",")
    try:
        first, count = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{STEPS_ENV} must be 'first,count' (two integers), got {text!r}") from None
    if first < 0 or count < 1:
        raise ValueError(f"{STEPS_ENV} needs first >= 0 and count >= 1, got {text!r}")
    return first, count


class StepProfiler:
    def __init__(self, directory: Path, first: int, count: int, rank: int, device: torch.device) -> None:
        self.directory = directory
        self.first, self.count = first, count
        self.rank = rank
        self.device = device
        self.steps = 0
        self._profile: Optional[torch.profiler.profile] = None
        self._started_at = 0.0
        self.done = False

    @classmethod
    def from_env(cls, rank: int, device: torch.device) -> Optional["StepProfiler"]:
        directory = os.environ.get(DIR_ENV)
        if not directory:
            return None
        first, count = parse_steps(os.environ.get(STEPS_ENV, f"{DEFAULT_STEPS[0]},{DEFAULT_STEPS[1]}"))
        Path(directory).mkdir(parents=True, exist_ok=True)
        return cls(Path(directory), first, count, rank, device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_step(self) -> None:
        """Called as each step is launched (every rank launches the same steps)."""
        if self.done:
            return
        if self.steps == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._sync()
            self._profile = torch.profiler.profile(activities=activities)
            self._profile.start()
            self._started_at = time.perf_counter()
        elif self.steps == self.first + self.count:
            self.stop()
        self.steps += 1

    def stop(self) -> None:
        """Ends the window early (e.g. the run finished inside it) and writes the files."""
        if self._profile is None or self.done:
            return
        self._sync()
        span_s = time.perf_counter() - self._started_at
        self._profile.stop()
        self.done = True
        recorded = min(self.steps, self.first + self.count) - self.first
        self._profile.export_chrome_trace(str(self.directory / f"rank{self.rank}.trace.json.gz"))   # gzipped by torch
        averages = self._profile.key_averages()
        device_us = sum(getattr(e, "self_device_time_total", 0.0) for e in averages)
        head = (f"rank {self.rank}: steps {self.first}..{self.first + recorded - 1} ({recorded}), "
                f"span {span_s * 1e3:.2f} ms, {span_s * 1e3 / max(recorded, 1):.3f} ms/step")
        if self.device.type == "cuda":
            head += f", device busy {device_us / 1e3:.2f} ms ({100 * device_us / 1e6 / span_s:.1f}%)"
        lines = [head, ""]
        sort_by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        lines.append(averages.table(sort_by=sort_by, row_limit=40, max_name_column_width=90))
        (self.directory / f"rank{self.rank}.summary.txt").write_text("\n".join(lines))
        logger.info("profiled %d steps of rank %d into %s", recorded, self.rank, self.directory)
        self._profile = None
