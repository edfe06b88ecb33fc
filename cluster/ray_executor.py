"""Tensor parallelism over Ray actors: the engine's `Executor` with one `Worker` actor per TP rank.

    replica actor (AsyncEngine → EngineCore: scheduler)       placement group, STRICT_PACK (one node)
    execute_model_async(SchedulerOutput N)                    bundle 0: {GPU: g, CPU: c} rank 0 (driver)
      ── actor call Worker.step ──> every rank ── forward ── NCCL/gloo ── bundle 1: rank 1 ...
    (schedule N+1, send it)
    handle.result(): rank 0's reply to the call that answers N (timeout=step_timeout_s), while the
      other ranks' calls are watched for errors only
      <── rank 0's answers: step N rides with call N+1 (async scheduling), the others answer []
    sample_tokens(GrammarOutput N) ── actor call Worker.sample ──> rank 0 alone (a step with a grammar)

Passed to the engine unchanged: `EngineCore(config, executor_class=RayExecutor)` (or
`AsyncEngine(config, executor_class=RayExecutor)`); the engine never imports Ray.

Placement: under Ray Serve the replica's deployment asks for `tensor_parallel_size` bundles and the
replica actor itself sits in bundle 0 with no resources of its own; `RayExecutor` finds that group
(`get_current_placement_group`, or the one it is given) and gives worker i exactly bundle i.
With `engine_core_process` the executor lives in the replica's core process, which joins the
cluster as a driver of its own (`RayExecutorInCore`): the step loop then shares no GIL with the
replica's text work, as for one-GPU replicas. Outside a placement group
(tests, scripts) it creates its own group and removes it on shutdown.

GPUs: each actor sees only its own GPU through CUDA_VISIBLE_DEVICES. NCCL needs peers visible to
use NVLink/P2P, so before touching CUDA every worker is shown all the group's GPUs on its node and
told its own index among them (`local_rank`), as vLLM does.

Failure: any worker death (RayActorError), exception (RayTaskError) or a step past
`ParallelConfig.step_timeout_s` raises `ExecutorError`, which kills the engine; every worker is
killed first, since peers may be blocked in a collective. The workers are owned by the replica
actor, so Ray also kills them when the replica dies.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any, Optional

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pagoda.engine.config import EngineConfig
from pagoda.engine.distributed.parallel_state import get_open_port
from pagoda.engine.executor.base import ExecutorError, WorkerGroupExecutor
from pagoda.engine.step import GrammarOutput, ModelRunnerOutput, SchedulerOutput, StepHandle
from pagoda.engine.worker.worker import Worker

logger = logging.getLogger(__name__)

# Loading a large model takes minutes; a dead worker is still noticed at once (RayActorError).
STARTUP_TIMEOUT_S = WorkerGroupExecutor.startup_timeout_s
HEALTH_TIMEOUT_S = 30.0


class WorkerActor:
    """The Ray actor around one `Worker`; built in two steps because rank 0's address comes first."""

    def __init__(self) -> None:
        self.worker: Optional[Worker] = None

    def node_ip_and_free_port(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), get_open_port("0.0.0.0")

    def gpu_ids(self) -> list[str]:
        return [str(gpu) for gpu in ray.get_gpu_ids()]

    def init_worker(self, config: EngineConfig, rank: int, init_method: str,
                    visible_gpus: Optional[list[str]]) -> None:
        local_rank = None
        if visible_gpus:
            own = self.gpu_ids()[0]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus)
            local_rank = visible_gpus.index(own)
        self.worker = Worker(config, rank, init_method, local_rank)

    def execute(self, method: str, *args: Any) -> Any:
        assert self.worker is not None, "init_worker first"
        return getattr(self.worker, method)(*args)

    def ping(self) -> bool:
        return True


