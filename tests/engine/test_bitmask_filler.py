"""The step's token bitmask filled over threads equals the plain loop, row for row."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pagoda.engine.structured_output import backend
from pagoda.engine.structured_output.params import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}


@pytest.fixture(scope="module")
def matchers(default_tokenizer):
    """Matchers of one schema left in many different states: each accepts a different prefix."""
    vocab_size = len(default_tokenizer)
    compiler = backend.GrammarCompiler(default_tokenizer, vocab_size)
    compiled = compiler.compile(StructuredOutputsParams(json=SCHEMA).spec())
    prefixes = ['', '{', '{"name', '{"name": "a', '{"name": "abc"', '{"name": "x", "n": ', '{"name": "x", "n": 4']
    result = []
    for i in range(70):
        matcher = backend.new_matcher(compiled, {default_tokenizer.eos_token_id})
        for token in default_tokenizer.encode(prefixes[i % len(prefixes)], add_special_tokens=False):
            assert matcher.accept_token(token)
        result.append(matcher)
    return result, vocab_size


def _filled(filler, matchers, vocab_size, indices):
    bitmask = backend.allocate_bitmask(len(matchers) + 3, vocab_size)
    filler.fill(matchers, bitmask, indices)
    return bitmask.numpy().copy()


@pytest.mark.parametrize("num_threads,min_rows", [(2, 8), (3, 8), (4, 1), (4, 32)])
def test_threaded_fill_equals_the_loop(matchers, num_threads, min_rows):
    matchers, vocab_size = matchers
    indices = [i + 3 for i in range(len(matchers))]          # rows 0-2 unconstrained: left all-allowed
    expected = _filled(backend.BitmaskFiller(1), matchers, vocab_size, indices)
    filler = backend.BitmaskFiller(num_threads, min_rows_per_thread=min_rows)
    try:
        got = _filled(filler, matchers, vocab_size, indices)
    finally:
        filler.shutdown()
    np.testing.assert_array_equal(got, expected)
    assert (got[:3] == -1).all()                               # untouched rows still allow everything
    assert len({row.tobytes() for row in got[3:]}) > 3          # the states differ: a real comparison


def test_filler_rejects_zero_threads_and_defaults_within_bounds():
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        backend.BitmaskFiller(0)
    assert 1 <= backend.BitmaskFiller.default_threads() <= 4
