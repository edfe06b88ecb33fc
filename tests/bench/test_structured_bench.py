"""bench/structured.py: the prefix check of constrained outputs, the synthetic vocabulary of
random-weight shapes, and the whole benchmark on CPU with the tiny random shape and a few requests
(both timed runs, compile times through the engine's manager, the bitmask fill)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repo root, for `import bench`

from bench.structured import (  # noqa: E402
    COMPILE_SCHEMAS,
    THROUGHPUT_SCHEMAS,
    is_valid_prefix,
    main,
    write_synthetic_tokenizer,
)
from bench.workloads import make_s64  # noqa: E402

SCHEMAS = {s.name: s for s in THROUGHPUT_SCHEMAS}


@pytest.mark.parametrize("name, text", [
    ("integers", "["), ("integers", "[12, -"), ("integers", "[12,-3,4"), ("integers", "[0, 1, 99999999999"),
    ("numbers", "[1.5e"), ("numbers", "[1.5E+7, -0."), ("numbers", "[3, 4.25, "),
    ("strings", '["ab'), ("strings", '["a", "b\\'), ("strings", '["x\\u00'), ("strings", '["a", '),
    ("object", '{"values": [1, 2'), ("object", '{"values":['),
])
def test_prefixes_of_documents_pass(name, text):
    assert is_valid_prefix(text, SCHEMAS[name])


@pytest.mark.parametrize("name, text", [
    ("integers", "hello"), ("integers", "[1.5"), ("integers", '["a'), ("integers", "[1]]"), ("integers", "[01"),
    ("numbers", '[1, "x'), ("strings", "[1, "), ("strings", '{"a'),
    ("object", '{"values": [-1'), ("object", '{"other": [1'), ("object", "[1, 2"),
])
def test_other_texts_fail(name, text):
    assert not is_valid_prefix(text, SCHEMAS[name])


def test_throughput_schemas_cannot_complete_within_a_workload():
    longest = max(r.output_len for r in make_s64(49152))
    for bench_schema in THROUGHPUT_SCHEMAS:
        arrays = [bench_schema.schema] if bench_schema.schema["type"] == "array" else \
            list(bench_schema.schema["properties"].values())
        assert all(a["minItems"] > 16 * 1024 > longest for a in arrays), bench_schema.name


def test_synthetic_tokenizer_has_the_models_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    write_synthetic_tokenizer(tmp_path, 4096)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(tokenizer) == 4096
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    text = '{"values": [12, 3]} é'
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    pieces = [tokenizer.decode([i]) for i in range(259, 4096)]
    assert len(set(pieces)) == len(pieces)                          # no duplicates
    assert sum(p.startswith(" ") for p in pieces) > len(pieces) // 3  # word-like pieces after a space
    with pytest.raises(ValueError, match="vocab_size"):
        write_synthetic_tokenizer(tmp_path, 100)


def test_benchmark_end_to_end_on_the_tiny_shape(tmp_path, capsys):
    out = tmp_path / "structured.json"
    report = main(["--model", "tiny-random", "--device", "cpu", "--workload", "s64", "--num-requests", "4",
                   "--warmup-requests", "1", "--mask-rows", "4,8", "--mask-steps", "3", "--fill-threads", "1,2",
                   "--compile-repeats", "2",
                   "--json", str(out)])
    requests = make_s64(16384, 4)
    unconstrained, constrained = report["runs"]
    assert (unconstrained["label"], constrained["label"]) == ("unconstrained", "json schema")
    for run in report["runs"]:
        # every request came back with exactly its output length, ended by the length limit
        assert run["stats"]["produced_tokens"] == run["output_tokens"] == sum(r.output_len for r in requests)
        assert run["stats"]["finish_reasons"] == {"length": 4}
    # four requests, four schemas: each compiled once in the timed run, none before it
    assert constrained["stats"]["grammars_compiled"] == 4 and unconstrained["stats"]["grammars_compiled"] == 0
    assert constrained["stats"]["valid_prefixes"] == 4
    assert report["ratio"] == pytest.approx(constrained["output_tok_per_s"] / unconstrained["output_tok_per_s"])
    compile_stats = report["compile"]
    assert compile_stats["num_schemas"] == len(COMPILE_SCHEMAS) == compile_stats["new_ms"]["count"]
    assert compile_stats["cached_us"]["count"] == 2 * len(COMPILE_SCHEMAS)
    assert compile_stats["cached_us"]["p50"] / 1e3 < compile_stats["new_ms"]["p50"]   # a hit costs less
    assert [(m["rows"], m["threads"]) for m in report["mask"]] == [(4, 1), (8, 1), (4, 2), (8, 2)]
    assert all(m["steps"] == 3 for m in report["mask"])
    assert report["synthetic_tokenizer"] and report["vocab_size"] == 16384
    assert json.loads(out.read_text())["runs"][1]["stats"]["grammars_compiled"] == 4
    table = capsys.readouterr().out.split("\n\nrun ")[-1]
    for field in ("wall s", "out tok/s", "unconstrained", "json schema", "bar >= 90%", "new schema (ms)",
                  "cached (us)", "validation per request", "4 rows", "8 rows", "fill threads", "fill p50 ms"):
        assert field in table, field