class RayExecutor(WorkerGroupExecutor):
    def __init__(self, config: EngineConfig, group: Optional[PlacementGroup] = None) -> None:
        """group: the placement group whose bundles the workers take (default: this actor's own,
        else one made here)."""
        super().__init__(config)
        if not ray.is_initialized():
            # NOTE: e.g. a core process handed the plain class: Ray would start a cluster of its own
            raise ExecutorError("the Ray executor needs this process connected to a Ray cluster (ray.init); "
                                "from an engine core process pass RayExecutorInCore, which connects it")
        self._given_group = group
        self.world_size = config.parallel.tensor_parallel_size
        self._failure: Optional[str] = None
        self._workers: list[Any] = []
        self._own_group: Optional[PlacementGroup] = None
        # async steps: rank 0's calls whose replies are unread (oldest first), and answers not yet taken
        self._calls: deque[Any] = deque()
        # NOTE: the other ranks' step calls, watched only for errors. A step with a grammar finishes on
        # rank 1.. only once rank 0 has sampled it (a broadcast of the sampled ids), which needs the
        # reply of rank 0 alone: waiting for every rank's call there would deadlock.
        self._peer_calls: list[Any] = []
        self._results: dict[int, ModelRunnerOutput] = {}
        self._num_launched = 0
        self._num_answered = 0
        try:
            group = self._placement_group(config)
            actor_class = ray.remote(WorkerActor)
            for rank, bundle in enumerate(group.bundle_specs[:self.world_size]):
                strategy = PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=rank,
                    placement_group_capture_child_tasks=False)
                self._workers.append(actor_class.options(
                    name=None, num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                    resources={key: value for key, value in bundle.items() if key not in ("CPU", "GPU", "memory")},
                    scheduling_strategy=strategy).remote())
            host, port = self._get(self._workers[0].node_ip_and_free_port.remote(), "startup", STARTUP_TIMEOUT_S)
            visible_gpus = None
            if config.device.type == "cuda":
                per_rank = self._get([w.gpu_ids.remote() for w in self._workers], "startup", STARTUP_TIMEOUT_S)
                visible_gpus = sorted({gpu for gpus in per_rank for gpu in gpus}, key=_gpu_sort_key)
            init_method = f"tcp://{host}:{port}"
            self._get([w.init_worker.remote(config, rank, init_method, visible_gpus)
                       for rank, w in enumerate(self._workers)], "init_worker", STARTUP_TIMEOUT_S)
            self._collective_rpc("init_device", timeout_s=STARTUP_TIMEOUT_S)
            self._collective_rpc("load_model", timeout_s=STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise

    def _placement_group(self, config: EngineConfig) -> PlacementGroup:
        group = self._given_group or get_current_placement_group()
        if group is not None:
            if len(group.bundle_specs) < self.world_size:
                raise ValueError(
                    f"tensor_parallel_size={self.world_size} needs {self.world_size} placement-group bundles, "
                    f"but this actor's group has {len(group.bundle_specs)}")
            return group
        bundle = {"GPU": 1.0, "CPU": 1.0} if config.device.type == "cuda" else {"CPU": 1.0}
        self._own_group = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="STRICT_PACK")
        self._get(self._own_group.ready(), "placement", STARTUP_TIMEOUT_S)
        return self._own_group

    # -- the Executor interface --------------------------------------------------------------------
    def execute_model_async(self, scheduler_output: SchedulerOutput) -> Optional[StepHandle]:
        """Sends the step to every rank (`Worker.step`) and returns. Rank 0 answers a step with the
        next call, once that one is launched (an empty step at once), so its device is busy while
        the reply travels and the engine schedules; the handle reads whichever call carries it."""
        if self._failure is not None:
            raise ExecutorError(self._failure)
        defer = not scheduler_output.is_empty
        driver_call, *peer_calls = [w.execute.remote("step", scheduler_output, defer) for w in self._workers]
        self._calls.append(driver_call)
        self._peer_calls += peer_calls
        if scheduler_output.structured_request_ids:
            return None          # its sampling waits for the bitmask: `sample_tokens` answers for it
        index = self._num_launched
        self._num_launched += 1
        return StepHandle(lambda: self._step_result(index))

    def sample_tokens(self, grammar_output: GrammarOutput, defer: bool) -> StepHandle:
        """Sends the bitmask to rank 0 alone (the only rank that samples) and returns."""
        if self._failure is not None:
            raise ExecutorError(self._failure)
        self._calls.append(self._workers[0].execute.remote("sample", grammar_output, defer))
        index = self._num_launched
        self._num_launched += 1
        return StepHandle(lambda: self._step_result(index))

    def _step_result(self, index: int) -> ModelRunnerOutput:
        """Step `index`'s sampled tokens. Invariant: replies arrive in step order, so reading the
        oldest outstanding call delivers the oldest unanswered steps."""
        while index not in self._results:
            if not self._calls:
                raise self._fail(f"step {index} was never answered: its reply is not in any call sent")
            for output in self._driver_reply(self._calls.popleft()):
                self._results[self._num_answered] = output
                self._num_answered += 1
        return self._results.pop(index)

    def _driver_reply(self, driver_call: Any) -> list[ModelRunnerOutput]:
        """Rank 0's reply to one call; any other rank's call that ends meanwhile is read for errors."""
        timeout_s = self.config.parallel.step_timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            ready, _ = ray.wait([driver_call, *self._peer_calls], num_returns=1, timeout=max(remaining, 0))
            if not ready:
                raise self._fail(f"execute_model did not finish within {timeout_s:g} s on a TP worker: "
                                 "a worker or a collective is stuck")
            for ref in ready:
                if ref == driver_call:
                    continue
                self._peer_calls.remove(ref)
                self._get(ref, "execute_model", timeout_s)          # raises what a peer raised
            if driver_call in ready:
                return self._get(driver_call, "execute_model", timeout_s)

    def check_health(self) -> None:
        """Raises ExecutorError if the executor failed or a worker does not answer.

        Called between steps (the engine thread sends it), when every worker actor is idle.
        """
        if self._failure is not None:
            raise ExecutorError(self._failure)
        self._get([w.ping.remote() for w in self._workers], "check_health", HEALTH_TIMEOUT_S)

    def shutdown(self) -> None:
        for worker in self._workers:
            try:
                ray.kill(worker)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._workers = []
        if self._own_group is not None:
            try:
                remove_placement_group(self._own_group)
            except Exception:  # noqa: BLE001
                pass
            self._own_group = None

    # -- transport ---------------------------------------------------------------------------------
    def _collective_rpc(self, method: str, *args: Any, timeout_s: float) -> list[Any]:
        """`Worker.<method>(*args)` on every rank, replies in rank order.

        Invariant: every rank receives every call in the same order (an actor runs its calls one at a
        time, in submission order), so the ranks' collectives pair up.
        """
        if self._failure is not None:
            raise ExecutorError(self._failure)
        return self._get([w.execute.remote(method, *args) for w in self._workers], method, timeout_s)

    def _get(self, refs: Any, what: str, timeout_s: float) -> Any:
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            raise self._fail(f"{what} did not finish within {timeout_s:g} s on a TP worker: a worker or a "
                             "collective is stuck") from None
        except RayActorError as error:
            raise self._fail(f"a TP worker actor died during {what}: {error}") from None
        except RayError as error:
            raise self._fail(f"a TP worker raised in {what}:\n{error}") from None

    def _fail(self, reason: str) -> ExecutorError:
        self._failure = reason
        logger.error("Ray executor failed: %s", reason)
        self.shutdown()
        return ExecutorError(reason)


