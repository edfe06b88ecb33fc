"""Which replica of a model serves a request: prefix-cache affinity, session affinity, else
power of two choices. Plugged into Ray Serve as the model deployments' `RequestRouter`.

    ingress: prompt -> token ids -> prompt_block_hashes()  (the KV cache's own chained hashes)
                                          │ RoutingHints in the ReplicaRequest
    PrefixAwareRouter.choose_replicas():  ▼                                  rank
      1. x-session-id seen before, its replica not overloaded         -> [that replica]
      2. the replica holding the longest run of the prompt's leading
         blocks, unless its load exceeds the least-loaded one's by more
         than max_load_gap                                             -> [that replica]
      3. power of two choices: two random replicas, the less loaded one
         first                                                        -> [a], [b]
    Serve walks the ranks in order and skips replicas whose queue is full (max_ongoing_requests).

Where a replica's cached blocks come from:
- its `ReplicaReport` (record_routing_stats, every `routing_stats_period_s`): the engine's
  `EngineStats.cached_prefix_hashes`, authoritative but a few seconds old;
- this router's memory of where it sent each prefix (`AffinityMemory`), which covers the seconds
  before the replica reports it, and prefixes the engine's capped report leaves out.
Load is the larger of the requests this router has in flight at the replica (counted on every send
and completion, so exact within a burst) and what Serve last learned of its queue (its queue-length
cache, else the report's waiting + running: these include the other ingress replicas' requests).
NOTE: the two choices go out as two ranks, not one rank of two: within a rank Serve takes any
replica it has a fresh queue length for without waiting to probe the others, so a burst arriving
while only one of them was cached would all go to that one.

A retry (hints.attempt > 0) avoids the replica the first attempt was routed to.

The Serve plug-in class is `prefix_aware_router.PrefixAwareRouter`; this module holds the policy, pure
and unit-tested. `router_for(app, deployment)` lets the ingress, which owns the handles (and so the
router objects, in its own process), read the replicas' latest reports for /metrics and `pagoda status`.
"""
from __future__ import annotations

import random
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Generic, Hashable, Optional, TypeVar

from pagoda.engine.core.kv_cache import hash_block

from .wire import ReplicaRequest, RoutingHints

K = TypeVar("K", bound=Hashable)

# Leading blocks of a prompt the router hashes and matches: 32 blocks of 16 tokens = 512 tokens is
# enough to tell shared system prompts and conversation histories apart.
MAX_ROUTING_BLOCKS = 32


