"""The draft-model proposer, worker side: a smaller model with its own paged KV cache drafts each
speculating request's next K tokens on the device, inside the verifying step, right before the
target's forward pass.

    host (engine core)                       worker, one step (no host sync before the target forward)
    DraftSlotsProposer: K placeholder        propose(): for each speculating request, chunk at p .. p+K_i
      drafts; the scheduler gives the          catch-up   draft forward on the known tokens d .. p
      request 1 + K_i slots, as for n-gram                (normally [p-1, p]): its last row -> d1
                                               decode     K_i - 1 one-token draft steps at p+1 .. p+K_i-1
                                                          (the chunk's own slots) -> d2 .. dK_i
                                               the drafts overwrite the placeholders in input_ids
                                             target forward over [last, d1 .. dK_i]; verification as usual

Proposal. The draft's greedy token at each position: a point-mass proposal, so the runner's existing
verification (each position sampled exactly as a plain step, a draft kept while it equals that
sample) is exact at any temperature, penalties and seeds included. Sampling the drafts from the
draft's distribution and accepting with `rejection.rejection_sample`'s rule would accept more at
high temperature: a later improvement (the drafts' probabilities would travel with them).

What it keeps:
- its weights (the target's dtype, its layers sharded over the target's TP ranks) and a KV cache of
  its own, paged with the TARGET's block ids and slots: same num_blocks and block_size, so a block
  the scheduler gives a request holds both models' entries (the KV budget counts both per block).
- `token_ids`: per block-table row, the request's tokens by position on the device (prompt and
  earlier output when the request arrives, then every step's input ids, drafts included). The
  catch-up reads its inputs there: on every TP rank, under async scheduling too, without the host.
- `num_computed` (d): per request, how many leading positions hold the draft's correct KV. Every
  step d = min(d, the request's num_computed_tokens): after a verification that kept `a` of K
  drafts the next chunk starts at p + a + 1, and the draft's entries p+a+1 .. p+K-1 (from rejected
  drafts) fall out. A request that did not speculate for a while (prefill, large batch, paused)
  has a longer catch-up: run in chunks of at most max_num_batched_tokens tokens, eagerly.
- The catch-up window is [min(d, p - 1), p]: in the common case (d = p after a rejection, p - 1 after
  all K were accepted) every request has exactly two rows (p - 1's entry is rewritten with the same
  value), so the step has one uniform shape, which replays a q = 2 verification graph on CUDA; the
  K - 1 one-token steps replay the draft's own decode graphs.

Why the sharing is safe. Prefix-cache hits: a request's d starts at 0 whatever blocks it found, so
its catch-up recomputes (and rewrites) the draft entries of shared blocks from the same tokens at
the same positions: the same values up to rounding, while the target's entries are never touched.
A draft entry that is off (rewritten by another batch shape, or never computed by the request
that registered the block) can only change a draft, never an emitted token: verification is
exact. Preemption: the runner drops the request's state; on resumption d restarts at 0 and the
token row is rewritten from the resumed request's tokens.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from pagoda.kernels.metadata import AttentionMetadata

from ..worker import paged_kv_cache

if TYPE_CHECKING:
    from ..config import EngineConfig
    from ..step import SchedulerOutput
    from ..worker.step_inputs import BlockTable, PinnedStaging, StepInputs

logger = logging.getLogger(__name__)

# The catch-up's uniform shape: the rows [p - 1, p] of each speculating request.
CATCH_UP_Q = 2


def build_drafter(config: "EngineConfig", load_model: Callable[[Any], torch.nn.Module], block_table: "BlockTable",
                  staging: "PinnedStaging", rows: Mapping[str, Any]) -> Optional["DraftModelDrafter"]:
    """The model runner's drafter for method "draft_model" (None for other methods): the draft's
    weights loaded by the runner's own loader, with the target's dtype and TP split."""
    spec = config.speculative
    if spec is None or spec.method != "draft_model":
        return None
    assert spec.draft is not None, "speculative_config.model not resolved (EngineArgs.create_config does it)"
    from ..distributed.parallel_state import get_tp_rank
    from ..utils import startup_timeline

    model = load_model(spec.draft)
    if get_tp_rank() == 0:
        weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        logger.info("draft model %s: %.1f MB of weights on rank 0", spec.model, weight_bytes / 1e6)
    startup_timeline.mark("draft weights")
    return DraftModelDrafter(config, model, block_table, staging, rows)


class DraftTokens(Mapping):
    """One step's drafts: request id -> its K_i draft ids. The ids stay on the device (already in
    the step's input_ids); the host list is read on first access, once their copy has landed."""

    def __init__(self, request_ids: list[str], counts: list[int], flat: torch.Tensor,
                 host: Optional[torch.Tensor]) -> None:
        self._request_ids, self._counts, self._flat = request_ids, counts, flat
        self._host, self._event = host, None
        if host is not None:                      # CUDA: pinned copy, no sync now
            host.copy_(flat, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        self._lists: Optional[dict[str, list[int]]] = None

    def _load(self) -> dict[str, list[int]]:
        if self._lists is None:
            if self._event is not None:
                self._event.synchronize()
                values = self._host.tolist()
            else:
                values = self._flat.tolist()
            self._lists, start = {}, 0
            for request_id, count in zip(self._request_ids, self._counts):
                self._lists[request_id] = values[start:start + count]
                start += count
        return self._lists

    def __getitem__(self, request_id: str) -> list[int]:
        return self._load()[request_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._request_ids)

    def __len__(self) -> int:
        return len(self._request_ids)


class DraftModelDrafter:
    """Owns the draft model, its KV cache and graphs, and per request how far its KV is right.

    The model runner calls `update_states` after its own, `propose` once per step (after the async
    placeholders are filled, before the target forward), `drafts_of` when it verifies, and the
    KV-cache methods alongside its own."""

    def __init__(self, config: "EngineConfig", model: torch.nn.Module, block_table: "BlockTable",
                 staging: "PinnedStaging", rows: Mapping[str, Any]) -> None:
        spec = config.speculative
        assert spec is not None and spec.draft is not None
        self.config = config
        self.model = model
        self.device = config.device
        self.dtype = config.model.dtype
        self.block_size = config.cache.block_size
        self.max_chunk_tokens = config.scheduler.max_num_batched_tokens
        self.block_table = block_table
        self.staging = staging
        self.rows = rows                           # request id -> the runner's state (its `.row`)
        self.max_model_len = config.model.max_model_len      # finalize_capacity only lowers it later
        max_seqs = config.scheduler.max_num_seqs
        self.token_ids = torch.zeros(max_seqs, self.max_model_len, dtype=torch.int32, device=self.device)
        self.num_computed: dict[str, int] = {}
        self._known: list[tuple[int, list[int]]] = []       # (row, tokens) of new requests, written next propose
        self._seq_starts = torch.arange(max_seqs + 1, dtype=torch.int32, device=self.device)
        self.kv_cache: Optional[torch.Tensor] = None
        self.decode_graphs = None                  # DecodeGraphs of the draft (CUDA)
        self.catch_up_graphs = None                # VerifyGraphs of the draft, q = CATCH_UP_Q (CUDA)
        self._last: Optional[tuple["SchedulerOutput", DraftTokens]] = None
        pin = self.device.type == "cuda"
        width = max_seqs * spec.num_speculative_tokens
        self._host = [torch.empty(width, dtype=torch.int64, pin_memory=pin) for _ in range(2)] if pin else None
        self._host_slot = 0
        # counters for benchmarks: draft forwards run, by kind
        self.num_catch_up_forwards = 0
        self.num_decode_forwards = 0
        self._timing: Optional[StepTiming] = None

    # -- KV cache and graphs ----------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        return paged_kv_cache.kv_bytes_per_block(self.model, self.block_size, self.dtype)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The target's num_blocks and block_size, the model dtype (an FP8 KV cache is the target's only)."""
        self.kv_cache = paged_kv_cache.allocate_kv_cache(self.model, num_blocks, self.block_size, self.dtype,
                                                         self.device)

    def kv_cache_bytes(self) -> int:
        return paged_kv_cache.cache_bytes(self.kv_cache)

    def release_kv_cache(self) -> None:
        self.kv_cache = None
        paged_kv_cache.release_kv_cache(self.model)

    def profile_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                        num_rows: int) -> None:
        """The draft's share of the profiling step (the largest chunk a catch-up runs); then its
        profiling KV cache is released (the peak has counted it)."""
        hidden = self.model(input_ids, positions, metadata)
        self.model.greedy_tokens(hidden[-num_rows:])
        self.release_kv_cache()

    def capture_graphs(self, pool: Any = None) -> None:
        """Decode graphs of the draft (its K - 1 one-token steps) and q = 2 graphs for the uniform
        catch-up; CUDA with the Triton kernels only (as the target's)."""
        if self.device.type != "cuda" or self.config.enforce_eager or self.kv_cache is None:
            return
        from pagoda.kernels.backend import use_triton

        if not use_triton(self.kv_cache):
            return
        from ..worker.cuda_graphs import DecodeGraphs
        from ..worker.verify_graphs import VerifyGraphs, verify_max_batch

        spec = self.config.speculative
        max_blocks = -(-self.max_model_len // self.block_size)
        hidden_size = spec.draft.hf_config.hidden_size
        max_batch = verify_max_batch(spec.disable_by_batch_size, self.config.scheduler.max_num_seqs)
        self.decode_graphs = DecodeGraphs(self.model, max_batch=max_batch, max_blocks_per_seq=max_blocks,
                                          max_model_len=self.max_model_len, hidden_size=hidden_size,
                                          dtype=self.dtype, device=self.device)
        self.decode_graphs.capture()
        self.catch_up_graphs = VerifyGraphs(self.model, q=CATCH_UP_Q, max_batch=max_batch,
                                            max_blocks_per_seq=max_blocks, max_model_len=self.max_model_len,
                                            hidden_size=hidden_size, dtype=self.dtype, device=self.device,
                                            pool=self.decode_graphs.pool)
        self.catch_up_graphs.capture()

    # -- per step ---------------------------------------------------------------------------------
    def update_states(self, scheduler_output: "SchedulerOutput") -> None:
        """After the runner's own update: drop finished / preempted requests, start new ones at d = 0."""
        for request_id in scheduler_output.finished_request_ids:
            self.num_computed.pop(request_id, None)
        for data in scheduler_output.new_requests:
            self.num_computed[data.request_id] = 0
            self._known.append((self.rows[data.request_id].row, data.prompt_token_ids + data.output_token_ids))

    def drafts_of(self, scheduler_output: "SchedulerOutput") -> DraftTokens:
        """The drafts `propose` made for this step (the runner verifies them, once the target's
        forward pass is launched)."""
        assert self._last is not None and self._last[0] is scheduler_output, "drafts of another step"
        if self._timing is not None:
            self._timing.mark("verified")
        return self._last[1]

    def enable_timing(self) -> None:
        """Benchmarks: from now on, time each speculating step's drafting and its target forward."""
        self._timing = StepTiming(self.device)

    def timing(self) -> Optional[dict[str, float]]:
        """Mean ms per speculating step of the drafting (catch-up + one-token steps) and of the
        target's verification forward after it; None unless enabled (waits for the device)."""
        return self._timing.summary() if self._timing is not None else None

    def propose(self, scheduler_output: "SchedulerOutput", inputs: "StepInputs") -> None:
        """Every step: records the step's input ids; a step with speculating requests also drafts
        and writes the drafts over their placeholders in `inputs.input_ids` (device ops only)."""
        scheduled = scheduler_output.scheduled
        self._last = None
        stage = self.staging.to_device
        length = self.max_model_len
        # 1. the token rows: new requests' known tokens, then this step's inputs
        if self._known:
            flat = np.concatenate([row * length + np.arange(len(tokens)) for row, tokens in self._known])
            values = np.concatenate([np.asarray(tokens, dtype=np.int32) for _, tokens in self._known])
            self._known = []
            self.token_ids.view(-1)[stage("draft_known_index", flat, torch.int64)] = stage(
                "draft_known_ids", values, torch.int32)
        rows = np.fromiter((self.rows[item.request_id].row for item in scheduled), dtype=np.int64,
                           count=len(scheduled))
        starts = np.fromiter((item.num_computed_tokens for item in scheduled), dtype=np.int64, count=len(scheduled))
        num_new = np.fromiter((len(item.token_ids) for item in scheduled), dtype=np.int64, count=len(scheduled))
        firsts = np.cumsum(num_new) - num_new
        num_tokens = int(num_new.sum())
        positions = np.repeat(starts - firsts, num_new) + np.arange(num_tokens)
        step_index = np.repeat(rows, num_new) * length + positions
        self.token_ids.view(-1)[stage("draft_step_index", step_index, torch.int64)] = inputs.input_ids.to(torch.int32)
        for item in scheduled:
            request_id = item.request_id
            self.num_computed[request_id] = min(self.num_computed.get(request_id, 0), item.num_computed_tokens)
        if not scheduler_output.num_spec_tokens:
            self.staging.end_step()
            return
        # 2. speculating requests: catch-up, then K - 1 one-token steps
        spec = [i for i, item in enumerate(scheduled) if item.num_spec_tokens]
        spec_rows, p = rows[spec], starts[spec]
        k = np.fromiter((scheduled[i].num_spec_tokens for i in spec), dtype=np.int64, count=len(spec))
        first = np.minimum(np.fromiter((self.num_computed[scheduled[i].request_id] for i in spec), dtype=np.int64,
                                       count=len(spec)), p - 1)
        max_k = int(k.max())
        if self._timing is not None:
            self._timing.mark("start")
        drafts = torch.zeros(len(spec), max_k, dtype=torch.int64, device=self.device)
        self._catch_up(spec_rows, first, p, drafts)
        for j in range(1, max_k):
            self._decode_step(j, spec_rows, p, k, drafts)
        # 3. the drafts into the step's input ids (after each one's `last` row) and the token rows
        which = np.repeat(np.arange(len(spec)), k)
        column = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        select = stage("draft_select", which * max_k + column, torch.int64)
        flat = drafts.view(-1)[select]
        inputs.input_ids[stage("draft_input_rows", np.repeat(firsts[spec], k) + 1 + column, torch.int64)] = flat
        self.token_ids.view(-1)[stage("draft_token_index", np.repeat(spec_rows * length + p, k) + 1 + column,
                                      torch.int64)] = flat.to(torch.int32)
        for i in spec:                     # the draft writes p .. p + K_i - 1 (verification trims it next step)
            item = scheduled[i]
            self.num_computed[item.request_id] = item.num_computed_tokens + item.num_spec_tokens
        if self._timing is not None:
            self._timing.mark("drafted")
        host = None
        if self._host is not None:
            self._host_slot ^= 1
            host = self._host[self._host_slot][:flat.shape[0]]
        tokens = DraftTokens([scheduled[i].request_id for i in spec], k.tolist(), flat, host)
        self.staging.end_step()
        self._last = (scheduler_output, tokens)

    def _slots(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        bs = self.block_size
        return self.block_table.table[rows, positions // bs].astype(np.int64) * bs + positions % bs

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                 min_seq_len: Optional[int] = None) -> torch.Tensor:
        """A catch-up pass (min_seq_len: its shortest context) or a one-token step (None): replayed
        from the draft's graphs where its shape fits them, else eager."""
        if min_seq_len is None:
            graphs = self.decode_graphs
            fits = graphs is not None and graphs.can_run(metadata)
        else:
            graphs = self.catch_up_graphs
            fits = graphs is not None and graphs.batch.fits(metadata, min_seq_len)
        if fits:
            return graphs.run(input_ids, positions, metadata)
        return self.model(input_ids, positions, metadata)

    def _catch_up(self, rows: np.ndarray, first: np.ndarray, p: np.ndarray, drafts: torch.Tensor) -> None:
        """The draft over each request's known tokens first .. p (inclusive), in passes of at most
        max_num_batched_tokens tokens; the row of position p gives d1 (drafts[:, 0])."""
        passes: list[list[tuple[int, int, int]]] = [[]]          # (request index, start, end) per pass
        room = self.max_chunk_tokens
        for s in range(len(rows)):
            start, end = int(first[s]), int(p[s]) + 1
            while start < end:
                if room == 0:
                    passes.append([])
                    room = self.max_chunk_tokens
                take = min(end - start, room)
                passes[-1].append((s, start, start + take))
                room -= take
                start += take
        stage = self.staging.to_device
        bs, length = self.block_size, self.max_model_len
        for n, pieces in enumerate(passes):
            index = np.fromiter((s for s, _, _ in pieces), dtype=np.int64, count=len(pieces))
            begin = np.fromiter((a for _, a, _ in pieces), dtype=np.int64, count=len(pieces))
            end = np.fromiter((e for _, _, e in pieces), dtype=np.int64, count=len(pieces))
            count = end - begin
            query_start_loc = np.zeros(len(pieces) + 1, dtype=np.int64)
            np.cumsum(count, out=query_start_loc[1:])
            seq_rows = rows[index]
            positions = np.repeat(begin - query_start_loc[:-1], count) + np.arange(int(count.sum()))
            token_rows = np.repeat(seq_rows, count)
            max_seq_len = int(end.max())
            metadata = AttentionMetadata(
                slot_mapping=stage(f"draft_cu{n}_slots", self._slots(token_rows, positions), torch.int64),
                query_start_loc=stage(f"draft_cu{n}_qsl", query_start_loc, torch.int32),
                seq_lens=stage(f"draft_cu{n}_seq_lens", end, torch.int32),
                block_tables=stage(f"draft_cu{n}_blocks", self.block_table.table[seq_rows, :-(-max_seq_len // bs)],
                                   torch.int32),
                max_query_len=int(count.max()), max_seq_len=max_seq_len)
            input_ids = self.token_ids.view(-1)[stage(f"draft_cu{n}_index", token_rows * length + positions,
                                                      torch.int64)].to(torch.int64)
            done = end == p[index] + 1                      # pieces that reach p: their last row drafts d1
            hidden = self._forward(input_ids, stage(f"draft_cu{n}_positions", positions, torch.int64), metadata,
                                   min_seq_len=int(end.min()))
            self.num_catch_up_forwards += 1
            if done.any():
                last = stage(f"draft_cu{n}_last", query_start_loc[1:][done] - 1, torch.int64)
                drafts[stage(f"draft_cu{n}_done", index[done], torch.int64), 0] = self.model.greedy_tokens(hidden[last])

    def _decode_step(self, j: int, rows: np.ndarray, p: np.ndarray, k: np.ndarray, drafts: torch.Tensor) -> None:
        """One token per request still drafting (K_i > j): d_j at position p + j gives d_{j+1}."""
        stage = self.staging.to_device
        active = np.flatnonzero(k > j)
        seq_rows = rows[active]
        positions = p[active] + j
        seq_lens = positions + 1
        max_seq_len = int(seq_lens.max())
        metadata = AttentionMetadata(
            slot_mapping=stage(f"draft_d{j}_slots", self._slots(seq_rows, positions), torch.int64),
            query_start_loc=self._seq_starts[:active.size + 1],
            seq_lens=stage(f"draft_d{j}_seq_lens", seq_lens, torch.int32),
            block_tables=stage(f"draft_d{j}_blocks",
                               self.block_table.table[seq_rows, :-(-max_seq_len // self.block_size)], torch.int32),
            max_query_len=1, max_seq_len=max_seq_len)
        active_t = stage(f"draft_d{j}_active", active, torch.int64)
        hidden = self._forward(drafts[active_t, j - 1], stage(f"draft_d{j}_positions", positions, torch.int64),
                               metadata)
        self.num_decode_forwards += 1
        drafts[active_t, j] = self.model.greedy_tokens(hidden)


class StepTiming:
    """Device timestamps of speculating steps (CUDA events, read only at `summary`; the host clock
    on CPU, where every op has finished when it returns): start -> drafted -> verified."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[dict[str, Any]] = []

    def mark(self, name: str) -> None:
        if name == "start":
            self.marks.append({})
        if not self.marks:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[-1][name] = event
        else:
            import time

            self.marks[-1][name] = time.perf_counter()

    def _ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def summary(self) -> dict[str, float]:
        done = [m for m in self.marks if len(m) == 3]
        if self.cuda and done:
            done[-1]["verified"].synchronize()
        count = max(len(done), 1)
        return {"steps": float(len(done)),
                "draft_ms": sum(self._ms(m["start"], m["drafted"]) for m in done) / count,
                "verify_ms": sum(self._ms(m["drafted"], m["verified"]) for m in done) / count}
