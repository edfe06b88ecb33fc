"""Tensor parallelism on one host: one spawned worker process per TP rank.

    engine process (EngineCore: scheduler)            worker processes, one per rank (Worker)
    execute_model_async(SchedulerOutput N)
      pickle once ──── pipe ────> rank 0: forward, all-gather logits, sample, broadcast ids ─┐
                  ──── pipe ────> rank 1: forward, all-gather logits, receive ids           │ gloo (CPU) /
                  ──── pipe ────> ...                                                       │ NCCL (CUDA)
    (schedule N+1, send it)       rank 0 replies N once N+1 is launched ────────────────────┘
    handle.result(): rank 0's reply for N, watching every worker's exit and the step deadline

Every rank, rank 0 included, is a worker process; the engine process only schedules. Why:
- the engine process never blocks inside a collective. It waits on pipes and process sentinels with
  a deadline, so a dead worker is noticed at once and a stuck collective within
  `ParallelConfig.step_timeout_s`; either raises `ExecutorError` and the engine turns dead.
- the engine process joins no process group (torch.distributed state is process-global), so engines
  of any TP size, TP=1 included, can live side by side in one process.
- every rank is driven the same way, as the Ray executor's actors are.

Two kinds of message. A *call* (`_collective_rpc`: start-up, cache sizing) is answered by every rank
before the next message is sent. A *step* is answered by rank 0 alone (its sampled tokens; other
ranks only ever write an error). With async scheduling a step is *deferred*: rank 0 replies to step
N only after it has launched step N+1, so the device is busy with N+1 while the reply travels and
the engine updates and schedules (the engine core always sends a step, possibly empty, before it
waits for the previous one; an empty step is answered at once). Replies arrive in step order.
A step with constrained requests takes a third message: the step itself gets no reply, and a
*sample* message to rank 0 alone carries the grammar bitmask; rank 0 answers it as it would the step.

No orphans: `shutdown` (also run at exit and when the executor is garbage-collected) closes the
command pipes, joins, then terminates and kills what is left. A worker whose engine process died,
even by SIGKILL, sees EOF on its command pipe, and a watcher thread catches the case where it is
blocked in a collective: it exits when its parent pid changes.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Optional

import torch.multiprocessing as mp

from ..config import EngineConfig
from ..distributed.parallel_state import get_open_port
from ..step import GrammarOutput, ModelRunnerOutput, SchedulerOutput, StepHandle
from ..utils.child_process import exit_when_parent_dies, how_it_ended, leave, stop_children
from ..worker.worker import Worker
from .base import ExecutorError, WorkerGroupExecutor

logger = logging.getLogger(__name__)

# Loading and profiling a large model takes minutes; a worker that dies meanwhile is still noticed
# at once through its sentinel.
STARTUP_TIMEOUT_S = WorkerGroupExecutor.startup_timeout_s
# How long workers get to leave on their own after their command pipe closes.
SHUTDOWN_GRACE_S = 5.0


@dataclass
class _WorkerHandle:
    rank: int
    process: Any                 # a spawn-context multiprocessing.Process
    conn: Connection             # the engine's end of this worker's command pipe


class MultiprocExecutor(WorkerGroupExecutor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.world_size = config.parallel.tensor_parallel_size
        self._failure: str | None = None
        self._workers: list[_WorkerHandle] = []
        self._steps_in_flight = 0            # steps sent whose rank-0 reply has not been read
        # NOTE: the finalizer holds the handle list, not self, so it runs both at interpreter exit
        # and when an executor that was never shut down (e.g. its engine failed to start) is collected.
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers, SHUTDOWN_GRACE_S)
        context = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{get_open_port()}"
        try:
            for rank in range(self.world_size):
                # NOTE: daemon, so that multiprocessing's own exit handler terminates the workers
                # rather than joining them forever should it run before our finalizer.
                engine_conn, worker_conn = context.Pipe()
                process = context.Process(
                    target=_worker_main, name=f"pagoda-tp-rank{rank}", daemon=True,
                    args=(config, rank, init_method, worker_conn, os.getpid()))
                process.start()
                worker_conn.close()       # the worker holds the only other end: EOF when it dies
                self._workers.append(_WorkerHandle(rank, process, engine_conn))
            self._collective_rpc("init_device", timeout_s=STARTUP_TIMEOUT_S)
            self._collective_rpc("load_model", timeout_s=STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise

    # -- the Executor interface --------------------------------------------------------------------
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._send_step(scheduler_output, defer=False).result()

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> Optional[StepHandle]:
        """Sends the step and returns; `result()` reads rank 0's reply, which comes once the next
        step has been sent and launched (or at once for an empty step). A step with a grammar
        gets no reply of its own: `sample_tokens` answers for it."""
        return self._send_step(scheduler_output, defer=not scheduler_output.is_empty)

    def sample_tokens(self, grammar_output: GrammarOutput, defer: bool) -> StepHandle:
        """Sends the bitmask to rank 0 alone (the other ranks do not sample) and returns."""
        message = pickle.dumps(("sample", (grammar_output, defer)), protocol=pickle.HIGHEST_PROTOCOL)
        driver = self._workers[0]
        if self._failure is not None:
            raise ExecutorError(self._failure)
        try:
            driver.conn.send_bytes(message)
        except OSError:
            raise self._fail(self._exit_message(driver, "sample_tokens"))
        self._steps_in_flight += 1
        return StepHandle(self._read_step_reply)

    def _send_step(self, scheduler_output: SchedulerOutput, defer: bool) -> Optional[StepHandle]:
        self._send(pickle.dumps(("step", (scheduler_output, defer)), protocol=pickle.HIGHEST_PROTOCOL),
                   "execute_model")
        if scheduler_output.structured_request_ids:
            return None
        self._steps_in_flight += 1
        return StepHandle(self._read_step_reply)

    def _read_step_reply(self) -> ModelRunnerOutput:
        try:
            output = self._wait_for_rank0("execute_model", self.config.parallel.step_timeout_s)
        except ExecutorError:
            raise
        except BaseException:
            self._fail("interrupted during execute_model")
            raise
        self._steps_in_flight -= 1
        assert isinstance(output, ModelRunnerOutput), "rank 0 is the driver and must sample"
        return output

    def check_health(self) -> None:
        """Raises ExecutorError if the executor failed or any worker has exited.

        Only looks (sentinels are polled, nothing is reaped or closed), so another thread may call it
        while a step runs; the step itself notices the same exit and stops the workers.
        """
        if self._failure is not None:
            raise ExecutorError(self._failure)
        exited = wait([w.process.sentinel for w in self._workers], timeout=0)
        for worker in self._workers:
            if worker.process.sentinel in exited:
                raise ExecutorError(f"TP rank {worker.rank} worker (pid {worker.process.pid}) has exited")

    def shutdown(self) -> None:
        if self._failure is None:
            self._failure = "the executor was shut down"
        self._finalizer()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids by rank (for operators and tests)."""
        return [worker.process.pid for worker in self._workers]

    # -- transport ---------------------------------------------------------------------------------
    def _collective_rpc(self, method: str, *args: Any, timeout_s: float) -> list[Any]:
        """Calls `Worker.<method>(*args)` on every rank; returns the replies in rank order.

        Invariant: every rank receives every call, in the same order, and the next call is sent only
        once every rank has answered, so the command pipes never hold more than one message.
        """
        assert self._steps_in_flight == 0, "a call while step replies are outstanding would read them"
        message = pickle.dumps(("call", (method, args)), protocol=pickle.HIGHEST_PROTOCOL)   # once for all ranks
        try:
            self._send(message, method)
            return self._gather_replies(method, timeout_s)
        except ExecutorError:
            raise
        except BaseException:
            # NOTE: e.g. Ctrl-C while waiting. This call's replies may still arrive and would be read
            # as the next call's, so the pipes can't be trusted again: stop the workers.
            self._fail(f"interrupted during {method}")
            raise

    def _send(self, message: bytes, method: str) -> None:
        if self._failure is not None:
            raise ExecutorError(self._failure)
        for worker in self._workers:
            try:
                worker.conn.send_bytes(message)
            except OSError:
                raise self._fail(self._exit_message(worker, method))

    def _wait_for_rank0(self, method: str, timeout_s: float) -> Any:
        """Rank 0's next reply. Any other rank writes only when it failed; any exit is fatal."""
        if self._failure is not None:
            raise ExecutorError(self._failure)
        deadline = time.monotonic() + timeout_s
        conns = {w.conn: w for w in self._workers}
        by_sentinel = {w.process.sentinel: w for w in self._workers}
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"{method} did not finish within {timeout_s:g} s: "
                                 "a worker or a collective is stuck")
            ready = wait([*conns, *by_sentinel], timeout=remaining)
            # errors of other ranks first: rank 0 may have finished a step its peers failed in
            for conn in sorted((r for r in ready if r in conns), key=lambda c: -conns[c].rank):
                worker = conns[conn]
                payload = self._receive(worker, method)
                if worker.rank != 0:
                    raise self._fail(f"TP rank {worker.rank} sent an unexpected reply during {method}")
                return payload
            for sentinel in [r for r in ready if r in by_sentinel]:
                raise self._fail(self._exit_message(by_sentinel[sentinel], method))

    def _gather_replies(self, method: str, timeout_s: float) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        replies: dict[int, Any] = {}
        waiting = {w.conn: w for w in self._workers}
        by_sentinel = {w.process.sentinel: w for w in self._workers}
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ranks = sorted(w.rank for w in waiting.values())
                raise self._fail(f"{method} did not finish within {timeout_s:g} s on TP rank(s) {ranks}: "
                                 "a worker or a collective is stuck")
            ready = wait([*waiting, *by_sentinel], timeout=remaining)
            for conn in [r for r in ready if r in waiting]:
                worker = waiting.pop(conn)
                replies[worker.rank] = self._receive(worker, method)
            for sentinel in [r for r in ready if r in by_sentinel]:
                # Any exit is fatal, even of a rank that already answered: it is gone for the next step.
                worker = by_sentinel[sentinel]
                if worker.conn in waiting and worker.conn.poll():   # it may have said why first
                    status, payload = worker.conn.recv()
                    if status == "error":
                        raise self._fail(f"TP rank {worker.rank} raised in {method}:\n{payload}")
                raise self._fail(self._exit_message(worker, method))
        return [replies[rank] for rank in range(self.world_size)]

    def _receive(self, worker: _WorkerHandle, method: str) -> Any:
        """The worker's next reply's payload; a closed pipe or an error reply fails the executor."""
        try:
            status, payload = worker.conn.recv()
        except (EOFError, OSError):
            raise self._fail(self._exit_message(worker, method))
        if status == "error":
            raise self._fail(f"TP rank {worker.rank} raised in {method}:\n{payload}")
        return payload

    def _exit_message(self, worker: _WorkerHandle, method: str) -> str:
        return f"TP rank {worker.rank} worker (pid {worker.process.pid}) {how_it_ended(worker.process)} during {method}"

    def _fail(self, reason: str) -> ExecutorError:
        """Marks the executor dead and stops every worker (no grace: peers may be stuck in a
        collective); returns the error to raise."""
        self._failure = reason
        logger.error("multiproc executor failed: %s", reason)
        _stop_workers(self._workers, grace_s=0.0)
        return ExecutorError(reason)