def prompt_block_hashes(token_ids: list[int], block_size: int, max_blocks: int = MAX_ROUTING_BLOCKS) -> list[int]:
    """The chained hashes of the prompt's first full blocks, exactly as `KVCacheManager` computes them.

    Invariant: hash i covers tokens [0, (i+1) * block_size): chain from parent 0, no salt (the engine
    salts only the n > 1 groups of a server without prefix caching, which nobody else can share).
    """
    hashes: list[int] = []
    parent = 0
    for index in range(min(len(token_ids) // block_size, max_blocks)):
        parent = hash_block(parent, list(token_ids[index * block_size:(index + 1) * block_size]))
        hashes.append(parent)
    return hashes


# -- the policy (no Ray: unit-tested directly) -------------------------------------------------------
@dataclass
class ReplicaView(Generic[K]):
    """What the policy knows of one candidate replica."""

    key: K
    load: int                                              # requests in flight there
    cached: frozenset[int] = field(default_factory=frozenset)   # reported block hashes


class AffinityMemory(Generic[K]):
    """Where this router recently sent each prefix block and each session (bounded LRU with a TTL)."""

    def __init__(self, capacity: int = 100_000, ttl_s: float = 120.0) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._blocks: OrderedDict[int, tuple[K, float]] = OrderedDict()
        self._sessions: OrderedDict[str, tuple[K, float]] = OrderedDict()

    def record(self, key: K, prefix_hashes: list[int], session_id: Optional[str], now: float) -> None:
        for block_hash in prefix_hashes:
            _put(self._blocks, block_hash, (key, now), self.capacity)
        if session_id:
            _put(self._sessions, session_id, (key, now), self.capacity)

    def replica_of_block(self, block_hash: int, now: float) -> Optional[K]:
        return self._fresh(self._blocks.get(block_hash), now)

    def replica_of_session(self, session_id: Optional[str], now: float) -> Optional[K]:
        return self._fresh(self._sessions.get(session_id), now) if session_id else None

    def _fresh(self, entry: Optional[tuple[K, float]], now: float) -> Optional[K]:
        if entry is None or now - entry[1] > self.ttl_s:
            return None
        return entry[0]


def _put(table: OrderedDict, key: Any, value: Any, capacity: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > capacity:
        table.popitem(last=False)


def matched_blocks(view: ReplicaView[K], prefix_hashes: list[int], memory: AffinityMemory[K], now: float) -> int:
    """How many of the prompt's leading blocks the replica holds (reported or remembered)."""
    count = 0
    for block_hash in prefix_hashes:
        if block_hash not in view.cached and memory.replica_of_block(block_hash, now) != view.key:
            break
        count += 1
    return count


def rank_replicas(views: list[ReplicaView[K]], hints: Optional[RoutingHints], memory: AffinityMemory[K],
                  max_load_gap: int, exclude: Optional[K] = None, rng: Optional[random.Random] = None,
                  now: Optional[float] = None) -> list[list[K]]:
    """Ranks of candidate replicas, most preferred first (see the module docstring).

    Invariant: affinity never sends a request to a replica holding more than `max_load_gap` requests
    above the least-loaded candidate; past that, load balance wins over cache hits.
    """
    rng = rng or random
    now = time.time() if now is None else now
    pool = [view for view in views if view.key != exclude] or list(views)
    if not pool:
        return []
    min_load = min(view.load for view in pool)
    ranks: list[list[K]] = []

    def within_gap(view: ReplicaView[K]) -> bool:
        return view.load - min_load <= max_load_gap

    if hints is not None:
        session_key = memory.replica_of_session(hints.session_id, now)
        for view in pool:
            if view.key == session_key and within_gap(view):
                ranks.append([view.key])
        if hints.prefix_hashes:
            scored = [(matched_blocks(view, hints.prefix_hashes, memory, now), -view.load, view) for view in pool]
            best_match, _, best = max(scored, key=lambda item: (item[0], item[1]))
            if best_match > 0 and within_gap(best) and [best.key] not in ranks:
                ranks.append([best.key])
    pair = rng.sample(pool, 2) if len(pool) > 2 else rng.sample(pool, len(pool))
    pair.sort(key=lambda view: view.load)          # stable: equal loads keep their random order
    ranks.extend([view.key] for view in pair if [view.key] not in ranks)
    return ranks


# -- the routers of this process --------------------------------------------------------------------
_ROUTERS: "weakref.WeakValueDictionary[tuple[str, str], Any]" = weakref.WeakValueDictionary()


def register_router(app_name: str, deployment_name: str, router: Any) -> None:
    _ROUTERS[(app_name, deployment_name)] = router


def router_for(app_name: str, deployment_name: str) -> Any:
    """This process's `PrefixAwareRouter` for the deployment (it exists once a handle to it is used)."""
    return _ROUTERS.get((app_name, deployment_name))


def hints_of(pending_request: Any) -> Optional[RoutingHints]:
    """The routing hints of a Serve `PendingRequest` (None for calls that carry none, e.g. describe)."""
    if pending_request is None:
        return None
    for arg in pending_request.args:
        if isinstance(arg, ReplicaRequest):
            return arg.hints
    return None


class InFlight(Generic[K]):
    """Requests one router sent that have not completed, counted per replica.

    Keyed by (request id, replica): a request rejected by one replica and accepted by another keeps
    its id, and the first one's completion must not end the second. A completion may be reported
    before its routing (a stream that ends at once): it is kept (bounded) and cancels that routing,
    so no count leaks.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._keys: set[tuple[str, K]] = set()
        self._completed_early: OrderedDict[tuple[str, K], None] = OrderedDict()
        self._counts: dict[K, int] = {}
        self._capacity = capacity

    def routed(self, request_id: str, replica: K) -> None:
        key = (request_id, replica)
        if key in self._completed_early:
            del self._completed_early[key]
        elif key not in self._keys:
            self._keys.add(key)
            self._counts[replica] = self._counts.get(replica, 0) + 1

    def completed(self, request_id: str, replica: K) -> None:
        key = (request_id, replica)
        if key not in self._keys:
            remember(self._completed_early, key, None, self._capacity)
            return
        self._keys.discard(key)
        left = self._counts[replica] - 1
        if left > 0:
            self._counts[replica] = left
        else:
            del self._counts[replica]

    def count(self, replica: K) -> int:
        return self._counts.get(replica, 0)


def remember(table: OrderedDict, key: Any, value: Any, capacity: int) -> None:
    """Bounded LRU insert."""
    _put(table, key, value, capacity)
