"""One process, one model runner."""
from __future__ import annotations

from typing import Optional

from ..config import EngineConfig
from ..spec_decode.step_costs import StepCosts
from ..step import GrammarOutput, ModelRunnerOutput, SchedulerOutput, StepHandle
from ..worker.model_runner import ModelRunner
from .base import Executor


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.runner = ModelRunner(config)

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> Optional[StepCosts]:
        self.runner.allocate_kv_cache(num_blocks)
        return self.runner.capture_cuda_graphs()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        output = self.runner.execute_model(scheduler_output)
        assert output is not None
        return output

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> Optional[StepHandle]:
        return self.runner.execute_model_async(scheduler_output)

    def sample_tokens(self, grammar_output: GrammarOutput, defer: bool) -> StepHandle:
        return self.runner.sample_tokens(grammar_output)
