"""Keeps Python's garbage collector off the step loop's critical path.

A serving process holds hundreds of thousands of objects from start-up (torch, transformers, the
model's modules) that live as long as it does. A full (oldest-generation) collection walks all of
them: ~150 ms on a 2-core CI machine, tens of milliseconds on a GPU host, during which no step is
launched; under tensor parallelism one rank's pause stalls every rank at its next collective. Once
start-up is done, `freeze_startup_heap` collects once and moves every surviving object into the
permanent generation, which collections skip (`gc.freeze`); objects made while serving are still
collected as usual. `thaw_heap` (engine shutdown, and interpreter exit) hands them back, so
whatever became garbage since, e.g. a shut-down engine's model, is freed normally.
"""
from __future__ import annotations

import atexit
import gc

_exit_hook_registered = False


def freeze_startup_heap() -> None:
    """Collects, then exempts every live object from later collections (call after start-up)."""
    global _exit_hook_registered
    gc.collect()
    gc.freeze()
    if not _exit_hook_registered:
        # NOTE: so that finalisation at exit still sees (and tears down) the frozen objects
        atexit.register(gc.unfreeze)
        _exit_hook_registered = True


def thaw_heap() -> None:
    """Returns frozen objects to the collector (they are collected once unreachable)."""
    gc.unfreeze()
