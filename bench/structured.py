"""What structured output costs: throughput with a JSON schema on every request against the same
workload unconstrained, the time to compile a schema (new and cached), and the bitmask fill per step.

    python -m bench.structured --model default --workload s64                               # CPU
    python -m bench.structured --model llama3-8b-random --workload w256 --dtype bfloat16      # GPU

One process, one engine (prefix caching off, so neither timed run reuses the other's prompts):
 1. start-up and warm-up (untimed): small unconstrained requests, then two constrained ones with a
    schema of their own, which loads the tokenizer's vocabulary into the grammar compiler;
 2. the workload unconstrained, then the same requests each with one of four JSON schemas
    (`THROUGHPUT_SCHEMAS`, in turn), both one timed `llm.generate`. The schemas are new to the engine,
    so the timed run compiles each once (on the engine core's grammar thread) and hits the cache
    for the rest. Reported: output tok/s of both and their ratio (the bar: >= 90%). `--rounds N`
    repeats the pair and takes the median ratio (for a shared CPU, whose speed drifts);
 3. compile time, through the engine's own `StructuredOutputManager` (`llm.engine.core.structured`):
    each of `COMPILE_SCHEMAS` (21 varied schemas) compiled new (a cache miss, counted by the
    compiler), then again (a hit); p50 / p90 of both, and of the per-request validation that the
    input processor runs before a request is queued;
 4. the mask's own cost: `grammar_output` (the step's bitmask fill) for 64 and 256 constrained rows,
    the matchers advanced between steps by a random allowed token; p50 / p90 per step.

Every request must come back with exactly its output length (EOS ignored), or the run fails. A
grammar that completes ends its request whatever `ignore_eos` says, so the schemas are built never to
complete within any workload's lengths: arrays with `minItems` = 65,536 (a token covers at most a few
items). Each constrained output must also be a valid prefix of a document of its schema: some short
completion (a digit, a quote, the closing brackets) must make it parse as JSON of the schema's
types, checked without the grammar engine.

Random-weight shapes (`llama3-8b-random`, `tiny-random`) have no tokenizer, and the grammar compiler
needs a vocabulary: the benchmark writes a synthetic byte-level one of the model's vocabulary size
into the shape's directory (`write_synthetic_tokenizer`: word-like pieces with and without a
leading space, numbers, punctuation runs, non-ASCII characters, in roughly a real BPE vocabulary's
proportions). Mask and compile costs grow with the vocabulary, so they are measured at the real size.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

if __package__ in (None, ""):          # run as a script (python bench/structured.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.models import BenchModel, resolve_bench_model  # noqa: E402
from bench.throughput import (  # noqa: E402
    RunResult,
    _commit,
    _device,
    _free_device_memory,
    _hf_config,
    _torch_dtype,
)
from bench.workloads import BenchRequest, make_workload, total_output_tokens, total_prompt_tokens  # noqa: E402

BAR = 0.90                    # constrained output tok/s must be at least this share of unconstrained
NEVER_COMPLETE = 1 << 16      # minItems: no output of any workload can close the array


# --------------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSchema:
    """A throughput schema and how to check that an output is a prefix of one of its documents.

    start: the characters every output begins with, once whitespace is removed;
    closing: what closes an unfinished document once its last value is complete;
    check: whether a parsed (closed) document has the schema's types (minItems aside).
    """

    name: str
    schema: dict[str, Any]
    start: str
    closing: str
    check: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _array_of(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": NEVER_COMPLETE}


THROUGHPUT_SCHEMAS = (
    BenchSchema("integers", _array_of({"type": "integer"}), "[", "]",
                lambda v: isinstance(v, list) and all(_is_int(x) for x in v)),
    BenchSchema("numbers", _array_of({"type": "number"}), "[", "]",
                lambda v: isinstance(v, list) and all(_is_number(x) for x in v)),
    BenchSchema("strings", _array_of({"type": "string"}), "[", "]",
                lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    BenchSchema("object", {"type": "object", "properties": {"values": _array_of({"type": "integer", "minimum": 0})},
                           "required": ["values"], "additionalProperties": False},
                '{"values":[', "]}",
                lambda v: (isinstance(v, dict) and set(v) == {"values"} and isinstance(v["values"], list)
                           and all(_is_int(x) and x >= 0 for x in v["values"]))),
)
# the warm-up's schema: not one of the timed ones, so the timed run compiles its own
WARMUP_SCHEMA = _array_of({"type": "boolean"})

# What a short completion may need before the closing: nothing, a digit (after "-", "1.", "1e", or a
# separator), a quote (inside a string), an empty string, or the rest of an escape (\n, \uXXXX).
_FILLERS = ("", "0", '"', '""', 'n"', '0"', '00"', '000"', '0000"')


def is_valid_prefix(text: str, bench_schema: BenchSchema) -> bool:
    """Whether `text` starts a document of `bench_schema` (independent of the grammar engine)."""
    if not "".join(text.split()).startswith(bench_schema.start):
        return False
    for filler in _FILLERS:
        try:
            value = json.loads(text + filler + bench_schema.closing)
        except ValueError:
            continue
        if bench_schema.check(value):
            return True
    return False


# Varied schemas for the compile-time measurement: objects, enums, unions, $ref recursion, patterns,
# formats, nullable fields, maps, tuples, nesting, and length-bounded strings.
COMPILE_SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age"]},
    "address": {"type": "object", "properties": {
        "street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"enum": ["US", "CA", "MX", "FR", "DE", "JP"]}},
        "required": ["street", "city", "country"], "additionalProperties": False},
    "sentiment": {"enum": ["positive", "negative", "neutral", "mixed"]},
    "bounded_items": {"type": "array", "maxItems": 8, "items": {"type": "object", "properties": {
        "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 16}},
        "required": ["id", "name"], "additionalProperties": False}},
    "string_or_int": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "shape_union": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
         "required": ["kind", "r"]},
        {"type": "object", "properties": {"kind": {"const": "rect"}, "w": {"type": "number"}, "h": {"type": "number"}},
         "required": ["kind", "w", "h"]}]},
    "tree": {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["value"]}}, "$ref": "#/$defs/node"},
    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}(-[a-z]{2})?$"},
    "timestamp": {"type": "object", "properties": {
        "at": {"type": "string", "format": "date-time"}, "day": {"type": "string", "format": "date"}},
        "required": ["at"]},
    "measurement": {"type": "object", "properties": {
        "value": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}, "unit": {"enum": ["mm", "cm", "m", "km"]}},
        "required": ["value", "unit"]},
    "nullable": {"type": "object", "properties": {
        "nickname": {"type": ["string", "null"]}, "score": {"type": ["number", "null"]}, "active": {"type": "boolean"}},
        "required": ["nickname", "active"]},
    "counts": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
    "tuple": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}],
              "items": False},
    "nested": {"type": "object", "required": ["a"], "properties": {"a": {"type": "object", "required": ["b"],
               "properties": {"b": {"type": "object", "required": ["c"], "properties": {"c": {
                   "type": "object", "properties": {"d": {"type": "integer"}}, "required": ["d"]}}}}}}},
    "product": {"type": "object", "properties": {
        "title": {"type": "string"}, "price": {"type": "number", "minimum": 0},
        "currency": {"enum": ["USD", "EUR", "JPY"]}, "stock": {"type": "integer", "minimum": 0},
        "dims": {"type": "object", "properties": {"w": {"type": "number"}, "h": {"type": "number"},
                                                  "d": {"type": "number"}}, "required": ["w", "h", "d"]},
        "categories": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5}},
        "required": ["title", "price", "currency"]},
    "tool_call": {"type": "object", "required": ["name", "arguments"], "additionalProperties": False, "properties": {
        "name": {"const": "get_weather"}, "arguments": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
            "required": ["city"], "additionalProperties": False}}},
    "bounded_title": {"type": "object", "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 64}},
                      "required": ["title"]},
    "month": {"type": "object", "properties": {"year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                               "month": {"type": "integer", "minimum": 1, "maximum": 12}},
              "required": ["year", "month"]},
    "matrix": {"type": "array", "minItems": 3, "maxItems": 3,
               "items": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}},
    "any_object": {"type": "object"},
    "answer": {"type": "object", "properties": {
        "reasoning": {"type": "string"}, "answer": {"type": "integer"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["reasoning", "answer"], "additionalProperties": False},
}


# --------------------------------------------------------------------------------------------------
# A vocabulary for random-weight shapes
# --------------------------------------------------------------------------------------------------


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the rest for code points
    from 256 up (so every byte is one visible character)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def write_synthetic_tokenizer(directory: Path, vocab_size: int, seed: int = 0) -> None:
    """Writes a byte-level BPE tokenizer of exactly `vocab_size` ids into `directory`: ids 0, 1, 2
    are pad, BOS and EOS (the random shapes' config says eos_token_id 2), then the 256 bytes, then
    deterministic pieces. It has no merges: it encodes text byte by byte, which the benchmark never
    does (prompts are token ids); what matters is the vocabulary the grammar compiler sees."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 512:
        raise ValueError(f"vocab_size must be at least 512 for a synthetic tokenizer, got {vocab_size}")
    alphabet = _byte_to_unicode()
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    punctuation = "{}[]():;,.\"'-_/\\=+*&%$#@!?<>|`~^\n\t "

    def word(low: int, high: int) -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(low, high)))

    specials = ("<|pad|>", "<|bos|>", "<|eos|>")
    vocab = {token: index for index, token in enumerate(specials)}
    for byte in range(256):
        vocab[alphabet[byte]] = len(vocab)
    while len(vocab) < vocab_size:
        draw = rng.random()
        if draw < 0.55:                      # " word" / " Word"
            piece = " " + (word(1, 10) if rng.random() < 0.8 else word(1, 10).capitalize())
        elif draw < 0.80:                    # a word piece
            piece = word(2, 8)
        elif draw < 0.85:                    # a number of up to 3 digits, sometimes after a space
            piece = ("" if rng.random() < 0.9 else " ") + str(rng.randint(0, 999))
        elif draw < 0.93:                    # punctuation and whitespace runs
            piece = "".join(rng.choice(punctuation) for _ in range(rng.randint(2, 4)))
        else:                                # non-ASCII (Latin-1 .. CJK)
            piece = "".join(chr(rng.randint(0xA0, 0x9FFF)) for _ in range(rng.randint(1, 2)))
        vocab.setdefault("".join(alphabet[b] for b in piece.encode("utf-8")), len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=specials[0], bos_token=specials[1],
                                        eos_token=specials[2])
    tokenizer.save_pretrained(str(directory))


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def _rows(text: str) -> list[int]:
    rows = [int(part) for part in text.split(",") if part.strip()]
    if not rows or min(rows) < 1:
        raise argparse.ArgumentTypeError(f"--mask-rows must be positive integers separated by commas, got {text!r}")
    return rows


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M GGUF), a local checkpoint path, or a random-weight shape: "
                        "llama3-8b-random, llama3-70b-random, tiny-random")
    p.add_argument("--workload", default="s64", choices=("s64", "w256", "batch1"))
    p.add_argument("--num-requests", "--num-prompts", dest="num_requests", type=int, default=None,
                   help="run the first N requests of the workload")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); EOS is always ignored")
    p.add_argument("--dtype", default="auto", help="auto = float32 on CPU, bf16 on CUDA")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    p.add_argument("--executor-backend", default=None, choices=("uni", "mp"))
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--async-scheduling", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--warmup-requests", type=int, default=8, help="small untimed unconstrained requests")
    p.add_argument("--rounds", type=int, default=1,
                   help="unconstrained then constrained, N times; the ratio is the median of the rounds' ratios "
                        "(a shared CPU drifts between runs; only the first round compiles the schemas)")
    p.add_argument("--mask-rows", type=_rows, default=[64, 256], help="constrained rows per step, e.g. 64,256")
    p.add_argument("--mask-steps", type=int, default=64, help="timed bitmask fills per row count")
    p.add_argument("--fill-threads", type=_rows, default=None,
                   help="bitmask fill threads to time, e.g. 1,2,4 (default: the engine's own count)")
    p.add_argument("--compile-repeats", type=int, default=5, help="cache hits timed per schema")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    args = p.parse_args(argv)
    if args.num_requests is not None and args.num_requests < 1:
        p.error(f"--num-requests must be >= 1, got {args.num_requests}")
    if min(args.mask_steps, args.compile_repeats, args.rounds) < 1:
        p.error("--mask-steps, --compile-repeats and --rounds must be >= 1, got "
                f"{args.mask_steps}, {args.compile_repeats}, {args.rounds}")
    return args


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _spread(values: Sequence[float], scale: float) -> dict[str, float]:
    return {"p50": quantile(values, 0.5) * scale, "p90": quantile(values, 0.9) * scale,
            "mean": statistics.fmean(values) * scale, "max": max(values) * scale, "count": len(values)}