class RayExecutorInCore:
    """Builds a `RayExecutor` inside the engine's core process (`engine_core_process`): that process
    is no Ray worker, so it first joins the replica's Ray cluster as a driver of its own, then places
    the workers in the replica's placement group. Picklable: it travels to the core process as the
    engine's `executor_class`. The workers are owned by the core process and die with it."""

    def __init__(self, gcs_address: str, namespace: Optional[str], group: Optional[PlacementGroup],
                 runtime_env: Optional[dict[str, Any]] = None) -> None:
        self.gcs_address = gcs_address
        self.namespace = namespace
        self.group = group
        self.runtime_env = runtime_env

    @classmethod
    def here(cls) -> "RayExecutorInCore":
        """For the engine of this Ray actor: its cluster, namespace, placement group and runtime env
        (the workers get the env vars, working_dir and packages the app was deployed with)."""
        context = ray.get_runtime_context()
        return cls(context.gcs_address, context.namespace, get_current_placement_group(),
                   dict(context.runtime_env) or None)

    def __call__(self, config: EngineConfig) -> RayExecutor:
        if not ray.is_initialized():
            try:
                ray.init(address=self.gcs_address, namespace=self.namespace, runtime_env=self.runtime_env,
                         logging_level=logging.WARNING, log_to_driver=False)
            except (TypeError, ValueError) as error:      # a runtime env a driver may not take
                logger.warning("joining Ray with the replica's runtime env failed (%s); the TP workers get "
                               "the cluster's default environment", error)
                ray.init(address=self.gcs_address, namespace=self.namespace, logging_level=logging.WARNING,
                         log_to_driver=False)
        return RayExecutor(config, self.group)


def _gpu_sort_key(gpu: str) -> tuple[int, str]:
    return (int(gpu), gpu) if gpu.isdigit() else (1 << 30, gpu)
