"""One step's device inputs, and the host-side state that builds them fast.

- `StepInputs`: what `ModelRunner._prepare_inputs` hands the forward pass and the sampler, with the
  `PromptRows` of each request asking for prompt logprobs and the async `Placeholders`.
- `BlockTable`: one row per live request (rows reused as requests come and go), holding its KV block
  ids, so a step's block tables and slot mapping are numpy gathers rather than per-request loops.
- `SamplingLayout`: which sampling rows each request owns (one, or one per draft position and one
  more when it verifies drafts).
- `PinnedStaging`: persistent pinned host buffers; a step's arrays are copied in and sent to the
  device with non-blocking copies. NOTE: reusing a staging buffer is safe because every step ends
  with a device-to-host read of the sampled tokens, which orders it after the previous copies.

    block_table row r: [ 7  2  9  0  0 ...]   (request with 3 blocks, block_size 16)
    position 37 -> block_table[r, 37 // 16] * 16 + 37 % 16 = 9 * 16 + 5 = slot 149
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

from pagoda.kernels.metadata import AttentionMetadata

from ..step import ScheduledRequest


class PromptRows(NamedTuple):
    """Where one request's prompt-logprob rows sit among the step's logits rows."""

    first_row: int          # its first row of `logits` (an index into `logits_indices`)
    num_rows: int           # prompt positions scored this step (0 when the chunk scores none)
    first_position: int     # prompt position of the first row's token (its num_computed_tokens)


class Placeholders(NamedTuple):
    """Input ids the previous step sampled on the device (async scheduling): input_ids[dst] is
    filled from that step's sampled ids[src] on the device, without a host round trip."""

    dst: torch.Tensor       # (n,) int64: rows of input_ids that hold a placeholder
    src: torch.Tensor       # (n,) int64: rows of the previous step's sampled ids


@dataclass
class StepInputs:
    """The flattened batch on the device (see model_runner.py's diagram); built once per step."""

    input_ids: torch.Tensor                 # (num_tokens,) int64; placeholder rows hold 0 until filled
    positions: torch.Tensor                 # (num_tokens,) int64
    metadata: AttentionMetadata             # slot mapping, query_start_loc, seq_lens, block tables
    logits_indices: torch.Tensor            # (num_logits_rows,) int64: hidden rows for the LM head,
                                            # per request its prompt rows, then its sampled row
    prompt_rows: dict[str, PromptRows]      # request id -> its prompt-logprob rows; {} when none asks
    placeholders: Optional[Placeholders]    # None unless the step reads last step's device samples


@dataclass
class SamplingLayout:
    """The step's sampling rows, request by request in scheduled order: a plain request samples one
    row (its last token's), a request verifying K drafts samples 1 + K rows (its last token's, then
    each draft's: row j predicts the token after draft j)."""

    request_ids: list[str]
    first_rows: list[int]                   # each request's first sampling row
    num_spec: list[int]                     # each request's drafts (0 = plain)
    num_rows: int

    @classmethod
    def of(cls, scheduled: list[ScheduledRequest]) -> "SamplingLayout":
        request_ids, first_rows, num_spec, num_rows = [], [], [], 0
        for item in scheduled:
            if item.sample:
                request_ids.append(item.request_id)
                first_rows.append(num_rows)
                num_spec.append(item.num_spec_tokens)
                num_rows += 1 + item.num_spec_tokens
        return cls(request_ids, first_rows, num_spec, num_rows)

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        return zip(self.request_ids, self.first_rows, self.num_spec)

    def plain_rows(self) -> dict[str, int]:
        """request id -> its row, for the requests that sampled one token (the only ones a next
        step can read a placeholder from: a verifying step is resolved before the next is scheduled)."""
        return {r: first for r, first, k in self if not k}


class BlockTable:
    def __init__(self, max_rows: int, max_blocks_per_row: int) -> None:
        self.table = np.zeros((max_rows, max_blocks_per_row), dtype=np.int32)
        self.num_blocks = np.zeros(max_rows, dtype=np.int64)
        self.free_rows = list(range(max_rows - 1, -1, -1))

    def add_row(self) -> int:
        if not self.free_rows:
            raise RuntimeError("block table full: more live requests than max_num_seqs")
        row = self.free_rows.pop()
        self.num_blocks[row] = 0
        return row

    def free_row(self, row: int) -> None:
        self.free_rows.append(row)

    def append(self, row: int, block_ids: list[int]) -> None:
        if block_ids:
            start = self.num_blocks[row]
            self.table[row, start:start + len(block_ids)] = block_ids
            self.num_blocks[row] = start + len(block_ids)


class PinnedStaging:
    """Named 1-D pinned buffers that grow on demand (CPU tensors stay unpinned off CUDA).

    Two sets, alternating per step: with async scheduling, step N+1's inputs are staged while
    step N's host-to-device copies may still be queued. `begin_step` waits (normally a no-op) for
    the copies that last used the set it switches to; `end_step` marks this step's copies.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pin = device.type == "cuda"
        self.sets: list[dict[str, torch.Tensor]] = [{}, {}]
        self.events: list = [None, None]
        self.current = 0

    def begin_step(self) -> None:
        self.current ^= 1
        event = self.events[self.current]
        if event is not None:
            event.synchronize()

    def end_step(self) -> None:
        if self.pin:
            event = torch.cuda.Event()
            event.record()
            self.events[self.current] = event

    def to_device(self, name: str, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        flat = np.ascontiguousarray(array).reshape(-1)
        if not self.pin:
            return torch.from_numpy(flat.copy()).to(dtype).reshape(array.shape)
        buffers = self.sets[self.current]
        buffer = buffers.get(name)
        if buffer is None or buffer.numel() < flat.size or buffer.dtype != dtype:
            buffer = torch.empty(max(flat.size, 1024) * 2, dtype=dtype, pin_memory=True)
            buffers[name] = buffer
        staged = buffer[: flat.size]
        staged.numpy()[:] = flat
        return staged.to(self.device, non_blocking=True).reshape(array.shape)