def _stop_workers(workers: list[_WorkerHandle], grace_s: float) -> None:
    """Closes every command pipe (a worker leaves its loop on EOF), waits up to `grace_s`, then
    terminates and finally kills what is left. Safe to call twice."""
    stop_children([(worker.process, worker.conn) for worker in workers], grace_s, terminate_wait_s=1.0)


# -- the worker process ----------------------------------------------------------------------------
def _worker_main(config: EngineConfig, rank: int, init_method: str, conn: Connection, parent_pid: int) -> None:
    """Runs `Worker` calls read from `conn` until EOF; replies ("ok", result) or ("error", traceback)."""
    # Ctrl-C reaches the whole process group; the engine decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=exit_when_parent_dies, args=(parent_pid,), name="pagoda-parent-watch",
                     daemon=True).start()
    worker = Worker(config, rank, init_method)
    while True:
        try:
            kind, payload = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break                          # shutdown, or the engine process is gone
        try:
            if kind == "step":
                scheduler_output, defer = payload
                replies = worker.step(scheduler_output, defer)
            elif kind == "sample":
                grammar_output, defer = payload
                replies = worker.sample(grammar_output, defer)
            else:
                method, args = payload
                replies = [getattr(worker, method)(*args)]
        except BaseException:
            # NOTE: after a failed step the rank's state (KV cache, the peers' collectives) is undefined:
            # report and leave without the collective teardown, which could block on the peers.
            try:
                conn.send(("error", traceback.format_exc()))
            except OSError:
                pass
            leave(1)
        try:
            for result in replies:
                conn.send(("ok", result))
        except OSError:
            break
    worker.shutdown()
    leave(0)           # the process group is already destroyed: no teardown needed
