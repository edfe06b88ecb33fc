"""cluster/wire.py: the delta stream a replica sends rebuilds the engine's RequestOutputs exactly."""
from __future__ import annotations

import copy
import pickle

import pytest

from pagoda.cluster.wire import OutputDecoder, OutputEncoder, ReplicaReport
from pagoda.engine import SamplingParams
from pagoda.engine.config import EngineArgs
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.outputs import EngineStats


@pytest.fixture(scope="module")
def engine(tiny_model) -> LLMEngine:
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model), device="cpu",
                                                   kv_cache_memory_bytes=16 << 20, max_num_batched_tokens=24))
    yield engine
    engine.shutdown()


def _stream(engine: LLMEngine, prompt, params: SamplingParams) -> list:
    """Every RequestOutput of one request, snapshotted as it was produced (later steps mutate lists)."""
    engine.add_request("r", prompt, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [copy.deepcopy(output) for output in engine.step() if output.request_id == "r"]
    return outputs


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=10, ignore_eos=True, logprobs=2),
    # A chunked prompt (24 tokens per step) with prompt logprobs, and a stop string held back mid-stream.
    SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=1, stop=["e"]),
], ids=["greedy", "n3-logprobs", "prompt-logprobs-stop"])
def test_decoder_rebuilds_every_output_exactly(engine, params):
    prompt = "Once upon a time there was a tiny model that lived in a test suite. " * 2
    originals = _stream(engine, prompt, params)
    assert len(originals) > 2
    encoder, decoder = OutputEncoder(), OutputDecoder()
    for original in originals:
        wire = pickle.loads(pickle.dumps(encoder.encode(original)))   # what crosses Ray
        assert decoder.decode(wire) == original


def test_wire_output_carries_only_deltas_after_the_first(engine):
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    originals = _stream(engine, list(range(3, 60)), params)
    encoder = OutputEncoder()
    wires = [encoder.encode(output) for output in originals]
    assert wires[0].prompt_token_ids == list(range(3, 60))
    for wire in wires[1:]:
        assert wire.prompt_token_ids is None
        [completion] = wire.completions
        assert completion.token_ids is None and completion.text is None
        assert len(completion.delta_token_ids) >= 1
    assert sum(len(pickle.dumps(w)) for w in wires) < sum(len(pickle.dumps(o)) for o in originals)


def test_report_round_trips_through_builtins():
    report = ReplicaReport(replica_id="abc", model_name="m",
                           stats=EngineStats(num_running=2, num_waiting=3, kv_cache_usage=0.5, prefix_cache_queries=10,
                                             prefix_cache_hits=4),
                           prefix_hashes=[1, 2, 3], healthy=True, metrics=b"x 1\n", reported_at=12.5)
    routing_stats = report.to_routing_stats()
    assert _builtins_only(routing_stats)
    assert ReplicaReport.from_routing_stats(routing_stats) == report
    assert report.load == 5 and report.prefix_cache_hit_rate == 0.4
    assert ReplicaReport.from_routing_stats({}) is None and ReplicaReport.from_routing_stats(None) is None


def _builtins_only(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _builtins_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_builtins_only(v) for v in value)
    return isinstance(value, (str, int, float, bool, bytes, type(None)))


def test_held_back_text_is_sent_whole_when_deltas_do_not_add_up():
    # A detokenizer holding back a possible stop string: text runs ahead of what was streamed.
    from pagoda.engine.outputs import CompletionOutput, RequestOutput

    def output(text, delta, token_ids, delta_ids, finished=False):
        completion = CompletionOutput(index=0, text=text, token_ids=token_ids, cumulative_logprob=None, logprobs=None,
                                      finish_reason="stop" if finished else None, delta_text=delta,
                                      delta_token_ids=delta_ids)
        return RequestOutput("r", "p", [1, 2], None, [completion], finished)

    originals = [output("ab", "a", [5], [5]), output("abc", "", [5, 6], [6]), output("ab", "b", [5, 6, 7], [7], True)]
    encoder, decoder = OutputEncoder(), OutputDecoder()
    wires = [encoder.encode(o) for o in originals]
    assert [w.completions[0].text for w in wires] == ["ab", "abc", "ab"]
    assert [decoder.decode(w) for w in wires] == originals
