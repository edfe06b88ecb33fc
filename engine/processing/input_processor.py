"""Validates and tokenizes a request before it reaches the engine core.

Accepted prompts: a string, `{"prompt": str}`, `{"prompt_token_ids": [...]}` or a list of token
ids. Every bad input raises `ValueError` naming the parameter and the value; nothing is queued.
A request with n > 1 becomes n core requests ("<id>#<i>") that share the prompt's KV blocks.
"""
from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..config import EngineConfig
from ..core.request import Request
from ..sampling_params import SamplingParams

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
        self._arrival_counter = itertools.count()

    def tokenize_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("prompt must not be empty, got ''")
            if self.tokenizer is None:
                raise ValueError("the engine was started with skip_tokenizer_init=True: pass prompt_token_ids")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def process(self, request_id: Optional[str], prompt: PromptType, params: Optional[SamplingParams],
                priority: int = 0) -> ProcessedRequest:
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        text, token_ids = self.tokenize_prompt(prompt)
        self.validate_token_ids(token_ids)
        params.verify_token_ids(self.config.model.vocab_size)
        max_model_len = self.config.model.max_model_len
        room = max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
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

    def validate_token_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt must not be empty, got 0 tokens")
        vocab = self.config.model.vocab_size
        for token in token_ids:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise ValueError(f"prompt token id {token!r} is outside the vocabulary [0, {vocab})")
        max_model_len = self.config.model.max_model_len
        if len(token_ids) >= max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens, but max_model_len is {max_model_len}: the prompt "
                f"must be shorter than max_model_len to leave room for output")
