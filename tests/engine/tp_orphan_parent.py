"""Helper process for test_tensor_parallel: an engine process that the test SIGKILLs.

Starts a TP=2 `LLM` on the checkpoint given as argv[1], prints `PIDS <rank 0> <rank 1>` and
generates until killed, so the kill lands while the workers are busy.
"""
from __future__ import annotations

import sys

from pagoda.engine import LLM, SamplingParams

if __name__ == "__main__":       # spawned workers import this file as __mp_main__: keep the guard
    llm = LLM(model=sys.argv[1], tensor_parallel_size=2, kv_cache_memory_bytes=1 << 22)
    print("PIDS", *llm.engine.core.executor.worker_pids, flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    while True:
        llm.generate(["Once upon a time"] * 4, params, use_tqdm=False)
