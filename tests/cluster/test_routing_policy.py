"""cluster/routing_policy.py: the replica-choice policy and the prompt's block hashes (no Ray cluster)."""
from __future__ import annotations

import random

import pytest

from pagoda.cluster.routing_policy import AffinityMemory, InFlight, ReplicaView, prompt_block_hashes, rank_replicas
from pagoda.cluster.wire import RoutingHints
from pagoda.engine import SamplingParams
from pagoda.engine.config import EngineArgs
from pagoda.engine.llm_engine import LLMEngine


@pytest.mark.parametrize("block_size", [16, 32])
def test_prompt_block_hashes_are_the_engines_own(tiny_model, block_size):
    # The router must hash a prompt exactly as the KV cache does, or affinity never matches.
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model), device="cpu", block_size=block_size,
                                                   kv_cache_memory_bytes=16 << 20))
    try:
        prompt = list(range(5, 5 + 3 * block_size + 7))           # three full blocks and a partial one
        engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
        cached = set(engine.get_stats().cached_prefix_hashes)
    finally:
        engine.shutdown()
    hashes = prompt_block_hashes(prompt, block_size)
    assert len(hashes) == 3
    assert set(hashes) <= cached
    assert prompt_block_hashes(prompt[:block_size - 1], block_size) == []
    assert prompt_block_hashes(prompt, block_size, max_blocks=2) == hashes[:2]
    # chained: a different first block changes every later hash
    other = prompt_block_hashes([9] + prompt[1:], block_size)
    assert not set(other) & set(hashes)


def _views(*specs) -> list[ReplicaView[str]]:
    return [ReplicaView(key, load, frozenset(cached)) for key, load, cached in specs]


def _hints(prefix=(), session=None, attempt=0) -> RoutingHints:
    return RoutingHints(request_id="req", prefix_hashes=list(prefix), session_id=session, attempt=attempt)


def test_without_hints_it_is_power_of_two_choices():
    views = _views(("a", 0, ()), ("b", 5, ()), ("c", 1, ()))
    load = {"a": 0, "b": 5, "c": 1}
    seen = set()
    for seed in range(30):
        ranks = rank_replicas(views, None, AffinityMemory(), max_load_gap=4, rng=random.Random(seed))
        # two random replicas as two ranks, the less loaded first (Serve must not pick within a rank)
        assert [len(rank) for rank in ranks] == [1, 1]
        first, second = ranks[0][0], ranks[1][0]
        assert first != second and load[first] <= load[second]
        seen.update((first, second))
    assert seen == {"a", "b", "c"}
    # two replicas of equal load: either may come first
    firsts = {rank_replicas(_views(("a", 3, ()), ("b", 3, ())), None, AffinityMemory(), 4,
                            rng=random.Random(seed))[0][0] for seed in range(20)}
    assert firsts == {"a", "b"}
    assert rank_replicas(_views(("a", 0, ())), None, AffinityMemory(), 4) == [["a"]]
    assert rank_replicas([], None, AffinityMemory(), 4) == []


def test_the_replica_caching_the_longest_prefix_comes_first():
    views = _views(("a", 0, {1}), ("b", 3, {1, 2, 3}), ("c", 0, ()))
    ranks = rank_replicas(views, _hints([1, 2, 3, 4]), AffinityMemory(), max_load_gap=4)
    assert ranks[0] == ["b"] and all(len(rank) == 1 for rank in ranks) and len(ranks) in (2, 3)
    # only leading blocks count: holding block 2 without block 1 is no match (the less loaded one leads)
    views = _views(("a", 2, {2, 3}), ("b", 0, ()))
    assert rank_replicas(views, _hints([1, 2, 3]), AffinityMemory(), 4) == [["b"], ["a"]]
    # equal matches: the less loaded one
    views = _views(("a", 3, {1}), ("b", 1, {1}))
    assert rank_replicas(views, _hints([1]), AffinityMemory(), 4)[0] == ["b"]


def test_load_balance_wins_past_the_gap():
    views = _views(("a", 10, {1, 2}), ("b", 1, ()))
    assert rank_replicas(views, _hints([1, 2]), AffinityMemory(), max_load_gap=9)[0] == ["a"]
    assert rank_replicas(views, _hints([1, 2]), AffinityMemory(), max_load_gap=8) == [["b"], ["a"]]


def test_remembered_routes_count_until_they_expire():
    memory: AffinityMemory[str] = AffinityMemory(ttl_s=10.0)
    memory.record("b", [1, 2], session_id=None, now=100.0)
    views = _views(("a", 0, ()), ("b", 1, ()))
    assert rank_replicas(views, _hints([1, 2]), memory, 4, now=105.0) == [["b"], ["a"]]
    assert rank_replicas(views, _hints([1, 2]), memory, 4, now=111.0) == [["a"], ["b"]]


def test_memory_is_bounded():
    memory: AffinityMemory[str] = AffinityMemory(capacity=3)
    memory.record("a", [1, 2, 3, 4], session_id=None, now=0.0)
    assert memory.replica_of_block(1, 0.0) is None and memory.replica_of_block(4, 0.0) == "a"


def test_session_affinity_before_prefix_affinity():
    memory: AffinityMemory[str] = AffinityMemory()
    memory.record("a", [], session_id="s1", now=0.0)
    views = _views(("a", 2, ()), ("b", 0, {7}))
    ranks = rank_replicas(views, _hints([7], session="s1"), memory, max_load_gap=4, now=1.0)
    assert ranks[0] == ["a"] and ranks[1] == ["b"]
    assert rank_replicas(views, _hints([7], session="other"), memory, 4, now=1.0)[0] == ["b"]


def test_a_retry_avoids_the_replica_that_failed():
    views = _views(("a", 0, {1}), ("b", 9, ()), ("c", 9, ()))
    for seed in range(10):
        ranks = rank_replicas(views, _hints([1], attempt=1), AffinityMemory(), 4, exclude="a", rng=random.Random(seed))
        assert all("a" not in rank for rank in ranks)
    # ... unless it is the only one
    assert rank_replicas(_views(("a", 0, ())), _hints(), AffinityMemory(), 4, exclude="a") == [["a"]]


def test_in_flight_counts_survive_serves_callback_orders():
    counts: InFlight[str] = InFlight(capacity=4)
    counts.routed("r1", "a")
    counts.routed("r2", "a")
    counts.routed("r2", "a")                      # a repeated report counts once
    assert counts.count("a") == 2
    counts.completed("r1", "a")
    assert counts.count("a") == 1
    # a stream that ended at once: its completion comes before its routing, and nothing leaks
    counts.completed("r3", "b")
    counts.routed("r3", "b")
    assert counts.count("b") == 0
    # rejected by a, accepted by b (one request id): a's late completion must not end b's
    counts.routed("r4", "b")
    counts.completed("r4", "a")
    assert counts.count("b") == 1
    counts.completed("r4", "b")
    counts.completed("r2", "a")
    assert counts.count("a") == 0 and counts.count("b") == 0
