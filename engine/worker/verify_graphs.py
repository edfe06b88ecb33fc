"""CUDA graphs for speculative verification steps: every sequence padded at the front to q = 1 + K rows.

A request verifying K drafts computes the chunk [last, d1 .. dK]; in the same step other requests
verify fewer drafts (the n-gram proposer finds 0 .. K) or decode one token. Such a step is not a
pure decode, so the decode graphs (`cuda_graphs.py`) cannot replay it, and run eagerly its hundreds
of kernel launches cost far more than the forward itself on a small model. Here the step is made
uniform, every sequence exactly q = 1 + K query rows, and one graph is captured per padded batch
bucket for that q (one K per engine):

    real chunks   A: [a0 a1 a2] (2 drafts)   B: [b0] (decode)     q = 4, bucket 4
    padded rows   A: [ .  a0 a1 a2 ]         B: [ .  .  .  b0 ]   two padding sequences [ . . . . ]
    positions     row j of a sequence sits at seq_len - q + j: its real rows keep their positions and
                  causal context; a padding row re-reads a position already in the cache
    slot_mapping  the real rows' slots; -1 (write nothing) for every padding row
    query_start_loc  arange(bucket + 1) * q, constant;  max_query_len q;  max_seq_len max_model_len
    seq_lens      unchanged; a padding sequence q (its block-table row holds valid block ids)
    output        the real rows gathered back in the step's order: (T_real, hidden), so the logits
                  rows and the rejection downstream do not change

Why this is capturable: the prefill attention kernel's grid depends only on (num_tokens, num_seqs)
and its tile config only on max_query_len; it reads seq_lens, query_start_loc and block_tables in
the kernel. The rest of the forward reads no host value that differs between capture and replay:
rotary indexes its table with the positions tensor, the cache write skips slot -1 on the device,
FP8 KV scales are read from (1,) tensors (the eager calibration step precedes any replay), sliding
window / softcap / sinks are per-layer constants, the MoE alignment is sync-free with sizes fixed by
the token count, and the TP all-reduce picks symmetric memory or NCCL from the message size alone
(every rank replays the same bucket: the choice below reads only what every rank's step carries).

Nothing here depends on why a sequence has fewer than q new tokens: a step whose prefill chunks are
all short (the tail of a chunked prompt, a prefix-cache hit) replays too. Eager instead: a step with
a sequence of more than q new tokens (a prefill chunk), more sequences than `max_batch`, or a
sequence whose context is not longer than q (`seq_len <= q`). NOTE: the last
is stricter than the padding needs (seq_len >= q): a sequence with seq_len == q would look like a
whole new prompt, which the CPU attention path reads from the step's own K/V rows instead of the
cache, taking the padding rows for context. Excluding it keeps the layout correct on every path
(and the CPU tests an oracle of the GPU one) at the cost of a step or two for contexts of <= q tokens.

Which batches: up to `disable_by_batch_size - 1` when speculation stops at a batch size (no step
above it verifies drafts), else up to VERIFY_GRAPH_MAX_BATCH; never above max_num_seqs. Where the
engine measures the cutoff (no limit from the user, n-gram drafts), `measure_step_costs` then times
each verification graph against the decode graph of the same batch (engine/spec_decode/step_costs.py).

`UniformBatch` holds the static inputs and packs a step into them with device ops only (no host
sync, any device; about ten small launches before the replay): the CUDA graphs replay it, and the
CPU tests run the model on it eagerly. A draft model's uniform catch-up uses the same classes with
its own q (engine/spec_decode/draft_model.py).
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch

from pagoda.kernels.metadata import AttentionMetadata

from ..config import EngineConfig
from ..spec_decode.step_costs import StepCosts
from ..step import ScheduledRequest
from ..utils import startup_timeline
from .cuda_graphs import default_buckets

logger = logging.getLogger(__name__)

# The largest batch captured when speculation has no batch-size limit (disable_by_batch_size None):
# graphs of 64 x (1 + K) tokens; larger verification steps run eagerly.
VERIFY_GRAPH_MAX_BATCH = 64


def verify_max_batch(disable_by_batch_size: Optional[int], max_num_seqs: int, measured_cutoff: bool = False) -> int:
    """The largest verification batch worth a graph (module docstring): speculation runs only while
    fewer than `disable_by_batch_size` requests run, or, with a measured cutoff, wherever the
    measurement says it pays (up to VERIFY_GRAPH_MAX_BATCH)."""
    bound = disable_by_batch_size - 1 if disable_by_batch_size and not measured_cutoff else VERIFY_GRAPH_MAX_BATCH
    return max(1, min(bound, max_num_seqs))


def padded_rows(query_start_loc: torch.Tensor, num_tokens: int, q: int) -> torch.Tensor:
    """(num_tokens,) int64: the row of the uniform layout that each real token fills. Token t of
    sequence i (its chunk ending at query_start_loc[i + 1]) goes to row (i + 1) * q - (end_i - t):
    the chunk sits at the end of its q rows, the padding in front."""
    ends = query_start_loc[1:].to(torch.int64)                              # (n,)
    tokens = torch.arange(num_tokens, dtype=torch.int64, device=ends.device)
    seq = torch.searchsorted(ends, tokens, right=True)                      # (T,) sequence of each token
    return (seq + 1) * q - ends[seq] + tokens


def min_context_len(scheduled: Iterable[ScheduledRequest]) -> int:
    """The shortest context (cached tokens + new ones) among a step's sequences, from the host schedule."""
    return min((item.num_computed_tokens + len(item.token_ids) for item in scheduled), default=0)