def _start_engine(args: argparse.Namespace, bench_model: BenchModel) -> Any:
    from pagoda.engine import LLM

    return LLM(
        model=bench_model.model, dtype=str(_torch_dtype(args.dtype, _device(args.device))).removeprefix("torch."),
        device=args.device, tensor_parallel_size=args.tp, distributed_executor_backend=args.executor_backend,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        # NOTE: off, so that the second timed run cannot reuse the first one's prompts
        enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, seed=0, load_format=bench_model.load_format,
        skip_tokenizer_init=True, enforce_eager=args.enforce_eager,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
    )


def _params(args: argparse.Namespace, max_tokens: int, schema: Optional[dict[str, Any]] = None) -> Any:
    from pagoda.engine import SamplingParams, StructuredOutputsParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=args.temperature, detokenize=False,
                          structured_outputs=StructuredOutputsParams(json=schema) if schema is not None else None)


def warm_up(llm: Any, args: argparse.Namespace, vocab_size: int) -> None:
    """Untimed: unconstrained requests (on CUDA one long, for the large prefill shapes), then two
    constrained ones with `WARMUP_SCHEMA`: the grammar compiler is built (the vocabulary read once)."""
    rng = random.Random(12345)         # ids from another stream than the workloads'
    lengths = [16 + (37 * i) % 240 for i in range(args.warmup_requests)]
    if lengths and _device(args.device).type == "cuda":
        lengths[-1] = min(2048, llm.engine.config.model.max_model_len - 16)
    prompts = [{"prompt_token_ids": [rng.randint(0, vocab_size - 1) for _ in range(n)]} for n in lengths + [24, 40]]
    params = [_params(args, 8)] * len(lengths) + [_params(args, 8, WARMUP_SCHEMA)] * 2
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    print(f"warm-up: {len(prompts)} requests (2 constrained) in {time.perf_counter() - start:.1f} s")


