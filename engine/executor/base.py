"""The executor interface: how the engine core reaches the model, whatever runs it.

`uniproc` calls one in-process ModelRunner; `multiproc` drives one worker process per TP rank;
a Ray executor (cluster) drives Ray actors. The engine core only ever calls these methods.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

from ..config import EngineConfig
from ..spec_decode.step_costs import StepCosts
from ..step import GrammarOutput, ModelRunnerOutput, SchedulerOutput, StepHandle


class ExecutorError(RuntimeError):
    """A worker died, hung or raised: the engine must stop."""


class Executor(ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV blocks every rank can hold (the minimum over ranks)."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int) -> Optional[StepCosts]:
        """Allocates the KV cache and captures the graphs on every rank; returns the speculation step
        costs rank 0 measured (spec_decode/step_costs.py), or None."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> Optional[StepHandle]:
        """Launches the step and returns before its sampled tokens reach the host (where the
        executor can: the engine core then schedules the next step meanwhile). Default: run it.

        A step with `structured_request_ids` runs its forward pass only and returns None: its
        sampling waits for `sample_tokens` with the bitmask."""
        if scheduler_output.structured_request_ids:
            raise NotImplementedError(f"{type(self).__name__} cannot sample with a grammar")
        return StepHandle.done(self.execute_model(scheduler_output))

    def sample_tokens(self, grammar_output: GrammarOutput, defer: bool) -> StepHandle:
        """Samples the step launched last (one with `structured_request_ids`) under the bitmask.
        defer: as for a launched step, the driver may answer with the next step."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample with a grammar")

    def check_health(self) -> None:
        """Raises ExecutorError when a worker is gone."""

    def shutdown(self) -> None: ...


class WorkerGroupExecutor(Executor):
    """An executor that drives one `Worker` per TP rank through `_collective_rpc`, whatever the
    transport (processes and pipes, Ray actors). Every rank runs every call, in the same order
    (the model's collectives pair up call by call); rank 0's reply carries the sampled tokens."""

    startup_timeout_s = 1800.0          # weights + profiling + graph capture, on the slowest rank

    @abstractmethod
    def _collective_rpc(self, method: str, *args: Any, timeout_s: float) -> list[Any]:
        """Calls `Worker.<method>(*args)` on every rank; returns the replies in rank order."""

    def determine_num_blocks(self) -> int:
        # Every rank holds the same block ids, so the smallest rank decides.
        return min(self._collective_rpc("determine_num_blocks", timeout_s=self.startup_timeout_s))

    def initialize_cache(self, num_blocks: int) -> Optional[StepCosts]:
        return self._collective_rpc("initialize_cache", num_blocks, timeout_s=self.startup_timeout_s)[0]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        replies = self._collective_rpc("execute_model", scheduler_output,
                                       timeout_s=self.config.parallel.step_timeout_s)
        assert isinstance(replies[0], ModelRunnerOutput), "rank 0 is the driver and must sample"
        return replies[0]
