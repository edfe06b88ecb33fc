"""One tensor-parallel rank, whatever transport drives it.

A `Worker` holds one rank's share of the model: it joins the TP group, builds the `ModelRunner`
(rank 0 is the driver, the only rank that samples), sizes and allocates its shard of the paged KV
cache (its own KV heads) and runs steps. It knows nothing of pipes, processes or actors: the
multiproc executor calls these methods from a spawned process, and a Ray executor can wrap the same
class as an actor (`ray.remote(Worker)`) and call them remotely.

Call order: `init_device` -> `load_model` -> `determine_num_blocks` -> `initialize_cache(min over
ranks)` -> `execute_model` (or `step`, with deferred replies, and `sample` on rank 0 for a step with a grammar)
per step -> `shutdown`. Every rank
must receive every step, in the same order: the model's collectives pair up across ranks call by call.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from ..config import EngineConfig
from ..distributed.parallel_state import destroy_tensor_parallel, enable_fast_all_reduce, init_tensor_parallel
from ..spec_decode.step_costs import StepCosts
from ..step import GrammarOutput, ModelRunnerOutput, SchedulerOutput, StepHandle
from ..utils.gc_freeze import freeze_startup_heap, thaw_heap
from .model_runner import ModelRunner


class Worker:
    def __init__(self, config: EngineConfig, rank: int, distributed_init_method: str,
                 local_rank: Optional[int] = None) -> None:
        """local_rank: the CUDA device index on this host (defaults to rank; a Ray actor that sees
        only its own GPU passes 0)."""
        self.rank = rank
        self.world_size = config.parallel.tensor_parallel_size
        self.distributed_init_method = distributed_init_method
        device = config.device
        if device.type == "cuda":
            device = torch.device("cuda", rank if local_rank is None else local_rank)
        # NOTE: a copy, so the caller's config (shared by the engine in-process) keeps its device.
        self.config = dataclasses.replace(config, device=device)
        self.runner: Optional[ModelRunner] = None
        self._deferred: list[StepHandle] = []      # rank 0's launched steps whose replies wait (`step`)

    def init_device(self) -> None:
        """Joins the TP group (gloo on CPU, NCCL on CUDA) and sets this process's CPU threads."""
        if self.config.device.type == "cpu" and self.world_size > 1:
            # Every rank computes at once: split the cores between them instead of oversubscribing.
            num_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, num_cores // self.world_size))
        init_tensor_parallel(self.rank, self.world_size, self.distributed_init_method, self.config.device,
                             timeout_s=self.config.parallel.step_timeout_s)
        if self.config.device.type == "cuda" and self.world_size > 1:
            # decode-sized activations (up to 512 tokens) go through the symmetric-memory all-reduce
            hidden = self.config.model.hf_config.hidden_size
            max_bytes = min(self.config.scheduler.max_num_seqs, 512) * hidden * self.config.model.dtype.itemsize
            enable_fast_all_reduce(self.config.model.dtype, max_bytes)

    def load_model(self) -> None:
        """Builds this rank's model; each rank reads only its slice of every weight."""
        self.runner = ModelRunner(self.config, is_driver=self.rank == 0)

    def determine_num_blocks(self) -> int:
        assert self.runner is not None, "load_model first"
        return self.runner.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> Optional[StepCosts]:
        """Allocates the KV cache and captures the graphs; the measured speculation step costs, if any."""
        assert self.runner is not None, "load_model first"
        self.runner.allocate_kv_cache(num_blocks)
        costs = self.runner.capture_cuda_graphs()
        freeze_startup_heap()          # a rank's GC pause would stall every rank at the next collective
        return costs

    def execute_model(self, scheduler_output: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        """One step; rank 0 returns the sampled tokens, the other ranks None."""
        assert self.runner is not None, "load_model first"
        return self.runner.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> Optional[StepHandle]:
        """Launches one step; rank 0's handle resolves to the sampled tokens (other ranks: None).
        Steps must be resolved in order; a later step may be launched before an earlier resolves."""
        assert self.runner is not None, "load_model first"
        return self.runner.execute_model_async(scheduler_output)

    def step(self, scheduler_output: SchedulerOutput, defer: bool) -> list[ModelRunnerOutput]:
        """Launches one step and answers the steps whose replies are due, in step order (rank 0;
        other ranks answer []). A deferred step is answered with the next step, once that one is
        launched: the device is busy with it while the reply travels and the engine schedules."""
        handle = self.execute_model_async(scheduler_output)          # None on ranks > 0
        replies = [deferred.result() for deferred in self._deferred]
        self._deferred.clear()
        if handle is not None:
            if defer:
                self._deferred.append(handle)
            else:
                replies.append(handle.result())
        return replies

    def sample(self, grammar_output: GrammarOutput, defer: bool) -> list[ModelRunnerOutput]:
        """Rank 0 only: samples the step launched last (its sampling waited for this bitmask) and
        answers it now or, deferred, with the next step."""
        assert self.runner is not None and self.rank == 0, "only the driver rank samples"
        handle = self.runner.sample_tokens(grammar_output)
        if defer:
            self._deferred.append(handle)
            return []
        return [handle.result()]

    def shutdown(self) -> None:
        self.runner = None
        destroy_tensor_parallel()
        thaw_heap()
