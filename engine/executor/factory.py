"""The executor class for a config's backend.

Apart from base.py so that the interface never imports its own implementations.
"""
from __future__ import annotations

from ..config import EngineConfig
from .base import Executor


def executor_class_for(config: EngineConfig) -> type[Executor]:
    backend = config.parallel.executor_backend
    if backend == "uni":
        from .uniproc import UniprocExecutor

        return UniprocExecutor
    if backend == "mp":
        from .multiproc import MultiprocExecutor

        return MultiprocExecutor
    raise ValueError(f"executor backend {backend!r} needs its own executor class (e.g. pagoda.cluster's Ray executor)")
