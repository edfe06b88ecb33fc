"""The executor interface: how the engine core reaches the model, whatever runs it.

`uniproc` calls one in-process ModelRunner; `multiproc` drives one worker process per TP rank;
a Ray executor (cluster) drives Ray actors. The engine core only ever calls these methods.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional

from ..config import EngineConfig
from ..scheduler_output import ModelRunnerOutput, SchedulerOutput


class StepHandle:
    """A launched step whose output may not be on the host yet; `result()` waits for it (once)."""

    def __init__(self, resolve: Callable[[], ModelRunnerOutput]) -> None:
        self._resolve: Optional[Callable[[], ModelRunnerOutput]] = resolve
        self._output: Optional[ModelRunnerOutput] = None

    @classmethod
    def done(cls, output: ModelRunnerOutput) -> "StepHandle":
        handle = cls(lambda: output)
        handle.result()
        return handle

    def result(self) -> ModelRunnerOutput:
        if self._resolve is not None:
            self._output, self._resolve = self._resolve(), None
        assert self._output is not None
        return self._output


class ExecutorError(RuntimeError):
    """A worker died, hung or raised: the engine must stop."""


class Executor(ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV blocks every rank can hold (the minimum over ranks)."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Launches the step and returns before its sampled tokens reach the host (where the
        executor can: the engine core then schedules the next step meanwhile). Default: run it."""
        return StepHandle.done(self.execute_model(scheduler_output))

    def check_health(self) -> None:
        """Raises ExecutorError when a worker is gone."""

    def shutdown(self) -> None: ...


def executor_class_for(config: EngineConfig) -> type[Executor]:
    backend = config.parallel.executor_backend
    if backend == "uni":
        from .uniproc import UniprocExecutor

        return UniprocExecutor
    if backend == "mp":
        from .multiproc import MultiprocExecutor

        return MultiprocExecutor
    raise ValueError(f"executor backend {backend!r} needs its own executor class (e.g. pagoda.cluster's Ray executor)")
