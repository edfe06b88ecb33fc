"""The Ray executor drives TP worker actors step by step exactly as the multiproc executor drives
processes: with async scheduling and with grammars (the bitmask goes to rank 0's actor alone, after
the forward pass was launched), a TP=2 engine core on Ray gives the single-process outputs."""
from __future__ import annotations

import json
import re

import pytest

from model_factory import TinyModelSpec
from pagoda.engine import EngineArgs, SamplingParams, StructuredOutputsParams
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.llm_engine import load_text_side
from pagoda.engine.processing.input_processor import InputProcessor

SPEC = TinyModelSpec(family="llama", num_attention_heads=2, num_key_value_heads=2)
REGEX = r"[a-e]{2,5}=[0-9]{1,2}"
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=3, max_tokens=40, structured_outputs=StructuredOutputsParams(regex=REGEX)),
    SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=StructuredOutputsParams(
        json={"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"]})),
]


def run(config, executor_class=None) -> list[list[int]]:
    tokenizer, eos = load_text_side(config)
    core = EngineCore(config, executor_class)
    try:
        processor = InputProcessor(config, tokenizer, eos)
        for index, params in enumerate(PARAMS):
            core.add_requests(processor.process(f"r{index}", f"Once upon a time {index}", params).core_requests)
        tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PARAMS))}
        while core.has_unfinished_requests():
            for output in core.step():
                tokens[output.request_id] += output.new_token_ids
        return [tokens[f"r{i}"] for i in range(len(PARAMS))], tokenizer
    finally:
        core.shutdown()


def test_ray_tp2_with_grammars_equals_one_process(ray_cluster, tiny_checkpoint):
    pytest.importorskip("ray")
    from pagoda.cluster.ray_executor import RayExecutor

    path = str(tiny_checkpoint(SPEC))
    common = dict(model=path, kv_cache_memory_bytes=1 << 22, async_scheduling=True)
    expected, tokenizer = run(EngineArgs(**common).create_config())
    actual, _ = run(EngineArgs(tensor_parallel_size=2, distributed_executor_backend="ray", **common).create_config(),
                    RayExecutor)
    assert actual == expected
    assert re.fullmatch(REGEX, tokenizer.decode(actual[1], skip_special_tokens=True))
    assert json.loads(tokenizer.decode(actual[2], skip_special_tokens=True))["k"] in ("x", "y")
