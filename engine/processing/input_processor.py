"""Validates and tokenizes a request before it reaches the engine core.

Accepted prompts: a string, `{"prompt": str}`, `{"prompt_token_ids": [...]}` or a list of token
ids. Every bad input raises `ValueError` naming the parameter and the value; nothing is queued.
A request with n > 1 becomes n core requests ("<id>#<i>") that share the prompt's KV blocks.

Lengths are checked here, where the prompt is tokenized, so the offline `LLM`, the `AsyncEngine`
and every server behind it refuse the same requests (as vLLM's and OpenAI's servers do):

    prompt tokens >= max_model_len              ContextLengthExceededError (no room for output)
    prompt tokens + max_tokens > max_model_len  ContextLengthExceededError, naming both and the limit
    max_tokens None                             what fits: max_model_len - prompt tokens

The cheap checks come first: a text prompt with more characters than max_model_len tokens can hold
(`prompt_chars_limit`) is refused before it is tokenized, and a token-id prompt's length before its
ids are read. `process_async` tokenizes a long text on the `TokenizerThread`, off the event loop.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..config import EngineConfig
from ..core.request import Request
from ..sampling_params import SamplingParams
from .tokenizer import (ContextLengthExceededError, TokenizerThread, check_text_fits, encode_text,
                        prompt_chars_limit)

PromptType = Union[str, dict, list]


@dataclass
class ProcessedRequest:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    core_requests: list[Request]
    arrival_time: float


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Any, eos_token_ids: frozenset[int]) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_prompt_chars = prompt_chars_limit(tokenizer, config.model.max_model_len)
        self.tokenizer_thread = TokenizerThread("pagoda-tokenizer")
        self._arrival_counter = itertools.count()

    def process(self, request_id: Optional[str], prompt: PromptType, params: Optional[SamplingParams],
                priority: int = 0) -> ProcessedRequest:
        params = self._check_params(params, priority)
        text, token_ids = self._split_prompt(prompt)
        if text is not None:
            token_ids = encode_text(self.tokenizer, text)
        assert token_ids is not None
        return self._build(request_id, text, token_ids, params, priority)

    async def process_async(self, request_id: Optional[str], prompt: PromptType, params: Optional[SamplingParams],
                            priority: int = 0) -> ProcessedRequest:
        """`process` for an event loop: a long text prompt is tokenized on the worker thread."""
        params = self._check_params(params, priority)
        text, token_ids = self._split_prompt(prompt)
        if text is not None:
            token_ids = await self.tokenizer_thread.run(encode_text, self.tokenizer, text, size=len(text))
        assert token_ids is not None
        return self._build(request_id, text, token_ids, params, priority)

    # -- the steps -----------------------------------------------------------------------------------
    def _check_params(self, params: Optional[SamplingParams], priority: int) -> SamplingParams:
        # a request that brings no parameters samples with the model's defaults (generation_config.json)
        params = params if params is not None else self.config.model.generation_defaults.sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        vocab = self.config.model.vocab_size
        params.verify_token_ids(vocab)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > vocab:
                raise ValueError(f"{name} must be at most the vocabulary size {vocab}, got {value}")
        if params.structured_outputs is not None:
            # a schema, regex or grammar that cannot compile is refused here, before anything is queued
            from ..structured_output.backend import validate

            validate(params.structured_outputs.spec())
        if params.top_k >= vocab:
            # NOTE: the sampler builds a tensor of the k's: an int64 overflow there would fail the
            # step, and with it the engine. k >= vocab keeps every token, as 0 does.
            params = dataclasses.replace(params, top_k=0)
        return params

    def _split_prompt(self, prompt: PromptType) -> tuple[Optional[str], Optional[list[int]]]:
        """(text, None) for a text prompt, (None, token ids) for ids; only the O(1) checks and the
        character bound run here, so nothing costly happens for a prompt that cannot fit."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
                if not isinstance(prompt, (list, tuple)):
                    raise ValueError(f"prompt_token_ids must be a list of token ids, got {type(prompt).__name__}")
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("prompt must not be empty, got ''")
            if self.tokenizer is None:
                raise ValueError("the engine was started with skip_tokenizer_init=True: pass prompt_token_ids")
            check_text_fits("prompt", len(prompt), self.max_prompt_chars, self.config.model.max_model_len)
            return prompt, None
        if isinstance(prompt, (list, tuple)):
            self._check_prompt_length(len(prompt))
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def _build(self, request_id: Optional[str], text: Optional[str], token_ids: list[int], params: SamplingParams,
               priority: int) -> ProcessedRequest:
        self.validate_token_ids(token_ids)
        max_tokens = self.output_budget(len(token_ids), params.max_tokens)
        request_id = request_id or uuid.uuid4().hex
        arrival = time.monotonic()
        banned = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids)))
        salt = None
        if params.n > 1 and not self.config.cache.enable_prefix_caching:
            salt = f"n-group:{request_id}:{uuid.uuid4().hex}"
        core_requests = []
        for index in range(params.n):
            child_params = params.clone_for_child(index) if params.n > 1 else params
            core_requests.append(Request(
                request_id=f"{request_id}#{index}" if params.n > 1 else request_id,
                prompt_token_ids=token_ids,
                sampling_params=child_params,
                eos_token_ids=self.eos_token_ids,
                max_tokens=max_tokens,
                arrival_time=arrival,
                priority=priority,
                arrival_seq=next(self._arrival_counter),
                cache_salt=salt,
                seed=child_params.seed,
                min_tokens_banned_ids=banned,
            ))
        return ProcessedRequest(request_id, text, token_ids, params, core_requests, arrival)

    # -- the checks ----------------------------------------------------------------------------------
    def validate_token_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt must not be empty, got 0 tokens")
        self._check_prompt_length(len(token_ids))
        vocab = self.config.model.vocab_size
        if set(map(type, token_ids)) <= {int} and min(token_ids) >= 0 and max(token_ids) < vocab:
            return                            # the common case, checked in C
        for token in token_ids:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise ValueError(f"prompt token id {token!r} is outside the vocabulary [0, {vocab})")

    def _check_prompt_length(self, num_prompt_tokens: int) -> None:
        max_model_len = self.config.model.max_model_len
        if num_prompt_tokens >= max_model_len:
            raise ContextLengthExceededError(
                f"prompt has {num_prompt_tokens} tokens, but max_model_len is {max_model_len}: the prompt "
                f"must be shorter than max_model_len to leave room for output")

    def output_budget(self, num_prompt_tokens: int, max_tokens: Optional[int]) -> int:
        """The most tokens the request may generate.

        Invariant: num_prompt_tokens + budget <= max_model_len. A max_tokens that does not fit is
        refused (never silently cut), as vLLM and OpenAI do; None means whatever fits.
        """
        max_model_len = self.config.model.max_model_len
        room = max_model_len - num_prompt_tokens
        if max_tokens is None:
            # NOTE: the model's max_new_tokens (generation_config.json) bounds a request that set no
            # max_tokens, as vLLM's default max_tokens; never beyond the room the prompt leaves
            return self.config.model.generation_defaults.output_budget(room)
        if max_tokens > room:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} in "
                f"the completion). Please reduce the length of the messages or completion. (max_tokens may be "
                f"at most {room} for this prompt.)")
        return max_tokens
