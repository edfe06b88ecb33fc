"""OpenAI request fields -> `SamplingParams`.

A sampling field the request leaves unset takes the model's default (`--generation-config`, through
the engine client's `generation_defaults`; `GenerationDefaults.merge`), else OpenAI's (temperature 1,
top_p 1); `SamplingParams` validates the combination and its `ValueError` (naming the parameter and
value) becomes a 400. The output constraint comes from whichever of response_format /
structured_outputs / guided_* the request set (the request models allow at most one).
"""
from __future__ import annotations

from typing import Optional

from ...generation_defaults import GenerationDefaults
from ...sampling_params import SamplingParams
from ...structured_output.backend import validate
from ...structured_output.params import StructuredOutputsParams
from .errors import bad_request
from .protocol import GUIDED_FIELDS, _SamplingFields, guided_params


def structured_outputs_from(request: _SamplingFields) -> Optional[StructuredOutputsParams]:
    """The constraint the request asks its output to match, or None (also for response_format text).

    A constraint that does not compile is a 400 naming the field the request used (and its `param`)."""
    field, params = _constraint_of(request)
    if params is not None:
        check_compiles(params, field)
    return params


def check_compiles(params: StructuredOutputsParams, field: str) -> None:
    """Raises the 400 of a schema / regex / grammar the grammar engine refuses, naming `field`."""
    spec = params.spec()
    try:
        validate(spec)
    except ValueError as error:
        own = f"structured_outputs.{spec.kind}"
        message = str(error) if field == "structured_outputs" else str(error).replace(own, field, 1)
        raise bad_request(message, param=field) from None


def _constraint_of(request: _SamplingFields) -> tuple[str, Optional[StructuredOutputsParams]]:
    response_format = request.response_format
    if response_format is not None and response_format.type == "json_schema":
        assert response_format.json_schema is not None        # the request model checked it
        return "response_format", StructuredOutputsParams(json=response_format.json_schema.schema_)
    if response_format is not None and response_format.type == "json_object":
        return "response_format", StructuredOutputsParams(json_object=True)
    if request.structured_outputs is not None:
        return "structured_outputs", request.structured_outputs.to_params()
    for field in GUIDED_FIELDS:
        value = getattr(request, field)
        if value is not None:
            return field, guided_params(field, value)
    return "", None


def generation_defaults_of(client: object) -> GenerationDefaults:
    """The engine client's model defaults; NOTE: an engine client written before `generation_defaults`
    existed has none, and its requests get pagoda's own."""
    defaults = getattr(client, "generation_defaults", None)
    return defaults if isinstance(defaults, GenerationDefaults) else GenerationDefaults()


def to_sampling_params(request: _SamplingFields, max_tokens: Optional[int], logprobs: Optional[int],
                       prompt_logprobs: Optional[int] = None,
                       defaults: GenerationDefaults = GenerationDefaults()) -> SamplingParams:
    """max_tokens None = up to max_model_len (or the model's max_new_tokens, which the engine applies);
    logprobs = top-k per output token (None = off); defaults = the model's sampling defaults."""
    logit_bias = {int(token): bias for token, bias in request.logit_bias.items()} if request.logit_bias else None
    sampling = defaults.merge({"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k,
                               "min_p": request.min_p, "repetition_penalty": request.repetition_penalty})
    return SamplingParams(
        n=request.n,
        **sampling,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
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
        structured_outputs=structured_outputs_from(request),
    )
