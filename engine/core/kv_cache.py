"""The paged KV cache's bookkeeping: a block pool with reference counts, LRU eviction and
automatic prefix caching, plus each request's block table.

A full block is named by a chained hash of (parent block's hash, this block's token ids), so equal
hashes mean equal prefixes. Blocks are shared by reference, never copied. A freed block keeps its
hash and stays findable until it is reused for something else (LRU: least recently freed first).

    request A: [blk 4: t0..t15][blk 9: t16..t31][blk 2: t32..t37 (partial)]
    request B shares t0..t31 ->  [blk 4][blk 9] (ref_cnt 2 each)  then its own blocks

Invariants: a block is either in the free queue (ref_cnt == 0) or referenced (ref_cnt > 0);
`hash_to_block` only names blocks whose KV is (or, within the current step, will be) computed.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from .request import Request


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: Optional[int] = None


def hash_block(parent_hash: int, token_ids: list[int], salt: Optional[str] = None) -> int:
    """Stable 64-bit chained hash (same value in every process, unlike Python's `hash`)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(parent_hash.to_bytes(8, "little"))
    if salt is not None:
        digest.update(salt.encode())
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front = evicted first). Cached blocks sit here too.
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.hash_to_block: dict[int, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self, count: int) -> list[KVBlock]:
        assert count <= len(self.free_queue), "caller must check num_free_blocks first"
        out = []
        for _ in range(count):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:          # evict its cached content
                if self.hash_to_block.get(block.block_hash) is block:
                    del self.hash_to_block[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Takes a reference on cache-hit blocks (removing idle ones from the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drops one reference each; pass blocks tail-first so a sequence's tail is evicted first."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block

    def cache(self, block: KVBlock, block_hash: int) -> None:
        if block.block_hash is not None:
            return
        if block_hash in self.hash_to_block:          # an equal block is cached already: keep that one
            return
        block.block_hash = block_hash
        self.hash_to_block[block_hash] = block

    def lookup(self, block_hash: int) -> Optional[KVBlock]:
        return self.hash_to_block.get(block_hash)


LEADING_BLOCKS = 8            # leading blocks per sequence that the prefix summary reports
MAX_LEADING_HASHES = 8192


class KVCacheManager:
    """Allocates blocks to requests; the scheduler's only view of the cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_num_cached_blocks: dict[str, int] = {}   # how many of its blocks carry a hash
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # hashes of the first LEADING_BLOCKS blocks of recently cached sequences, oldest first
        self.leading_hashes: OrderedDict[int, None] = OrderedDict()

    # -- lookups --------------------------------------------------------------------------------
    def _salt(self, request: Request) -> Optional[str]:
        # NOTE: with prefix caching off, only the n completions of one prompt share blocks: their
        # hashes carry a salt that no other request has.
        return request.cache_salt

    def _ensure_hashes(self, request: Request, num_full_blocks: int) -> None:
        hashes = request.block_hashes
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else 0
            tokens = request.token_ids_slice(i * self.block_size, (i + 1) * self.block_size)
            hashes.append(hash_block(parent, tokens, self._salt(request) if i == 0 else None))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of full blocks; always leaves >= 1 token to compute (its logits)."""
        if request.sampling_params.prompt_logprobs is not None:
            return [], 0      # prompt logprobs need the logits of every prompt position
        if not self.enable_prefix_caching and request.cache_salt is None:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._ensure_hashes(request, max_blocks)
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        if request.num_preemptions == 0:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # -- allocation -------------------------------------------------------------------------------
    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Optional[list[KVBlock]] = None
    ) -> bool:
        """Gives `request` blocks for its computed tokens, any cache hits and `num_new_tokens` more.

        Returns False (changing nothing) when the free pool is too small.
        """
        new_computed_blocks = new_computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total_tokens = num_computed + num_new_tokens
        num_needed = -(-total_tokens // self.block_size) - len(blocks) - len(new_computed_blocks)
        # Cache hits sitting idle in the free queue stop being allocatable once touched.
        num_idle_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_idle_hits:
            if not blocks:
                del self.req_blocks[request.request_id]
            return False
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        if num_needed > 0:
            blocks.extend(self.pool.allocate(num_needed))
        self._cache_full_blocks(request, blocks, total_tokens)
        return True

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], total_tokens: int) -> None:
        # Blocks that will be full once this step runs become findable now: a request scheduled
        # later in the same step reads their KV after this step's cache writes.
        if not self.enable_prefix_caching and request.cache_salt is None:
            return
        # only blocks whose every token id is known (not a placeholder of a step in flight)
        num_full = min(min(total_tokens, request.num_tokens) // self.block_size, len(blocks))
        start = self.req_num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        self._ensure_hashes(request, num_full)
        for i in range(start, num_full):
            self.pool.cache(blocks[i], request.block_hashes[i])
            if i < LEADING_BLOCKS:
                self.leading_hashes[request.block_hashes[i]] = None
                self.leading_hashes.move_to_end(request.block_hashes[i])
        while len(self.leading_hashes) > MAX_LEADING_HASHES:
            self.leading_hashes.popitem(last=False)
        self.req_num_cached_blocks[request.request_id] = num_full

    def cache_known_blocks(self, request: Request) -> None:
        """Registers full blocks completed by a token that just became known (async scheduling)."""
        blocks = self.req_blocks.get(request.request_id)
        if blocks:
            self._cache_full_blocks(request, blocks, request.num_computed_tokens)

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.req_num_cached_blocks.pop(request.request_id, None)
        self.pool.free(list(reversed(blocks)))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def check_invariants(self) -> None:
        """Raises AssertionError where the bookkeeping contradicts itself (tests call it between
        steps and after runs): every block's ref_cnt is the number of block tables holding it, the
        free queue holds exactly the unreferenced blocks, and each cached hash names a block that
        carries it. Idle (no request left), every block is free."""
        held: dict[int, int] = {}
        for request_id, blocks in self.req_blocks.items():
            assert self.req_num_cached_blocks.get(request_id, 0) <= len(blocks), f"{request_id}: cached > held"
            for block in blocks:
                held[block.block_id] = held.get(block.block_id, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == held.get(block.block_id, 0), (
                f"block {block.block_id}: ref_cnt {block.ref_cnt} but held by {held.get(block.block_id, 0)}")
            assert (block.ref_cnt == 0) == (block.block_id in self.pool.free_queue), (
                f"block {block.block_id}: ref_cnt {block.ref_cnt}, in the free queue: "
                f"{block.block_id in self.pool.free_queue}")
        for block_hash, block in self.pool.hash_to_block.items():
            assert block.block_hash == block_hash, f"block {block.block_id} is cached under another hash"

    # -- stats --------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def cached_prefix_hashes(self, limit: int = 1024) -> list[int]:
        """The compact prefix summary a router matches a prompt's leading block hashes against:
        hashes of the leading blocks of recently cached sequences that are still cached, most
        recent first."""
        out = []
        for block_hash in reversed(self.leading_hashes):
            if len(out) >= limit:
                break
            if block_hash in self.pool.hash_to_block:
                out.append(block_hash)
        return out
