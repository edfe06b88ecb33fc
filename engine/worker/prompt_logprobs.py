"""Prompt logprobs: for each prompt token, the distribution (its logprob and the top-k) that the
model's output at the token before it gave, from the logits rows of the step's prefill chunks.

Per request the result is (prompt index of the first entry, entries); entry i is the distribution that
predicted prompt token i (None for token 0), so a chunk recomputed after a preemption overwrites the
same indices instead of duplicating them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from .step_inputs import PromptRows


def prompt_logprobs(logits: torch.Tensor, prompt_rows: dict[str, PromptRows],
                    requests: Mapping[str, Any]) -> dict[str, tuple[int, list]]:
    """logits: (rows, V) of the step; prompt_rows: where each request's prompt rows are; requests: the
    runner's request states (their prompt token ids and sampling params), by id."""
    result: dict[str, tuple[int, list]] = {}
    for request_id, (first_row, count, start) in prompt_rows.items():
        state = requests.get(request_id)
        if state is None:
            continue
        if count == 0:
            result[request_id] = (0, [None]) if start == 0 else (start + 1, [])
            continue
        k = state.data.sampling_params.prompt_logprobs or 0
        prompt = state.data.prompt_token_ids
        logprobs = torch.log_softmax(logits[first_row:first_row + count], dim=-1)   # (count, V)
        targets = torch.tensor(prompt[start + 1:start + 1 + count], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
        top_vals, top_ids = (logprobs.topk(k, dim=-1) if k else (None, None))
        entries: list[Optional[dict[int, float]]] = [None] if start == 0 else []
        for j in range(count):
            entry: dict[int, float] = {}
            if top_ids is not None:
                entry.update(zip(top_ids[j].tolist(), top_vals[j].tolist()))
            entry[prompt[start + 1 + j]] = chosen[j]
            entries.append(entry)
        result[request_id] = (0 if start == 0 else start + 1, entries)
    return result
