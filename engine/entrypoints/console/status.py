"""The document of `GET /v1/cluster/status`: every served model, its replica counts and, per replica,
its load, KV cache, cumulative counters and last-minute latencies.

    {"object": "cluster.status", "mode": "standalone" | "ray", "time": <epoch s>, "window_s": 60,
     "models": [{"name", "max_model_len", "replicas": {"current", "target", "min", "max"},
                 "replica_stats": [{"replica", "state", "running", "waiting", "kv_cache_usage", ...}]}]}

One replica's entry (`ReplicaStatus`) is built where its engine lives (`replica_status`): in the
standalone server, and in each Ray replica, whose report carries it to the ingress as plain values
(`to_dict`). The ingress assembles the document from those (cluster/client.py); the standalone
server from its one engine (`standalone_status`). A replica whose numbers are not known (it did not
report in time, or is still starting) is listed with null numbers (`unknown_replica`).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

from ...engine_client import EngineClient
from ...outputs import EngineStats
from ...rolling_stats import WINDOW_S, RollingSnapshot

ReplicaState = Literal["running", "unhealthy", "starting", "draining"]
STANDALONE_REPLICA = "standalone"
# How long the standalone server's status waits for a health answer (an engine client without an
# `errored` flag answers through its step loop).
_HEALTH_WAIT_S = 2.0


class LatencyStats(BaseModel):
    """Milliseconds over the window; p50 / p99 are None when count is 0."""

    p50: Optional[float] = None
    p99: Optional[float] = None
    count: int = 0


class ReplicaStatus(BaseModel):
    """One replica's entry; None for numbers that are not known (no report in time, starting)."""

    replica: str
    state: ReplicaState
    running: Optional[int] = None
    waiting: Optional[int] = None
    kv_cache_usage: Optional[float] = None
    prefix_cache_hit_rate: Optional[float] = None
    num_preemptions: Optional[int] = None
    generation_tokens_total: Optional[int] = None
    requests_finished_total: Optional[int] = None
    generation_tokens_per_s: Optional[float] = None
    ttft_ms: Optional[LatencyStats] = None
    itl_ms: Optional[LatencyStats] = None

    def to_dict(self) -> dict[str, Any]:
        """Builtins only (it crosses Ray inside a replica's report)."""
        return self.model_dump()


class ReplicaCounts(BaseModel):
    current: int = Field(ge=0)
    target: int = Field(ge=0)
    min: int = Field(ge=0)
    max: int = Field(ge=0)


class ModelStatus(BaseModel):
    name: str
    max_model_len: int
    replicas: ReplicaCounts
    replica_stats: list[ReplicaStatus]


class ClusterStatus(BaseModel):
    object: Literal["cluster.status"] = "cluster.status"
    mode: Literal["standalone", "ray"]
    time: float
    window_s: float = WINDOW_S
    models: list[ModelStatus]


def replica_status(replica_id: str, state: ReplicaState, stats: EngineStats,
                   rolling: Optional[RollingSnapshot]) -> ReplicaStatus:
    """The entry of a replica whose engine answered (`rolling` None: no window kept, latencies null)."""
    queries = stats.prefix_cache_queries
    entry = ReplicaStatus(
        replica=replica_id, state=state, running=stats.num_running, waiting=stats.num_waiting,
        kv_cache_usage=stats.kv_cache_usage,
        prefix_cache_hit_rate=stats.prefix_cache_hits / queries if queries else 0.0,
        num_preemptions=stats.num_preemptions, generation_tokens_total=stats.generation_tokens)
    if rolling is not None:
        entry.requests_finished_total = rolling.requests_finished_total
        entry.generation_tokens_per_s = rolling.generation_tokens_per_s
        entry.ttft_ms = LatencyStats(**rolling.ttft_ms.to_dict())
        entry.itl_ms = LatencyStats(**rolling.itl_ms.to_dict())
    return entry


def unknown_replica(replica_id: str, state: ReplicaState) -> ReplicaStatus:
    """A replica listed without numbers: it did not report in time ("unhealthy") or is "starting"."""
    return ReplicaStatus(replica=replica_id, state=state)


def rolling_of(engine: Any, model_name: str) -> Optional[RollingSnapshot]:
    """The engine's last-minute window of `model_name`, or None for an engine that keeps none.

    NOTE: `EngineClient` does not promise metrics; `AsyncEngine` keeps them in `.metrics`
    (an `EngineMetrics`), which is what the windows hang off.
    """
    metrics = getattr(engine, "metrics", None)
    rolling = getattr(metrics, "rolling", None)
    return rolling(model_name).snapshot() if callable(rolling) else None


async def engine_replica_status(engine: EngineClient, replica_id: str,
                                healthy: Optional[bool] = None) -> ReplicaStatus:
    """The entry of one in-process engine (its first served name's window); `healthy` None: asked here."""
    if healthy is None:
        healthy = await _healthy(engine)
    stats = await engine.get_stats()
    return replica_status(replica_id, "running" if healthy else "unhealthy", stats,
                          rolling_of(engine, engine.model_names[0]))


async def standalone_status(engine: EngineClient, now: Optional[float] = None) -> ClusterStatus:
    """The document of the standalone server: one model, one replica "standalone", counts 1/1/1/1."""
    entry = await engine_replica_status(engine, STANDALONE_REPLICA)
    models = [ModelStatus(name=name, max_model_len=engine.max_model_len,
                          replicas=ReplicaCounts(current=1, target=1, min=1, max=1), replica_stats=[entry])
              for name in engine.model_names]
    return ClusterStatus(mode="standalone", time=time.time() if now is None else now, models=models)


async def _healthy(engine: EngineClient) -> bool:
    errored = getattr(engine, "errored", None)
    if isinstance(errored, bool):        # AsyncEngine: a flag, no round trip to the step loop
        return not errored
    try:
        return await asyncio.wait_for(engine.is_healthy(), _HEALTH_WAIT_S)
    except asyncio.TimeoutError:
        return False