def timed_run(llm: Any, args: argparse.Namespace, requests: Sequence[BenchRequest], constrained: bool,
              tokenizer: Any) -> RunResult:
    """One `generate` of every request (each with its schema when `constrained`), checked."""
    label = "json schema" if constrained else "unconstrained"
    schemas = [THROUGHPUT_SCHEMAS[i % len(THROUGHPUT_SCHEMAS)] for i in range(len(requests))]
    params = [_params(args, r.output_len, s.schema if constrained else None) for r, s in zip(requests, schemas)]
    prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]
    manager = llm.engine.core.structured
    before, compiled_before = llm.get_metrics(), manager.num_compiled
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    after = llm.get_metrics()

    invalid = []
    for index, (request, output, bench_schema) in enumerate(zip(requests, outputs, schemas)):
        completion = output.outputs[0]
        if len(completion.token_ids) != request.output_len or completion.finish_reason != "length":
            raise RuntimeError(f"[{label}] request {index} produced {len(completion.token_ids)} tokens "
                               f"(finish_reason={completion.finish_reason!r}), expected {request.output_len} "
                               "ending with 'length'; the benchmark is invalid")
        if constrained:
            text = tokenizer.decode(list(completion.token_ids))
            if not is_valid_prefix(text, bench_schema):
                invalid.append(f"request {index} ({bench_schema.name}): {text[:80]!r}")
    if invalid:
        raise RuntimeError(f"[{label}] {len(invalid)} outputs are not prefixes of their schema's documents, e.g. "
                           + "; ".join(invalid[:3]))
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs
            if o.metrics is not None and o.metrics.first_token_time is not None]
    stats = {"produced_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
             "finish_reasons": dict(Counter(o.outputs[0].finish_reason for o in outputs)),
             "num_steps": after.num_steps - before.num_steps,
             "num_preemptions": after.num_preemptions - before.num_preemptions,
             "grammars_compiled": manager.num_compiled - compiled_before}
    if constrained:
        stats["schemas"] = sorted({s.name for s in schemas})
        stats["valid_prefixes"] = len(outputs)
    return RunResult(label, wall, len(requests), total_prompt_tokens(requests), total_output_tokens(requests),
                     ttft_s=ttft, stats=stats)


