"""The engine core: add_request / step / abort over token ids.

    step() = schedule -> execute (forward + sample) -> update (append tokens, finish requests)

No text here: tokenization and detokenization live in the input and output processors so that the
core can run on its own thread or process, free of the callers' work.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from ..config import EngineConfig
from ..executor.base import Executor
from ..executor.factory import executor_class_for
from ..outputs import EngineCoreOutput, EngineStats
from ..step import SchedulerOutput, StepHandle
from ..utils.gc_freeze import freeze_startup_heap, thaw_heap
from .request import Request, RequestStatus
from .scheduler import Scheduler

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, executor_class: Optional[type[Executor]] = None) -> None:
        self.config = config
        self.executor = (executor_class or executor_class_for(config))(config)
        num_blocks = self.executor.determine_num_blocks()
        config.finalize_capacity(num_blocks)
        self.executor.initialize_cache(num_blocks)
        self.scheduler = Scheduler(config.scheduler, config.cache)
        self.num_steps = 0
        # only an executor that really returns before the step ends can overlap (and feed the
        # placeholders of the next step on its device); others run synchronously
        self.async_scheduling = (config.scheduler.async_scheduling
                                 and type(self.executor).execute_model_async is not Executor.execute_model_async)
        self._in_flight: Optional[tuple[SchedulerOutput, StepHandle]] = None
        self._prefix_summary_cache: list[int] = []
        self._prefix_summary_time = float("-inf")
        logger.info("KV cache: %d blocks of %d tokens; max_model_len %d", num_blocks,
                    config.cache.block_size, config.model.max_model_len)
        freeze_startup_heap()          # no full GC pass over start-up objects between steps

    def add_request(self, request: Request) -> None:
        if request.request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request.request_id!r} is already running")
        self.scheduler.add_request(request)

    def add_requests(self, requests: list[Request]) -> None:
        """Adds the core requests of one client request (n > 1: several), all or none: on
        ValueError (e.g. an id still live in the core) those added are aborted and it re-raises."""
        added: list[str] = []
        try:
            for request in requests:
                self.add_request(request)
                added.append(request.request_id)
        except ValueError:
            self.abort_requests(added)
            raise

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        aborted = self.scheduler.abort_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        return [EngineCoreOutput(r.request_id, [], finish_reason="abort") for r in aborted]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def step(self) -> list[EngineCoreOutput]:
        """schedule -> execute -> update. With async scheduling the update is of the previous step:

            host:   schedule N+1 | launch N+1 | wait N, update N | schedule N+2 | ...
            device:        ... step N ...     |        step N+1        |
        """
        scheduler_output = self.scheduler.schedule()
        self.num_steps += 1
        if not self.async_scheduling:
            runner_output = self.executor.execute_model(scheduler_output)
            return self.scheduler.update_from_output(scheduler_output, runner_output)
        handle = self.executor.execute_model_async(scheduler_output)
        outputs: list[EngineCoreOutput] = []
        if self._in_flight is not None:
            previous_output, previous_handle = self._in_flight
            outputs = self.scheduler.update_from_output(previous_output, previous_handle.result())
        if scheduler_output.is_empty:
            self._in_flight = None
            outputs += self.scheduler.update_from_output(scheduler_output, handle.result())
        else:
            self._in_flight = (scheduler_output, handle)
        return outputs

    def get_stats(self) -> EngineStats:
        kv = self.scheduler.kv
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=kv.usage,
            num_blocks=kv.pool.num_blocks,
            num_free_blocks=kv.num_free_blocks,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.scheduler.num_prompt_tokens,
            generation_tokens=self.scheduler.num_generation_tokens,
            num_steps=self.num_steps,
            cached_prefix_hashes=self._prefix_summary(),
        )

    def _prefix_summary(self) -> list[int]:
        # NOTE: get_stats runs after every step of the server loop; the summary (a scan of up to
        # thousands of hashes) is a routing hint, so it is refreshed at most once a second.
        now = time.monotonic()
        if now - self._prefix_summary_time >= 1.0:
            self._prefix_summary_cache = self.scheduler.kv.cached_prefix_hashes()
            self._prefix_summary_time = now
        return self._prefix_summary_cache

    def check_health(self) -> None:
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()
        thaw_heap()
