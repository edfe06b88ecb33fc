"""merge_outputs: two consecutive outputs of one request become one, deltas in order, nothing lost."""
from __future__ import annotations

import pytest

from pagoda.engine.outputs import CompletionOutput, Logprob, RequestOutput, merge_outputs


def completion(index: int, token_ids: list[int], new: int, text: str, new_text: str, logprobs: bool = False,
               finish_reason=None) -> CompletionOutput:
    entries = [{t: Logprob(-0.5, 1)} for t in token_ids] if logprobs else None
    return CompletionOutput(index=index, text=text, token_ids=list(token_ids), cumulative_logprob=-0.5 * len(token_ids)
                            if logprobs else None, logprobs=entries, finish_reason=finish_reason,
                            delta_text=new_text, delta_token_ids=list(token_ids[-new:]) if new else [],
                            delta_logprobs=entries[-new:] if entries is not None and new else ([] if logprobs else None))


def output(completions: list[CompletionOutput], finished: bool = False, request_id: str = "r") -> RequestOutput:
    return RequestOutput(request_id=request_id, prompt="p", prompt_token_ids=[1], prompt_logprobs=None,
                         outputs=completions, finished=finished)


def test_deltas_concatenate_and_cumulative_fields_come_from_the_later_output():
    first = output([completion(0, [5, 6], 2, "ab", "ab", logprobs=True), completion(1, [7], 1, "c", "c", logprobs=True)])
    second = output([completion(0, [5, 6, 8], 1, "abd", "d", logprobs=True),
                     completion(1, [7, 9], 1, "ce", "e", logprobs=True, finish_reason="length")])
    merged = merge_outputs(first, second)
    assert [c.index for c in merged.outputs] == [0, 1]
    zero, one = merged.outputs
    assert (zero.delta_token_ids, zero.delta_text, zero.token_ids, zero.text) == ([5, 6, 8], "abd", [5, 6, 8], "abd")
    assert (one.delta_token_ids, one.delta_text, one.finish_reason) == ([7, 9], "ce", "length")
    assert [list(entry) for entry in zero.delta_logprobs] == [[5], [6], [8]]
    assert zero.cumulative_logprob == second.outputs[0].cumulative_logprob
    # the inputs are untouched (the engine may still hold them)
    assert first.outputs[0].delta_token_ids == [5, 6] and second.outputs[0].delta_token_ids == [8]


def test_a_completion_missing_from_the_later_output_keeps_its_news():
    first = output([completion(0, [5], 1, "a", "a"), completion(1, [7], 1, "c", "c")])
    second = output([completion(1, [7, 9], 1, "ce", "e")])
    merged = merge_outputs(first, second)
    assert [(c.index, c.delta_token_ids) for c in merged.outputs] == [(0, [5]), (1, [7, 9])]


def test_merging_past_a_finished_output_or_across_requests_is_refused():
    done = output([completion(0, [5], 1, "a", "a", finish_reason="stop")], finished=True)
    with pytest.raises(ValueError, match="finished"):
        merge_outputs(done, output([completion(0, [5, 6], 1, "ab", "b")]))
    with pytest.raises(ValueError, match="different requests"):
        merge_outputs(output([], request_id="a"), output([], request_id="b"))