def measure_compile(llm: Any, repeats: int) -> dict[str, Any]:
    """Each of COMPILE_SCHEMAS compiled through the engine's manager, new then cached (`repeats`
    hits each), and the input processor's validation of each; seconds per call."""
    from pagoda.engine import StructuredOutputsParams
    from pagoda.engine.structured_output import backend

    manager = llm.engine.core.structured
    new, hits, validation, per_schema = [], [], [], {}
    for name, schema in COMPILE_SCHEMAS.items():
        spec = StructuredOutputsParams(json=schema).spec()
        start = time.perf_counter()
        backend.validate(spec)
        validation.append(time.perf_counter() - start)
        compiled_before = manager.num_compiled
        start = time.perf_counter()
        manager._compile(spec)
        new.append(time.perf_counter() - start)
        if manager.num_compiled != compiled_before + 1:
            raise RuntimeError(f"schema {name!r} was not compiled anew (already cached?): the measurement is invalid")
        per_schema[name] = new[-1] * 1e3
        for _ in range(repeats):
            start = time.perf_counter()
            manager._compile(spec)
            hits.append(time.perf_counter() - start)
        if manager.num_compiled != compiled_before + 1:
            raise RuntimeError(f"schema {name!r} was compiled again instead of found in the cache")
    return {"num_schemas": len(COMPILE_SCHEMAS), "new_ms": _spread(new, 1e3), "cached_us": _spread(hits, 1e6),
            "validate_ms": _spread(validation, 1e3), "new_ms_by_schema": per_schema}