class UniformBatch:
    """Static inputs of the uniform-q layout for up to `max_batch` sequences; a replay reads these."""

    def __init__(self, q: int, max_batch: int, max_blocks_per_seq: int, device: torch.device) -> None:
        if q < 1:
            raise ValueError(f"q (query rows per sequence, 1 + num_speculative_tokens) must be >= 1, got {q}")
        self.q = q
        self.max_batch = max_batch
        rows = max_batch * q
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device) * q
        self.seq_lens = torch.full((max_batch,), q, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._row_offsets = torch.arange(q, dtype=torch.int64, device=device) - q    # j - q, for positions

    def metadata(self, batch: int, max_seq_len: int) -> AttentionMetadata:
        """The attention metadata of the first `batch` sequences (views of the static buffers)."""
        rows = batch * self.q
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:rows], query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch], block_tables=self.block_tables[:batch],
            max_query_len=self.q, max_seq_len=max_seq_len)

    def fits(self, metadata: AttentionMetadata, min_seq_len: int) -> bool:
        """Whether a step (its metadata, and its shortest context from the host) packs into this layout."""
        return (metadata.max_query_len <= self.q and 0 < metadata.num_seqs <= self.max_batch
                and min_seq_len > self.q and metadata.block_tables.shape[1] <= self.block_tables.shape[1])

    def pack(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
             batch: int) -> torch.Tensor:
        """Writes a step (T real tokens of n <= batch sequences, each at most q new tokens and a context
        longer than q: `fits`) into the first `batch` sequences' buffers; returns the (T,) rows the
        real tokens went to, to gather their outputs back in order. Device ops only, no host sync."""
        q, n = self.q, metadata.num_seqs
        rows = batch * q
        dest = padded_rows(metadata.query_start_loc, input_ids.shape[0], q)
        self.seq_lens[:n].copy_(metadata.seq_lens)
        self.seq_lens[n:batch].fill_(q)          # padding sequences: q tokens of their (valid) block row
        width = metadata.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(metadata.block_tables)
        # row j of every sequence at seq_len - q + j (the real rows get exactly their own positions)
        torch.add(self.seq_lens[:batch, None].to(torch.int64), self._row_offsets,
                  out=self.positions[:rows].view(batch, q))
        self.positions.index_copy_(0, dest, positions)
        self.slot_mapping[:rows].fill_(-1)
        self.slot_mapping.index_copy_(0, dest, metadata.slot_mapping)
        # NOTE: padding rows keep whatever ids they last held (all valid token ids): nothing reads
        # their outputs, and their K / V are never written
        self.input_ids.index_copy_(0, dest, input_ids)
        return dest


