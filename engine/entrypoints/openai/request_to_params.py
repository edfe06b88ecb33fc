"""OpenAI request fields -> `SamplingParams`.

OpenAI's defaults where a field is absent (temperature 1, top_p 1); `SamplingParams` validates the
combination and its `ValueError` (naming the parameter and value) becomes a 400.
"""
from __future__ import annotations

from typing import Optional

from ...sampling_params import SamplingParams
from .protocol import _SamplingFields


def to_sampling_params(request: _SamplingFields, max_tokens: Optional[int], logprobs: Optional[int],
                       prompt_logprobs: Optional[int] = None) -> SamplingParams:
    """max_tokens None = up to max_model_len; logprobs = top-k per output token (None = off)."""
    logit_bias = {int(token): bias for token, bias in request.logit_bias.items()} if request.logit_bias else None
    return SamplingParams(
        n=request.n,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=0 if request.top_k is None else request.top_k,
        min_p=0.0 if request.min_p is None else request.min_p,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
        logit_bias=logit_bias,
        seed=request.seed,
        stop=request.stop,
        stop_token_ids=request.stop_token_ids,
        max_tokens=max_tokens,
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=request.skip_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
    )
