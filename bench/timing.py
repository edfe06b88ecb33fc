"""One timer for the kernel tuners and sweeps: seconds per call of a function.

On a GPU it is `triton.testing.do_bench`'s median (L2 flushed between calls, warm-up first); under
the Triton interpreter (CPU, the tests) one wall-clock call after a first one: a check that a
sweep runs, never a measurement."""
from __future__ import annotations

import time
from typing import Callable

import torch


def kernel_timer(device: torch.device, warmup_ms: int = 10, rep_ms: int = 40) -> Callable[[Callable[[], object]], float]:
    """Seconds per call of `fn` on `device`."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e-3

    def wall(fn: Callable[[], object]) -> float:
        fn()                                   # the interpreter's first call pays for parsing the kernel
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return wall