class VerifyGraphs:
    """One captured forward per padded batch bucket, all of q = 1 + num_speculative_tokens rows per sequence."""

    def __init__(self, model: Any, q: int, max_batch: int, max_blocks_per_seq: int, max_model_len: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device, pool: Any = None) -> None:
        self.model = model
        self.device = device
        self.max_model_len = max_model_len
        self.buckets = default_buckets(max_batch)
        self.batch = UniformBatch(q, self.buckets[-1], max_blocks_per_seq, device)
        self.output = torch.zeros(self.buckets[-1] * q, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = pool          # the decode graphs' pool: replays never overlap, outputs live outside it

    @classmethod
    def for_target(cls, model: Any, config: EngineConfig, pool: Any = None) -> "VerifyGraphs":
        """The target model's verification graphs (not captured yet): q = 1 + num_speculative_tokens,
        batches up to `verify_max_batch`."""
        spec = config.speculative
        if spec is None:
            raise ValueError("verification graphs need speculative decoding (speculative_config), got None")
        max_model_len = config.model.max_model_len
        return cls(model, q=1 + spec.num_speculative_tokens,
                   max_batch=verify_max_batch(spec.disable_by_batch_size, config.scheduler.max_num_seqs,
                                              spec.measured_cutoff),
                   max_blocks_per_seq=-(-max_model_len // config.cache.block_size), max_model_len=max_model_len,
                   hidden_size=config.model.hf_config.hidden_size, dtype=config.model.dtype, device=config.device,
                   pool=pool)

    @property
    def q(self) -> int:
        return self.batch.q

    def _forward(self, batch: int) -> None:
        rows = batch * self.q
        metadata = self.batch.metadata(batch, self.max_model_len)
        self.output[:rows] = self.model(self.batch.input_ids[:rows], self.batch.positions[:rows], metadata)

    @startup_timeline.span("verification CUDA-graph capture")
    @torch.inference_mode()
    def capture(self) -> None:
        """Largest bucket first, so the smaller graphs reuse its memory. The static buffers hold
        padding only (slot -1 everywhere): capture writes nothing to the KV cache."""
        for batch in reversed(self.buckets):
            self._forward(batch)                      # warm up: Triton compiles outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward(batch)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured verification CUDA graphs (%d rows per sequence) for batch sizes %s",
                    self.q, self.buckets)

    def can_run(self, metadata: AttentionMetadata, scheduled: Iterable[ScheduledRequest]) -> bool:
        """A step with at most q new tokens per sequence, within the largest bucket, every context
        longer than q (the host-side schedule says so; the device tensors are not read)."""
        if metadata.max_query_len > self.q or metadata.num_seqs > self.batch.max_batch:
            return False                              # the common refusals, before the loop below
        return self.batch.fits(metadata, min_context_len(scheduled))

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """(T, hidden): the real rows' hidden states, in the step's order."""
        batch = next(b for b in self.buckets if b >= metadata.num_seqs)
        dest = self.batch.pack(input_ids, positions, metadata, batch)
        self._replay(batch)
        return self.output.index_select(0, dest)

    def _replay(self, batch: int) -> None:
        self.graphs[batch].replay()


# The context each timed sequence attends to in `measure_step_costs` (capped by max_model_len and the cache),
# and the replays averaged per graph after one untimed.
TIMING_CONTEXT = 1024
TIMING_REPLAYS = 3


@torch.inference_mode()
def measure_step_costs(decode: Any, verify: VerifyGraphs, num_blocks: int, block_size: int) -> StepCosts:
    """Times each verification graph against the decode graph that a plain step of the same batch
    replays (the smallest decode bucket at or above it), both over TIMING_CONTEXT tokens of context
    per sequence: the static buffers are pointed at the first blocks of the cache (every sequence
    the same ones; padding slots -1, nothing written), replayed, then set back to their captured
    padding. CUDA only (captured graphs)."""
    q = verify.q
    context = max(q + 1, min(TIMING_CONTEXT, verify.max_model_len - q, num_blocks * block_size))
    blocks = torch.arange(-(-context // block_size), device=verify.device, dtype=torch.int32) % num_blocks
    decode_s, verify_s = [], []
    for batch in verify.buckets:
        decode_batch = next(b for b in decode.buckets if b >= batch)
        decode.seq_lens[:decode_batch].fill_(context)
        decode.positions[:decode_batch].fill_(context - 1)
        decode.block_tables[:decode_batch, :blocks.numel()] = blocks
        decode_s.append(_time_replays(decode.graphs[decode_batch], verify.device))
        rows = verify.batch
        rows.seq_lens[:batch].fill_(context)
        rows.positions[:batch * q].copy_((context - q + torch.arange(q, device=verify.device)).repeat(batch))
        rows.block_tables[:batch, :blocks.numel()] = blocks
        verify_s.append(_time_replays(verify.graphs[batch], verify.device))
    decode.seq_lens.fill_(1)
    decode.positions.zero_()
    decode.block_tables.zero_()
    verify.batch.seq_lens.fill_(q)
    verify.batch.positions.zero_()
    verify.batch.block_tables.zero_()
    return StepCosts(tuple(verify.buckets), tuple(decode_s), tuple(verify_s), context)


def _time_replays(graph: Any, device: torch.device) -> float:
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(TIMING_REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3 / TIMING_REPLAYS
