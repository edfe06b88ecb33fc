"""Block pool and prefix-cache bookkeeping, on its own (no model)."""
from __future__ import annotations

from pagoda.engine.core.kv_cache import KVCacheManager, hash_block
from pagoda.engine.core.request import Request
from pagoda.engine.sampling_params import SamplingParams


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=8), frozenset(), max_tokens=8)


def test_hash_is_chained_and_stable():
    a = hash_block(0, [1, 2, 3, 4])
    assert a == hash_block(0, [1, 2, 3, 4])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(0, [5, 6, 7, 8])
    assert hash_block(0, [1, 2, 3, 4], salt="x") != a
    assert 0 <= a < 2**64


def test_prefix_hits_share_blocks_by_reference_and_lru_eviction():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(10)))            # 2 full blocks + 2 tokens
    assert kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    b = make_request("b", list(range(8)) + [99, 98, 97])
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [x.block_id for x in hits] == kv.block_ids("a")[:2]
    assert kv.allocate_slots(b, 3, hits)
    assert all(block.ref_cnt == 2 for block in hits)
    assert kv.prefix_cache_queries == 11 and kv.prefix_cache_hits == 8
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 6
    # freed blocks stay findable until reused
    c = make_request("c", list(range(8)) + [1])
    hits, n = kv.get_computed_blocks(c)
    assert n == 8
    # filling the pool with another request evicts least-recently freed blocks first
    d = make_request("d", [50 + i for i in range(16)])
    assert kv.allocate_slots(d, 16)          # 4 blocks: takes the never-hashed / tail blocks first
    hits, n = kv.get_computed_blocks(make_request("e", list(range(8)) + [1]))
    assert n == 8, "the shared prefix blocks were evicted before colder tail blocks"


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_prefix_caching=True)
    r = make_request("r", list(range(12)))
    assert not kv.allocate_slots(r, 12)
    assert kv.num_free_blocks == 2 and "r" not in kv.req_blocks


def test_full_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(8)))
    assert kv.allocate_slots(a, 8)
    b = make_request("b", list(range(8)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 4, "the last block must be recomputed so the last prompt token yields logits"


def test_prefix_summary_reports_recent_leading_blocks_still_cached():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(12)))
    assert kv.allocate_slots(a, 12)
    summary = kv.cached_prefix_hashes()
    assert summary[:3] == list(reversed(a.block_hashes[:3]))
    kv.free(a)
    b = make_request("b", [100 + i for i in range(32)])      # reuses (evicts) every block
    assert kv.allocate_slots(b, 32)
    summary = kv.cached_prefix_hashes()
    assert not set(a.block_hashes) & set(summary), "evicted blocks must leave the summary"
    assert set(b.block_hashes[:8]) == set(summary)