def measure_masks(llm: Any, row_counts: Sequence[int], steps: int,
                  thread_counts: Optional[Sequence[int]]) -> list[dict[str, Any]]:
    """`measure_mask` for each row count with each fill-thread count (the engine's filler is put
    back afterwards)."""
    from pagoda.engine.structured_output.backend import BitmaskFiller

    manager = llm.engine.core.structured
    engine_filler = manager.filler
    stats = []
    try:
        for num_threads in thread_counts or [engine_filler.num_threads]:
            manager.filler = engine_filler if num_threads == engine_filler.num_threads else BitmaskFiller(num_threads)
            for rows in row_counts:
                stats.append({**measure_mask(llm, rows, steps), "threads": num_threads})
            if manager.filler is not engine_filler:
                manager.filler.shutdown()
    finally:
        manager.filler = engine_filler
    return stats


def measure_mask(llm: Any, num_rows: int, steps: int, warmup_steps: int = 4, seed: int = 0) -> dict[str, Any]:
    """`grammar_output` for `num_rows` constrained rows (the throughput schemas in turn), `steps`
    times; between fills each matcher accepts a random token of its mask (a random-weight model's
    pick is as arbitrary), which is timed apart as the step's `accept` cost."""
    import numpy as np

    from pagoda.engine import StructuredOutputsParams
    from pagoda.engine.step import SchedulerOutput

    manager = llm.engine.core.structured
    stop_ids = frozenset(llm.engine.eos_token_ids)
    grammars = {f"row-{i}": manager.grammar_for(
        StructuredOutputsParams(json=THROUGHPUT_SCHEMAS[i % len(THROUGHPUT_SCHEMAS)].schema), stop_ids)
        for i in range(num_rows)}
    while any(not g.ready for g in grammars.values()):
        manager.wait_for_any([g for g in grammars.values() if not g.ready], timeout_s=1.0)
    for request_id, grammar in grammars.items():
        error = grammar.start()
        if error is not None:
            raise RuntimeError(f"{request_id}: {error}")
    scheduler_output = SchedulerOutput(structured_request_ids=list(grammars))
    rng = np.random.default_rng(seed)
    vocab = manager.vocab_size
    banned = np.array(sorted(stop_ids), dtype=np.int64)
    fills, accepts = [], []
    for step in range(warmup_steps + steps):
        start = time.perf_counter()
        output = manager.grammar_output(scheduler_output, grammars)
        fill_s = time.perf_counter() - start
        allowed = np.unpackbits(np.ascontiguousarray(output.bitmask).view(np.uint8), axis=1,
                                bitorder="little")[:, :vocab].astype(bool)
        allowed[:, banned[banned < vocab]] = False
        tokens = []
        for row in range(num_rows):
            candidates = np.flatnonzero(allowed[row])
            if candidates.size == 0:
                raise RuntimeError(f"row {row} allows no token at step {step}")
            tokens.append(int(rng.choice(candidates)))
        start = time.perf_counter()
        for grammar, token in zip(grammars.values(), tokens):
            if not grammar.accept(token):
                raise RuntimeError(f"a matcher refused token {token} of its own mask")
        accept_s = time.perf_counter() - start
        if step >= warmup_steps:
            fills.append(fill_s)
            accepts.append(accept_s)
    return {"rows": num_rows, "steps": steps, "fill_ms": _spread(fills, 1e3), "accept_ms": _spread(accepts, 1e3),
            "fill_us_per_row_p50": quantile(fills, 0.5) / num_rows * 1e6}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    return "\n".join([line, "-" * len(line)] + ["  ".join(str(x).ljust(w) for x, w in zip(row, widths))
                                                 for row in rows])


