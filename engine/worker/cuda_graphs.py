"""CUDA graphs for decode steps.

A pure-decode step (one new token per sequence) has shapes that depend only on the batch size, so
the model forward is captured once per padded batch-size bucket and replayed: one graph launch
instead of hundreds of kernel launches. Inputs live in static buffers; a batch of n sequences runs
in the smallest bucket >= n, the padding rows writing nothing (slot -1) and reading one cached
token (seq_len 1), their outputs ignored. Larger batches and mixed prefill steps run eagerly, except
speculative verification steps (a few tokens per sequence), which replay `verify_graphs.py`'s graphs.

The decode attention kernel splits each context into a fixed number of partitions during capture
(`AttentionMetadata.num_decode_splits`), so its grid does not depend on the current lengths.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from pagoda.kernels.metadata import AttentionMetadata

from ..utils import startup_timeline

logger = logging.getLogger(__name__)


def default_buckets(max_batch: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8) if b <= max_batch]
    buckets += list(range(16, max_batch + 1, 16))
    if not buckets or buckets[-1] != max_batch:
        buckets.append(max_batch)
    return sorted(set(buckets))


class DecodeGraphs:
    def __init__(self, model: Any, max_batch: int, max_blocks_per_seq: int, max_model_len: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.max_model_len = max_model_len
        self.buckets = default_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        n = self.max_batch
        # static inputs: a replay reads whatever these hold
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.output = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _metadata(self, batch: int) -> AttentionMetadata:
        from pagoda.kernels.attention_triton import num_decode_splits

        layer = self.model.attention_layers()[0]
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch], query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch], block_tables=self.block_tables[:batch],
            max_query_len=1, max_seq_len=self.max_model_len,
            num_decode_splits=num_decode_splits(batch, layer.num_kv_heads, self.max_model_len, self.device))

    @startup_timeline.span("CUDA-graph capture")
    @torch.inference_mode()
    def capture(self) -> None:
        """Captures the largest bucket first so smaller graphs reuse its memory pool."""
        for batch in reversed(self.buckets):
            metadata = self._metadata(batch)
            # warm up (Triton compiles/autotunes outside the capture)
            self.output[:batch] = self.model(self.input_ids[:batch], self.positions[:batch], metadata)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.output[:batch] = self.model(self.input_ids[:batch], self.positions[:batch], metadata)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def can_run(self, metadata: AttentionMetadata) -> bool:
        return metadata.is_decode_only and metadata.num_seqs <= self.max_batch \
            and metadata.block_tables.shape[1] <= self.block_tables.shape[1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        num_seqs = metadata.num_seqs
        batch = next(b for b in self.buckets if b >= num_seqs)
        self.input_ids[:num_seqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(metadata.slot_mapping, non_blocking=True)
        self.slot_mapping[num_seqs:batch].fill_(-1)
        self.seq_lens[:num_seqs].copy_(metadata.seq_lens, non_blocking=True)
        self.seq_lens[num_seqs:batch].fill_(1)
        width = metadata.block_tables.shape[1]
        self.block_tables[:num_seqs, :width].copy_(metadata.block_tables, non_blocking=True)
        self.graphs[batch].replay()
        return self.output[:num_seqs]
