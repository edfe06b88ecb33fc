"""Structured output on tiny random models: every finished output matches its constraint, whatever
else the engine does (async or sync scheduling, n > 1, seeds, preemption, mixed batches, chunked
prefill), and nothing changes for requests without one.

Random weights follow no schema by themselves, so a valid output here is the grammar mask's work.
"""
from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import pytest

from conftest import greedy, token_prompts
from pagoda.engine import SamplingParams, StructuredOutputsParams

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
POINT = {"type": "object", "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5},
                                          "kind": {"enum": ["p", "q"]}}, "required": ["x", "kind"]}
REGEX = r"[a-c]{2,4}-[0-9]{1,3}"
CHOICES = ["yes", "no", "maybe so"]
GRAMMAR = 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9] | "x"'


def check(constraint: StructuredOutputsParams, text: str) -> None:
    if constraint.json is not None:
        jsonschema.validate(json.loads(text), constraint.json)
    elif constraint.json_object:
        assert isinstance(json.loads(text), dict)
    elif constraint.regex is not None:
        assert re.fullmatch(constraint.regex, text), text
    elif constraint.choice is not None:
        assert text in constraint.choice
    else:
        assert re.fullmatch(r"\((?:[0-9]|x)(?:,(?:[0-9]|x))*\)", text), text


CONSTRAINTS = [StructuredOutputsParams(json=PERSON), StructuredOutputsParams(json=json.dumps(POINT)),
               StructuredOutputsParams(regex=REGEX), StructuredOutputsParams(choice=CHOICES),
               StructuredOutputsParams(grammar=GRAMMAR)]


def generate(llm, prompts, params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_every_finished_output_matches(make_llm, async_scheduling):
    llm = make_llm(async_scheduling=async_scheduling)
    prompts = token_prompts(len(CONSTRAINTS) * 2)
    params = []
    for i, constraint in enumerate(CONSTRAINTS * 2):
        greedy_row = i < len(CONSTRAINTS)
        params.append(SamplingParams(temperature=0.0 if greedy_row else 1.0, seed=None if greedy_row else i,
                                     n=1 if greedy_row else 2, max_tokens=None, structured_outputs=constraint))
    outputs = generate(llm, prompts, params)
    for output, param in zip(outputs, params):
        for completion in output.outputs:
            assert completion.finish_reason == "stop", (completion.text, param.structured_outputs)
            check(param.structured_outputs, completion.text)


def test_async_equals_sync_and_seeds_repeat(make_llm):
    prompts = token_prompts(4)
    params = [SamplingParams(temperature=1.0, seed=7 + i, max_tokens=80, structured_outputs=c)
              for i, c in enumerate(CONSTRAINTS[:4])]
    runs = [[c.token_ids for o in generate(make_llm(async_scheduling=a), prompts, params) for c in o.outputs]
            for a in (True, False, True)]
    assert runs[0] == runs[1] == runs[2]


def test_unconstrained_requests_unchanged_in_a_mixed_batch(make_llm):
    llm = make_llm()
    prompts = token_prompts(6)
    alone = generate(llm, prompts, greedy(24))
    mixed_params = [greedy(24) if i % 2 else SamplingParams(temperature=0.0, max_tokens=24,
                                                             structured_outputs=CONSTRAINTS[i % 5])
                    for i in range(6)]
    mixed = generate(llm, prompts, mixed_params)
    for i in range(1, 6, 2):
        assert mixed[i].outputs[0].token_ids == alone[i].outputs[0].token_ids
    for i in range(0, 6, 2):
        assert mixed[i].outputs[0].token_ids != alone[i].outputs[0].token_ids


def test_preemption_and_chunked_prefill_keep_outputs(make_llm):
    """A KV cache for about two requests, eight constrained requests: preempted requests recompute
    their tokens and go on under the same grammar state, so the outputs equal a roomy run's."""
    prompts = token_prompts(8)
    params = [SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=CONSTRAINTS[i % 5])
              for i in range(8)]
    roomy = generate(make_llm(), prompts, params)
    tight_llm = make_llm(kv_cache_memory_bytes=160 << 10, max_num_batched_tokens=32, block_size=16)
    tight = generate(tight_llm, prompts, params)
    assert tight_llm.engine.core.scheduler.num_preemptions > 0
    for a, b, p in zip(roomy, tight, params):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        if b.outputs[0].finish_reason == "stop":
            check(p.structured_outputs, b.outputs[0].text)


