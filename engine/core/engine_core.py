"""The engine core: add_request / step / abort over token ids, and the one loop that serves them.

    step() = schedule -> execute (forward + sample) -> update (append tokens, finish requests)
    run_loop(inbox, emit) = apply the commands that arrived -> step() -> emit StepDone, until Shutdown

No text here: tokenization and detokenization live in the input and output processors so that the
core can run on its own thread or process, free of the callers' work. The offline `LLMEngine` calls
add_request / step / abort directly; the servers send typed commands (commands.py) to `run_loop`
through a transport: on a thread (core_thread.py) or in a process of its own (core_process.py).

Speculative decoding (`config.speculative`, engine/spec_decode): before a step may speculate, the
n-gram proposer needs every request's latest token on the host. So under async scheduling such a
step first drains the step in flight (an empty step releases a deferred reply), proposes, then
schedules; a step that carries drafts runs to completion before the next is scheduled, because how
many tokens it yields is known only after verification (no placeholder can stand for them). The
trade-off: while speculation is on, the host work of each step (update, proposal, scheduling, input
preparation) no longer overlaps the device's previous step, a few percent of a step on a GPU; the
accepted drafts are meant to more than pay for it. It ends as soon as no running request may
speculate (a batch where it does not pay by the measured step costs, or at disable_by_batch_size;
requests paused for low acceptance, constrained or in prefill): plain steps keep today's overlap.
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Protocol

from ..config import EngineConfig
from ..executor.base import Executor
from ..executor.factory import executor_class_for
from ..outputs import EngineCoreOutput, EngineStats
from ..spec_decode.controller import SpecDecodeController
from ..step import GrammarOutput, ModelRunnerOutput, SchedulerOutput, StepHandle
from ..structured_output.manager import StructuredOutputManager
from ..utils import startup_timeline
from ..utils.gc_freeze import freeze_startup_heap, thaw_heap
from .commands import (AbortRequests, AddRejected, AddRequests, CheckHealth, Command, EventSink, HealthAnswer,
                       Shutdown, StepDone)
from .request import Request, RequestStatus
from .scheduler import Scheduler

logger = logging.getLogger(__name__)


class Inbox(Protocol):
    def take(self, block: bool) -> list[Command]:
        """The commands that arrived since the last call, in arrival order; block=True waits for one."""


class EngineCore:
    def __init__(self, config: EngineConfig, executor_class: Optional[type[Executor]] = None) -> None:
        startup_timeline.begin()       # the phases below run on this thread, whichever it is
        self.config = config
        self.executor = (executor_class or executor_class_for(config))(config)
        num_blocks = self.executor.determine_num_blocks()
        config.finalize_capacity(num_blocks)
        step_costs = self.executor.initialize_cache(num_blocks)
        startup_timeline.mark("KV allocation")      # (TP workers' graph capture included: they log theirs)
        self.scheduler = Scheduler(config.scheduler, config.cache)
        self.structured = StructuredOutputManager(config.model.vocab_size, self._load_tokenizer)
        self.num_steps = 0
        # only an executor that really returns before the step ends can overlap (and feed the
        # placeholders of the next step on its device); others run synchronously
        self.async_scheduling = (config.scheduler.async_scheduling
                                 and type(self.executor).execute_model_async is not Executor.execute_model_async)
        self._in_flight: Optional[tuple[SchedulerOutput, StepHandle]] = None
        self.spec = (SpecDecodeController(config.speculative, config.model.max_model_len)
                     if config.speculative is not None else None)
        if self.spec is not None:
            self.spec.use_step_costs(step_costs)
        self._prefix_summary_cache: list[int] = []
        self._prefix_summary_time = float("-inf")
        logger.info("KV cache: %d blocks of %d tokens; max_model_len %d", num_blocks,
                    config.cache.block_size, config.model.max_model_len)
        if self.spec is not None:
            spec = config.speculative
            limit = spec.disable_by_batch_size
            source = (f"n-grams of {spec.prompt_lookup_min}..{spec.prompt_lookup_max}" if spec.method == "ngram"
                      else f"draft model {spec.model}")
            costs = self.spec.step_costs
            logger.info("speculative decoding: %s, up to %d draft tokens per step (%s), %s",
                        spec.method, spec.num_speculative_tokens, source,
                        f"where the observed acceptance pays for the measured {costs.describe()}" if costs
                        else f"while fewer than {limit} requests run" if limit else "at any batch size")
        freeze_startup_heap()          # no full GC pass over start-up objects between steps
        startup_timeline.mark("scheduler, GC freeze")

    def _load_tokenizer(self) -> object:
        from ..processing.tokenizer import load_tokenizer

        return load_tokenizer(self.config.model.source)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request.request_id!r} is already running")
        structured = request.sampling_params.structured_outputs
        if structured is not None and request.grammar is None:
            request.grammar = self.structured.grammar_for(structured, request.eos_token_ids)
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

            host:   schedule N+1 | launch N+1 | wait N, update N | [fill N+1's masks, sample N+1] | schedule N+2
            device:        ... step N ...     |        step N+1 (forward, then sampling)          |

        A step with constrained requests (structured output) samples only once the engine has their
        token bitmask: it is filled here, after the previous step's tokens advanced the grammars and
        while this step's forward pass runs; other steps sample as soon as their logits are ready.

        A step that may speculate first drains the step in flight, then proposes drafts; one that
        carries drafts runs synchronously (module docstring).
        """
        outputs: list[EngineCoreOutput] = []
        drafts = None
        if self.spec is not None and self.spec.step_speculates(self.scheduler.running):
            outputs = self._drain()
            drafts = self.spec.propose(self.scheduler.running)
        scheduler_output = self.scheduler.schedule(drafts)
        self.num_steps += 1
        if not self.async_scheduling or scheduler_output.num_spec_tokens:
            runner_output = self._execute_sync(scheduler_output)
            outputs += self.scheduler.update_from_output(scheduler_output, runner_output)
            if self.spec is not None:
                self.spec.observe(scheduler_output, runner_output, self.scheduler.requests)
            return outputs
        handle = self.executor.execute_model_async(scheduler_output)
        if self._in_flight is not None:
            previous_output, previous_handle = self._in_flight
            outputs += self.scheduler.update_from_output(previous_output, previous_handle.result())
        if scheduler_output.structured_request_ids:
            handle = self.executor.sample_tokens(self._grammar_output(scheduler_output), defer=True)
        assert handle is not None, "a step without constrained requests samples at once"
        if scheduler_output.is_empty:
            self._in_flight = None
            outputs += self.scheduler.update_from_output(scheduler_output, handle.result())
            if not outputs:
                self._wait_for_grammars()
        else:
            self._in_flight = (scheduler_output, handle)
        return outputs

    def _drain(self) -> list[EngineCoreOutput]:
        """Waits for the step in flight (async scheduling) and applies its tokens. NOTE: an executor
        may hold a step's reply until the next step is launched (multiproc), so an empty step goes
        first: it is answered at once, after the reply it releases."""
        if self._in_flight is None:
            return []
        previous_output, previous_handle = self._in_flight
        self._in_flight = None
        flush = self.executor.execute_model_async(SchedulerOutput())
        outputs = self.scheduler.update_from_output(previous_output, previous_handle.result())
        if flush is not None:
            flush.result()
        return outputs

    def _execute_sync(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if not scheduler_output.structured_request_ids:
            output = self.executor.execute_model(scheduler_output)
            if scheduler_output.is_empty:
                self._wait_for_grammars()
            return output
        self.executor.execute_model_async(scheduler_output)          # forward only: sampling waits for the mask
        return self.executor.sample_tokens(self._grammar_output(scheduler_output), defer=False).result()

    def _grammar_output(self, scheduler_output: SchedulerOutput) -> GrammarOutput:
        requests = self.scheduler.requests
        grammars = {request_id: requests[request_id].grammar if request_id in requests else None
                    for request_id in scheduler_output.structured_request_ids}
        return self.structured.grammar_output(scheduler_output, grammars)

    def _wait_for_grammars(self) -> None:
        """Nothing ran: if only compiling grammars hold requests back, wait a little for one
        (rather than spin) and go back to the loop, which takes new commands meanwhile."""
        compiling = [r.grammar for r in self.scheduler.waiting if r.grammar is not None and not r.grammar.ready]
        if compiling:
            self.structured.wait_for_any(compiling, timeout_s=0.005)

    def run_loop(self, inbox: Inbox, emit: EventSink) -> None:
        """Serves commands until Shutdown: the one step loop of every transport.

        Invariant: between two steps every command that has arrived is applied, in arrival order.
        Idle, it blocks on the inbox; busy, it takes only what is there. Every turn ends with one
        StepDone carrying the step's outputs and the stats (their prefix summary only when it
        changed). Raises whatever a step or a health check raised: the transport reports CoreDied.
        """
        sent_summary: Optional[list[int]] = None
        while True:
            num_added = 0
            for command in inbox.take(block=not self.has_unfinished_requests()):
                if isinstance(command, Shutdown):
                    return
                if isinstance(command, AddRequests):
                    num_added += len(command.core_requests)
                    try:
                        self.add_requests(command.core_requests)
                    except ValueError as error:            # e.g. its id is still live in the core
                        emit(AddRejected(command.request_id, str(error)))
                elif isinstance(command, AbortRequests):
                    self.abort_requests(command.core_request_ids)
                elif isinstance(command, CheckHealth):
                    try:
                        self.check_health()
                    except BaseException as error:
                        emit(HealthAnswer(command.probe_id, f"{type(error).__name__}: {error}"))
                        raise
                    emit(HealthAnswer(command.probe_id, None))
                else:
                    raise TypeError(f"not an engine core command: {command!r}")
            outputs = self.step() if self.has_unfinished_requests() else []
            stats = self.get_stats()
            summary_changed = stats.cached_prefix_hashes is not sent_summary
            if summary_changed:
                sent_summary = stats.cached_prefix_hashes
            else:
                stats.cached_prefix_hashes = []
            emit(StepDone(outputs, stats, num_added, summary_changed))

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
            **self._spec_stats(),
        )

    def _spec_stats(self) -> dict:
        spec = self.spec
        if spec is None:
            return {}
        return dict(spec_decode_num_drafts=spec.num_drafts, spec_decode_num_draft_tokens=spec.num_draft_tokens,
                    spec_decode_num_accepted_tokens=spec.num_accepted_tokens,
                    spec_decode_num_accepted_tokens_per_pos=list(spec.num_accepted_tokens_per_pos))

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
        self.structured.shutdown()
        thaw_heap()
