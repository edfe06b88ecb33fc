"""Turns the core's token-id outputs into vLLM-shaped `RequestOutput`s: text, stop strings,
logprobs and the n completions of one prompt gathered back into one output.

Runs outside the engine step (in the caller's thread for the offline API, on the asyncio side for
the server), so detokenization never sits on the model's critical path. A stop string found here
finishes the completion; the caller aborts it in the core.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ..outputs import CompletionOutput, EngineCoreOutput, Logprob, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams
from .detokenizer import IncrementalDetokenizer


@dataclass
class CompletionState:
    index: int
    detokenizer: Optional[IncrementalDetokenizer]
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None
    sent_text_len: int = 0
    sent_token_len: int = 0
    error: Optional[str] = None


@dataclass
class RequestState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: dict[str, CompletionState]          # core (child) request id -> state
    metrics: RequestMetrics
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions.values())


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, child_ids: list[str], arrival_time: float) -> None:
        completions = {}
        for index, child_id in enumerate(child_ids):
            detokenizer = None
            if self.tokenizer is not None and params.detokenize:
                detokenizer = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, params.stop, params.include_stop_str_in_output,
                    params.skip_special_tokens, params.min_tokens)
            completions[child_id] = CompletionState(
                index=index, detokenizer=detokenizer,
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None)
            self.child_to_parent[child_id] = request_id
        self.requests[request_id] = RequestState(
            request_id, prompt, prompt_token_ids, params, completions, RequestMetrics(arrival_time),
            prompt_logprobs=[] if params.prompt_logprobs is not None else None)

    def has(self, request_id: str) -> bool:
        return request_id in self.requests

    def child_ids(self, request_id: str) -> list[str]:
        state = self.requests.get(request_id)
        return list(state.completions) if state else []

    def _to_logprobs(self, entry: Optional[dict[int, float]]) -> Optional[dict[int, Logprob]]:
        if entry is None:
            return None
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])
        out = {}
        for rank, (token, value) in enumerate(ranked, start=1):
            decoded = self.tokenizer.decode([token]) if self.tokenizer is not None else None
            out[token] = Logprob(value, rank, decoded)
        return out

    def process(self, core_outputs: list[EngineCoreOutput],
                finished_only: bool = False) -> tuple[list[RequestOutput], list[str]]:
        """Returns the outputs of requests that changed (only finished ones with `finished_only`,
        which spares the offline API building a snapshot of every request every step), and core
        ids to abort (stop strings)."""
        touched: dict[str, RequestState] = {}
        to_abort: list[str] = []
        now = time.monotonic()
        for out in core_outputs:
            parent_id = self.child_to_parent.get(out.request_id)
            if parent_id is None:
                continue
            state = self.requests[parent_id]
            completion = state.completions[out.request_id]
            if completion.finish_reason is not None:
                continue
            touched[parent_id] = state
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            if state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = out.first_scheduled_time
            if out.new_prompt_logprobs is not None and state.prompt_logprobs is not None \
                    and completion.index == 0:
                start, entries = out.new_prompt_logprobs
                del state.prompt_logprobs[start:]
                state.prompt_logprobs.extend(self._to_logprobs(e) for e in entries)
            if out.new_token_ids:
                if state.metrics.first_token_time is None:
                    state.metrics.first_token_time = now
                state.metrics.last_token_time = now
                completion.token_ids.extend(out.new_token_ids)
                if completion.logprobs is not None and out.new_logprobs:
                    for token, entry in zip(out.new_token_ids, out.new_logprobs):
                        completion.logprobs.append(self._to_logprobs(entry) or {})
                        completion.cumulative_logprob += entry[token]
                if completion.detokenizer is not None:
                    stop = completion.detokenizer.add_tokens(out.new_token_ids)
                    if stop is not None and out.finish_reason is None:
                        completion.finish_reason = "stop"
                        completion.stop_reason = stop
                        to_abort.append(out.request_id)
            if out.finish_reason is not None and completion.finish_reason is None:
                completion.finish_reason = out.finish_reason
                completion.stop_reason = out.stop_reason
                completion.error = out.error
            elif completion.finish_reason == "stop" and completion.detokenizer is not None \
                    and completion.detokenizer.stop_reason is not None:
                completion.stop_reason = completion.detokenizer.stop_reason
        results = []
        for parent_id, state in touched.items():
            if finished_only and not state.finished:
                continue
            results.append(self._make_output(state, now))
            if state.finished:
                self._forget(parent_id)
        return results, to_abort

    def _make_output(self, state: RequestState, now: float) -> RequestOutput:
        finished = state.finished
        if finished:
            state.metrics.finished_time = now
        outputs = []
        errors = []
        for completion in state.completions.values():
            detok = completion.detokenizer
            text = detok.text if detok is not None else ""
            sendable = detok.streamable_text(completion.finish_reason is not None) if detok else ""
            delta_text = sendable[completion.sent_text_len:]
            completion.sent_text_len = max(completion.sent_text_len, len(sendable))
            delta_ids = completion.token_ids[completion.sent_token_len:]
            delta_logprobs = (completion.logprobs[completion.sent_token_len:]
                              if completion.logprobs is not None else None)
            completion.sent_token_len = len(completion.token_ids)
            output = CompletionOutput(
                index=completion.index, text=text, token_ids=list(completion.token_ids),
                cumulative_logprob=completion.cumulative_logprob, logprobs=completion.logprobs,
                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
                delta_text=delta_text, delta_token_ids=delta_ids, delta_logprobs=delta_logprobs)
            outputs.append(output)
            if completion.error:
                errors.append(completion.error)
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt, prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=state.prompt_logprobs, outputs=outputs, finished=finished,
            num_cached_tokens=state.num_cached_tokens, metrics=state.metrics,
            error="; ".join(errors) if errors else None)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """Marks every unfinished completion of the request aborted and returns its final output."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        for completion in state.completions.values():
            if completion.finish_reason is None:
                completion.finish_reason = "abort"
        output = self._make_output(state, time.monotonic())
        self._forget(request_id)
        return output

    def _forget(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            for child_id in state.completions:
                self.child_to_parent.pop(child_id, None)
