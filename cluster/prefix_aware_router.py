"""`PrefixAwareRouter`: the model deployments' Ray Serve `RequestRouter` (policy: routing_policy.py).

NOTE: Serve pickles a custom router's module *by value* (so that routers defined in scripts work),
globals included. This module therefore holds the class alone and reaches everything else, the
process-wide router registry above all, through imports of other modules, which pickle by reference.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Optional

from ray.serve.request_router import RequestRouter

from pagoda.cluster.routing_policy import (
    AffinityMemory,
    InFlight,
    ReplicaView,
    hints_of,
    rank_replicas,
    register_router,
    remember,
)
from pagoda.cluster.wire import ReplicaReport


class PrefixAwareRouter(RequestRouter):
    def initialize_state(self, max_load_gap: int = 16, memory_ttl_s: float = 120.0,
                         memory_capacity: int = 100_000) -> None:
        """Called by Serve with the deployment's `request_router_kwargs`."""
        self._max_load_gap = max_load_gap
        self._memory: AffinityMemory = AffinityMemory(memory_capacity, memory_ttl_s)
        # request id -> replica, to steer a retry away from the replica that failed it
        self._routed: OrderedDict[str, Any] = OrderedDict()
        # replica -> (the routing_stats dict it was parsed from, report, its block hashes)
        self._parsed: dict[Any, tuple[dict, Optional[ReplicaReport], frozenset[int]]] = {}
        # requests this router sent that have not completed, per replica (by Serve's internal ids)
        self._in_flight: InFlight[Any] = InFlight()
        register_router(self._deployment_id.app_name, self._deployment_id.name, self)

    async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
        hints = hints_of(pending_request)
        by_key = {replica.replica_id: replica for replica in candidate_replicas}
        views = []
        for replica in candidate_replicas:
            report, cached = self._report(replica)
            views.append(ReplicaView(replica.replica_id, self._load(replica, report), cached))
        exclude = self._routed.get(hints.request_id) if hints is not None and hints.attempt > 0 else None
        ranks = rank_replicas(views, hints, self._memory, self._max_load_gap, exclude=exclude)
        return [[by_key[key] for key in rank] for rank in ranks]

    def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
        internal_id = getattr(getattr(pending_request, "metadata", None), "internal_request_id", None)
        if internal_id is not None:
            self._in_flight.routed(internal_id, replica_id)
        hints = hints_of(pending_request)
        if hints is None:
            return
        self._memory.record(replica_id, hints.prefix_hashes, hints.session_id, time.time())
        remember(self._routed, hints.request_id, replica_id, 10_000)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        self._in_flight.completed(internal_request_id, replica_id)

    def reports(self) -> list[ReplicaReport]:
        """The latest report of every running replica (those that have not reported yet are left out)."""
        reports = [self._report(replica)[0] for replica in self.curr_replicas.values()]
        return [report for report in reports if report is not None]

    def _load(self, replica: Any, report: Optional[ReplicaReport]) -> int:
        mine = self._in_flight.count(replica.replica_id)
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        if queue_len is None:
            queue_len = report.load if report is not None else 0
        return max(mine, queue_len)

    def _report(self, replica: Any) -> tuple[Optional[ReplicaReport], frozenset[int]]:
        # NOTE: the stats dict is replaced, never mutated, when a new report arrives: parse it once.
        stats = replica.routing_stats
        parsed = self._parsed.get(replica.replica_id)
        if parsed is None or parsed[0] is not stats:
            report = ReplicaReport.from_routing_stats(stats)
            cached = frozenset(report.prefix_hashes) if report is not None else frozenset()
            parsed = (stats, report, cached)
            self._parsed[replica.replica_id] = parsed
            if len(self._parsed) > 4 * max(1, len(self.curr_replicas)):
                live = set(self.curr_replicas)
                self._parsed = {key: value for key, value in self._parsed.items() if key in live}
        return parsed[1], parsed[2]