def test_truncated_json_finishes_with_length(make_llm):
    output = generate(make_llm(), token_prompts(1), SamplingParams(
        temperature=0.0, max_tokens=3, structured_outputs=StructuredOutputsParams(json=PERSON)))[0].outputs[0]
    assert output.finish_reason == "length" and len(output.token_ids) == 3
    with pytest.raises(ValueError):
        json.loads(output.text)


def test_ignore_eos_still_ends_when_the_grammar_is_complete(make_llm):
    output = generate(make_llm(), token_prompts(1), SamplingParams(
        temperature=0.0, max_tokens=100, ignore_eos=True,
        structured_outputs=StructuredOutputsParams(choice=CHOICES)))[0].outputs[0]
    assert output.finish_reason == "stop" and output.text in CHOICES


@pytest.mark.parametrize("constraint,message", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "structured_outputs.json is not valid"),
    (dict(regex="[a-z"), "structured_outputs.regex is not valid"),
    (dict(grammar='rot ::= "a"'), "structured_outputs.grammar is not valid"),
    (dict(grammar="root ::= "), "structured_outputs.grammar is not valid"),
])
def test_invalid_constraints_are_refused_before_queueing(make_llm, constraint, message):
    llm = make_llm()
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(llm, token_prompts(1), SamplingParams(structured_outputs=StructuredOutputsParams(**constraint)))
    assert not llm.engine.core.scheduler.requests


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "exactly one of"), (dict(regex="a", choice=["a"]), "exactly one of"),
    (dict(json="{not json"), "not valid JSON"), (dict(choice=[]), "non-empty list"),
    (dict(json=[1, 2]), "JSON schema object"),
])
def test_params_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


def test_each_schema_compiles_once(make_llm):
    llm = make_llm()
    manager = llm.engine.core.structured
    schema = {"type": "object", "properties": {"only_here": {"type": "integer"}}, "required": ["only_here"]}
    before = manager.num_compiled
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, n=3,
                            structured_outputs=StructuredOutputsParams(json=schema))
    generate(llm, token_prompts(2), params)
    generate(llm, token_prompts(2), params)
    assert manager.num_compiled - before == 1


def test_a_slow_compile_holds_up_no_other_request(make_llm, monkeypatch):
    """While one grammar compiles (slowly), requests queued behind it run to completion."""
    llm = make_llm()
    manager = llm.engine.core.structured
    release = threading.Event()
    original = manager._compile

    def slow_compile(spec):
        if "slow_one" in spec.source:
            release.wait(30)
        return original(spec)

    monkeypatch.setattr(manager, "_compile", slow_compile)
    engine = llm.engine
    slow = SamplingParams(temperature=0.0, max_tokens=30,
                          structured_outputs=StructuredOutputsParams(regex="slow_one[0-9]"))
    engine.add_request("slow", {"prompt_token_ids": token_prompts(1)[0]}, slow)
    engine.add_request("free", {"prompt_token_ids": token_prompts(2)[1]}, greedy(8))
    finished: dict[str, float] = {}
    start = time.monotonic()
    while len(finished) < 2 and time.monotonic() - start < 60:
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = time.monotonic()
        if "free" in finished and not release.is_set():
            release.set()
    assert set(finished) == {"slow", "free"} and finished["free"] < finished["slow"]


def test_constraint_starts_after_its_marker(make_llm):
    """after_token_ids: free output until the marker (forced here by a logit bias), then the grammar;
    the bias keeps pushing the marker token, which the active grammar masks out."""
    llm = make_llm()
    marker = 37
    params = SamplingParams(temperature=0.0, max_tokens=60, logit_bias={marker: 100.0},
                            structured_outputs=StructuredOutputsParams(regex=REGEX, after_token_ids=[marker]))
    output = generate(llm, token_prompts(1), params)[0].outputs[0]
    assert output.token_ids[0] == marker and marker not in output.token_ids[1:]
    assert output.finish_reason == "stop"
    tokenizer = llm.engine.tokenizer
    assert re.fullmatch(REGEX, tokenizer.decode(output.token_ids[1:], skip_special_tokens=True))