def format_report(report: dict[str, Any]) -> str:
    runs = report["runs"]
    lines = [_table(["run", "wall s", "out tok/s", "mean TTFT ms", "steps", "grammars compiled"], [
        [r["label"], f"{r['wall_s']:.2f}", f"{r['output_tok_per_s']:,.1f}",
         "-" if r["mean_ttft_s"] is None else f"{r['mean_ttft_s'] * 1e3:,.0f}",
         str(r["stats"]["num_steps"]), str(r["stats"]["grammars_compiled"])] for r in runs])]
    ratio = report["ratio"]
    rounds = f" (median of {len(report['ratios'])} rounds)" if len(report["ratios"]) > 1 else ""
    lines.append(f"json schema / unconstrained output tok/s{rounds}: {ratio * 100:.1f}% "
                 f"(bar >= {BAR * 100:.0f}%: {'met' if ratio >= BAR else 'NOT met'})")
    comp = report["compile"]
    lines.append("")
    lines.append(_table([f"compile ({comp['num_schemas']} schemas)", "p50", "p90", "max"], [
        [label, f"{comp[key]['p50']:.2f}", f"{comp[key]['p90']:.2f}", f"{comp[key]['max']:.1f}"]
        for label, key in (("new schema (ms)", "new_ms"), ("cached (us)", "cached_us"),
                           ("validation per request (ms)", "validate_ms"))]))
    lines.append("")
    lines.append(_table(["bitmask per step", "fill threads", "fill p50 ms", "fill p90 ms", "us/row p50",
                         "accept p50 ms"], [
        [f"{m['rows']} rows", str(m.get("threads", 1)), f"{m['fill_ms']['p50']:.3f}", f"{m['fill_ms']['p90']:.3f}",
         f"{m['fill_us_per_row_p50']:.2f}", f"{m['accept_ms']['p50']:.3f}"] for m in report["mask"]]))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from pagoda.engine.processing.tokenizer import load_tokenizer

    args = parse_args(argv)
    device = _device(args.device)
    dtype = _torch_dtype(args.dtype, device)
    bench_model = resolve_bench_model(args.model, dtype=str(dtype).removeprefix("torch."))
    vocab_size = int(_hf_config(bench_model).vocab_size)
    if bench_model.is_random:
        write_synthetic_tokenizer(Path(bench_model.model), vocab_size)
    requests = make_workload(args.workload, vocab_size, args.num_requests)
    commit = _commit()
    print(f"structured-output bench: model {bench_model.name}, workload {args.workload}: {len(requests)} requests, "
          f"{total_prompt_tokens(requests):,} prompt + {total_output_tokens(requests):,} output tokens; device "
          f"{device} ({dtype}), tp {args.tp}, commit {commit}, python {platform.python_version()}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    start = time.perf_counter()
    llm = _start_engine(args, bench_model)
    print(f"start-up: {time.perf_counter() - start:.1f} s")
    try:
        tokenizer = load_tokenizer(llm.engine.config.model.source)       # to read the outputs back
        warm_up(llm, args, vocab_size)
        runs, ratios = [], []
        for round_index in range(args.rounds):
            for constrained in (False, True):
                run = timed_run(llm, args, requests, constrained, tokenizer)
                if args.rounds > 1:
                    run.label += f" #{round_index + 1}"
                print(f"[{run.label}] {run.wall_s:.2f} s, {run.output_tok_per_s:,.1f} output tok/s, stats {run.stats}")
                runs.append(run)
            ratios.append(runs[-1].output_tok_per_s / runs[-2].output_tok_per_s)
        compile_stats = measure_compile(llm, args.compile_repeats)
        print(f"compile: new p50 {compile_stats['new_ms']['p50']:.2f} ms; by schema (ms): "
              + ", ".join(f"{k} {v:.1f}" for k, v in compile_stats["new_ms_by_schema"].items()))
        mask_stats = measure_masks(llm, args.mask_rows, args.mask_steps, args.fill_threads)
    finally:
        llm.shutdown()
        del llm
        _free_device_memory(device)

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": commit,
        "command": "python -m bench.structured " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype), "vocab_size": vocab_size, "synthetic_tokenizer": bench_model.is_random,
        "runs": [r.summary() for r in runs],
        "ratio": statistics.median(ratios), "ratios": ratios,
        "compile": compile_stats, "mask": mask_stats,
    }
    print("\n" + format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
