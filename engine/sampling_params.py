"""Per-request sampling parameters, named and validated as in vLLM so users can switch.

Validation raises `ValueError` naming the parameter and the bad value; it runs when the object is
built, so a bad request is refused before it reaches the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .structured_output.params import StructuredOutputsParams

_SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    n: int = 1                                   # completions per prompt (share the prompt's KV blocks)
    temperature: float = 1.0                     # 0 = greedy
    top_p: float = 1.0                           # nucleus mass in (0, 1]
    top_k: int = 0                               # 0 or -1 = all tokens
    min_p: float = 0.0                           # drop tokens below min_p * p(max)
    presence_penalty: float = 0.0                # [-2, 2], OpenAI semantics
    frequency_penalty: float = 0.0               # [-2, 2], OpenAI semantics
    repetition_penalty: float = 1.0              # > 0, CTRL semantics over prompt + output tokens
    logit_bias: Optional[dict[int, float]] = None
    seed: Optional[int] = None                   # same output whatever else is in the batch
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    max_tokens: Optional[int] = 16               # None = up to max_model_len
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: Optional[int] = None               # top-k logprobs per generated token (plus the sampled one)
    prompt_logprobs: Optional[int] = None        # top-k logprobs per prompt token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    # the output must match a JSON schema / regex / choice / grammar (None = free text)
    structured_outputs: Optional[StructuredOutputsParams] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        self._verify()

    def _verify(self) -> None:
        def bad(name: str, value: object, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {value!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", self.n, "an integer >= 1")
        if self.temperature < 0.0:
            raise bad("temperature", self.temperature, ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "in (0, 1]")
        if not isinstance(self.top_k, int):
            raise bad("top_k", self.top_k, "an integer (0 or -1 disables it)")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", self.presence_penalty, "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        if self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty", self.repetition_penalty, "> 0")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                f"and max_tokens={self.max_tokens}"
            )
        for s in self.stop:
            if not isinstance(s, str) or s == "":
                raise bad("stop", s, "a non-empty string")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0:
                raise bad("stop_token_ids", t, "non-negative integers")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise bad("logprobs", self.logprobs, "an integer >= 0")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int) or self.prompt_logprobs < 0
        ):
            raise bad("prompt_logprobs", self.prompt_logprobs, "an integer >= 0")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", self.seed, "an integer")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise bad("structured_outputs", self.structured_outputs, "a StructuredOutputsParams")
        if self.logit_bias:
            for token, bias in self.logit_bias.items():
                if not isinstance(token, int) or token < 0:
                    raise bad("logit_bias key", token, "a non-negative token id")
                if not -100.0 <= float(bias) <= 100.0:
                    raise bad(f"logit_bias[{token}]", bias, "in [-100, 100]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def verify_token_ids(self, vocab_size: int) -> None:
        """Checks the token ids this request names against the model's vocabulary."""
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise ValueError(f"stop_token_ids contains {t}, outside the vocabulary [0, {vocab_size})")
        for t in self.logit_bias or {}:
            if t >= vocab_size:
                raise ValueError(f"logit_bias names token {t}, outside the vocabulary [0, {vocab_size})")

    def clone_for_child(self, index: int) -> "SamplingParams":
        """Parameters of the index-th of n completions: n=1, and a distinct seed when one is set."""
        from dataclasses import replace

        return replace(self, n=1, seed=None if self.seed is None else self.seed + index)
