"""bench/perplexity.py: the text, its windows, the variants, and a score on a tiny model."""
from __future__ import annotations

import math

import pytest
from model_factory import save_tiny_model

from bench import perplexity


def test_the_text_is_in_the_repo_with_its_licence_note():
    text = perplexity.TEXT.read_text(encoding="utf-8")
    assert text.startswith("THE SONNETS") and len(text.split()) > 3000
    assert "public domain" in (perplexity.TEXT.parent / "README.md").read_text()


def test_windows_cover_the_text_and_drop_a_lone_last_token():
    ids = list(range(10))
    assert perplexity.windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert perplexity.windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]      # [8] predicts nothing


def test_variants_and_bad_arguments():
    args = perplexity.parse_args(["--variants", "unquantized,fp8", "--extra", "int4=/some/dir"])
    assert [(name, options) for name, _, options in args.variant_list] == [
        ("unquantized", {}), ("fp8", {"quantization": "fp8"}), ("int4", {})]
    for bad in (["--variants", "int3"], ["--extra", "nameonly"], ["--window", "1"]):
        with pytest.raises(SystemExit):
            perplexity.parse_args(bad)


def test_score_on_a_tiny_model_is_a_perplexity(tmp_path):
    """Random weights over a 512-token vocabulary: perplexity of the same order as the vocabulary, and
    the FP8 KV cache changes it only a little."""
    directory = save_tiny_model(tmp_path / "tiny")
    args = perplexity.parse_args(["--model", str(directory), "--variants", "unquantized,kv-fp8",
                                  "--window", "32", "--device", "cpu", "--dtype", "float32"])
    windows = perplexity.windows([(7 * i) % 500 for i in range(70)], args.window)
    plain = perplexity.score(str(directory), {}, windows, args)
    assert plain["tokens"] == 31 + 31 + 5
    assert 10 < plain["perplexity"] < 5000 and math.isfinite(plain["sum_logprob"])
    fp8 = perplexity.score(str(directory), {"kv_cache_dtype": "fp8"}, windows, args)
    assert fp8["perplexity"] == pytest.approx(plain["perplexity"], rel=0.05)
