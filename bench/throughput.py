"""Offline throughput of pagoda on a benchmark workload, against the card's floor and Hugging Face.

    python -m bench.throughput --workload s64 --baseline hf                          # the CPU comparison
    python -m bench.throughput --model llama3-8b-random --workload w256 --baseline hf --hf-subset 128
    python -m bench.throughput --model llama3-8b-random --workload batch1
    python -m bench.throughput --model llama3-8b-random --workload shared-prefix --compare-prefix-caching
    python -m bench.throughput --model qwen3-30b-a3b-random --workload w256                # MoE; gemma3-12b-random too

One process, in this order:
 1. on CUDA, the ceilings (copy bandwidth, bf16 matmul rate; all-reduce bandwidth when --tp > 1),
    measured before anything else takes the GPU;
 2. pagoda: start-up (weights + KV-cache profiling + graph capture; printed, never counted), a
    warm-up of a few small requests, then the timed `llm.generate` of the whole workload (all
    requests submitted at once). Every request must come back with exactly its output length;
 3. with --baseline hf, transformers on the same workload (pagoda's GPU memory freed first).
Then: wall time, requests/s, output and total tok/s, TTFT; on CUDA the ideal floor and % of floor
(batch1: tok/s against the weight-bandwidth roofline); a final table; optionally JSON.

Sampling: greedy by default (--temperature 0): the HF baselines then do the same work, and outputs
are deterministic. EOS is always ignored.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

if __package__ in (None, ""):          # run as a script (python bench/throughput.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ceilings import (  # noqa: E402
    Ceilings,
    batch1_roofline,
    ideal_floor,
    measure_allreduce_bus_bandwidth,
    measure_ceilings,
    percent_of,
)
from bench.hf_baseline import HFRunResult, load_hf_model, run_hf_continuous, run_hf_static  # noqa: E402
from bench.models import RANDOM_SUFFIX, BenchModel, ModelShape, resolve_bench_model  # noqa: E402
from bench.workloads import WORKLOADS, BenchRequest, make_workload, total_output_tokens, total_prompt_tokens  # noqa: E402

SHARED_PREFIX_LEN = 2048          # make_shared_prefix's default prefix


@dataclass
class RunResult:
    """One timed run (pagoda or HF) of a workload."""

    label: str
    wall_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    load_s: Optional[float] = None
    ttft_s: list[float] = field(default_factory=list, repr=False)
    decode_tok_per_s: Optional[float] = None       # batch1: (output - 1) / (finish - first token)
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.wall_s

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tok_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s

    @property
    def mean_ttft_s(self) -> Optional[float]:
        return statistics.fmean(self.ttft_s) if self.ttft_s else None

    def ttft_quantile(self, q: float) -> Optional[float]:
        if not self.ttft_s:
            return None
        ordered = sorted(self.ttft_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label, "wall_s": self.wall_s, "num_requests": self.num_requests,
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens, "load_s": self.load_s,
            "requests_per_s": self.requests_per_s, "output_tok_per_s": self.output_tok_per_s,
            "total_tok_per_s": self.total_tok_per_s, "mean_ttft_s": self.mean_ttft_s,
            "p50_ttft_s": self.ttft_quantile(0.5), "p99_ttft_s": self.ttft_quantile(0.99),
            "decode_tok_per_s": self.decode_tok_per_s, "stats": self.stats, "notes": self.notes,
        }


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M GGUF), a local checkpoint path, or a random-weight shape: "
                        "llama3-8b-random, llama3-70b-random, qwen3-30b-a3b-random, mixtral-8x7b-random, "
                        "gemma3-12b-random, gpt-oss-20b-random, tiny-random, tiny-moe-random, tiny-gemma-random, "
                        "tiny-gpt-oss-random")
    p.add_argument("--workload", default="s64", choices=WORKLOADS)
    p.add_argument("--num-prompts", type=int, default=None,
                   help="use the first N requests of the workload (shared-prefix: N requests)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); EOS is always ignored")
    p.add_argument("--dtype", default="auto", help="pagoda's and HF's dtype: auto = float32 on CPU, bf16 on CUDA")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    p.add_argument("--executor-backend", default=None, choices=("uni", "mp"),
                   help="uni: the model in this process (default for --tp 1); mp: in worker processes")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--async-scheduling", default="auto", choices=("auto", "on", "off"),
                   help="schedule step N+1 while step N runs (auto = the engine's default: on for CUDA)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--compare-prefix-caching", action="store_true",
                   help="run pagoda with prefix caching on, then off (two engines, one after the other)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--warmup-requests", type=int, default=8, help="small untimed requests before the run")
    p.add_argument("--quantization", default=None, choices=("fp8", "gptq", "awq"),
                   help="fp8: FP8 W8A8 quantized at load; gptq/awq: a random-weight shape's config.json says 4-bit "
                        "weights in groups of 128 (a real checkpoint path carries its own quantization_config)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
    p.add_argument("--speculative-config", default=None,
                   help='speculative decoding, as the engine takes it, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4}\'')
    p.add_argument("--compare-baseline", "--compare-unquantized", dest="compare_baseline", action="store_true",
                   help="with --quantization / --kv-cache-dtype / --speculative-config: first run the same workload "
                        "without them (the baseline, its own engine), then with them, and report the ratio")
    p.add_argument("--ceilings", default="auto", choices=("auto", "on", "off"),
                   help="measure copy bandwidth and matmul rate first: auto = on CUDA only; 'on' on CPU uses "
                        "small sizes (indicative only)")
    p.add_argument("--baseline", default=None, choices=("hf",), help="also run Hugging Face transformers")
    p.add_argument("--hf-batch-size", type=int, default=None,
                   help="HF static batch size (default: 16 on CPU, 64 on CUDA, 1 for batch1)")
    p.add_argument("--hf-continuous", action="store_true",
                   help="also run transformers' continuous batching (init_continuous_batching)")
    p.add_argument("--hf-skip-static", action="store_true", help="with --hf-continuous: skip static batching")
    p.add_argument("--hf-subset", type=int, default=None,
                   help="run HF on the first N requests only (bounds time); its throughput is compared as is, "
                        "and its full-workload time estimated by scaling with output tokens")
    p.add_argument("--hf-attn-implementation", default=None,
                   help="HF attention: default 'sdpa' for static, 'paged|sdpa' for continuous batching")
    p.add_argument("--skip-pagoda", action="store_true", help="run only the HF baseline(s)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.hf_continuous or args.hf_subset:
        args.baseline = "hf"
    if args.tp < 1:
        p.error(f"--tp must be >= 1, got {args.tp}")
    if args.hf_subset is not None and args.hf_subset < 1:
        p.error(f"--hf-subset must be >= 1, got {args.hf_subset}")
    if args.compare_prefix_caching and args.no_prefix_caching:
        p.error("--compare-prefix-caching runs both; drop --no-prefix-caching")
    if args.compare_baseline and args.quantization is None and args.kv_cache_dtype == "auto" \
            and args.speculative_config is None:
        p.error("--compare-baseline needs --quantization, --kv-cache-dtype fp8 or --speculative-config")
    if args.compare_baseline and args.quantization in ("gptq", "awq") and not args.model.endswith("-random"):
        p.error(f"--compare-baseline with --quantization {args.quantization} needs a random-weight shape "
                f"(--model ...-random): a real {args.quantization} checkpoint has no unquantized twin here")
    if args.compare_baseline and args.compare_prefix_caching:
        p.error("--compare-baseline and --compare-prefix-caching each run two engines; pick one")
    if args.baseline == "hf" and args.tp > 1:
        p.error("--baseline hf runs on one GPU; it cannot be combined with --tp > 1")
    return args


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"--dtype must be auto or one of {sorted(table)}, got {name!r}")
    return table[name]


def _dtype_name(args: argparse.Namespace) -> str:
    """The dtype both pagoda and HF run in, as pagoda's `dtype` argument spells it."""
    return str(_torch_dtype(args.dtype, _device(args.device))).removeprefix("torch.")


def _commit() -> str:
    """HEAD of the checkout, or $PAGODA_COMMIT where the tree was copied without its .git."""
    import os

    if os.environ.get("PAGODA_COMMIT"):
        return os.environ["PAGODA_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        left = torch.cuda.memory_allocated(device)
        if left > 1 << 30:
            print(f"WARNING: {left / 2**30:.1f} GiB still allocated on {device} after freeing; "
                  "the next run has less memory")


def _hf_config(bench_model: BenchModel) -> Any:
    from pagoda.engine.model_loader.model_source import load_hf_config, resolve_model

    return load_hf_config(resolve_model(bench_model.model))


# --------------------------------------------------------------------------------------------------
# pagoda
# --------------------------------------------------------------------------------------------------


def run_pagoda(args: argparse.Namespace, bench_model: BenchModel, requests: Sequence[BenchRequest],
               vocab_size: int, enable_prefix_caching: bool, label: str, variant: bool = True) -> RunResult:
    """Starts an engine, warms it up, times one `generate` of all `requests`, shuts the engine down.
    `variant=False`: without --quantization / --kv-cache-dtype / --speculative-config (the --compare-baseline
    baseline)."""
    from pagoda.engine import LLM, SamplingParams

    # NOTE: passed as given even for a pre-quantized checkpoint: the engine refuses a checkpoint quantized
    # otherwise, so a run is never labelled with a format it did not use
    quantization = {"quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
                    "speculative_config": args.speculative_config} if variant else {}
    start = time.perf_counter()
    llm = LLM(
        **quantization,
        model=bench_model.model, dtype=_dtype_name(args), device=args.device, tensor_parallel_size=args.tp,
        distributed_executor_backend=args.executor_backend,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=enable_prefix_caching, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, seed=0, load_format=bench_model.load_format,
        skip_tokenizer_init=True, enforce_eager=args.enforce_eager,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
    )
    load_s = time.perf_counter() - start
    print(f"[{label}] start-up (weights + profiling + graph capture): {load_s:.1f} s")
    try:
        def params(max_tokens: int) -> SamplingParams:
            return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=args.temperature,
                                  detokenize=False)

        if args.warmup_requests:
            # ids from another stream than the workloads', so the warm-up leaves nothing in the prefix
            # cache that the timed prompts could hit. On CUDA one long prompt also brings the large
            # prefill shapes (kernel compilation, autotuning) out of the timed run.
            rng = random.Random(12345)
            lengths = [16 + (37 * i) % 240 for i in range(args.warmup_requests)]
            if _device(args.device).type == "cuda":
                lengths[-1] = min(2048, llm.engine.config.model.max_model_len - 16)
            warm = [{"prompt_token_ids": [rng.randint(0, vocab_size - 1) for _ in range(n)]} for n in lengths]
            max_tokens = 8
            if variant and args.speculative_config:
                # half of them a short block repeated: prompt-lookup proposers find their drafts in it, so
                # verification steps (their own kernel shapes) also run before the timed run
                for index in range(0, len(warm), 2):
                    block = [rng.randint(0, vocab_size - 1) for _ in range(8)]
                    warm[index] = {"prompt_token_ids": block * max(2, lengths[index] // 8)}
                max_tokens = 16
            warm_start = time.perf_counter()
            llm.generate(warm, params(max_tokens), use_tqdm=False)
            print(f"[{label}] warm-up: {args.warmup_requests} requests in {time.perf_counter() - warm_start:.1f} s")

        # a draft model in this process (uni executor): time its drafting and the verification after it
        drafter = getattr(getattr(llm.engine.core.executor, "runner", None), "drafter", None) if variant else None
        if drafter is not None:
            drafter.enable_timing()
        before = llm.get_metrics()
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]
        sampling = [params(r.output_len) for r in requests]
        start = time.perf_counter()
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        wall = time.perf_counter() - start
        after = llm.get_metrics()
        draft_timing = drafter.timing() if drafter is not None else None
    finally:
        llm.shutdown()
        del llm
        _free_device_memory(_device(args.device))

    for index, (request, output) in enumerate(zip(requests, outputs)):
        produced = len(output.outputs[0].token_ids)
        if produced != request.output_len:
            raise RuntimeError(f"[{label}] request {index} produced {produced} tokens, expected {request.output_len} "
                               f"(finish_reason={output.outputs[0].finish_reason!r}); the benchmark is invalid")
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs
            if o.metrics is not None and o.metrics.first_token_time is not None]
    decode_tok_per_s = None
    if len(outputs) == 1 and outputs[0].metrics is not None:
        m = outputs[0].metrics
        if m.finished_time is not None and m.first_token_time is not None and m.finished_time > m.first_token_time:
            decode_tok_per_s = (requests[0].output_len - 1) / (m.finished_time - m.first_token_time)
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    stats = {
        "prefix_cache_queries": queries, "prefix_cache_hits": hits,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "num_preemptions": after.num_preemptions - before.num_preemptions,
        "num_steps": after.num_steps - before.num_steps,
        "num_blocks": after.num_blocks,
    }
    if variant and args.speculative_config:
        stats["warmup_spec_draft_tokens"] = before.spec_decode_num_draft_tokens      # verified before the clock
    drafts = after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens
    if drafts:
        accepted = after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
        verifications = after.spec_decode_num_drafts - before.spec_decode_num_drafts
        stats.update(spec_draft_tokens=drafts, spec_accepted_tokens=accepted,
                     spec_acceptance_rate=accepted / drafts,
                     # tokens a verification step produced per request: the accepted drafts + the target's own
                     spec_mean_acceptance_length=1 + accepted / verifications if verifications else None)
        if verifications and draft_timing is not None and draft_timing["steps"]:
            # NOTE: a draft-model step costs the same whatever is accepted (K_i drafts, 1 + K_i verified
            # rows), so at another acceptance the speculating steps yield E(a) / E(measured) times the
            # tokens in the same time; the projection scales the whole run by it (prefill steps too,
            # so it is an upper bound when prefill takes a large share of the run)
            mean_drafts = drafts / verifications
            measured = 1 + accepted / verifications
            target = expected_tokens_per_verification(0.7, mean_drafts)
            stats.update(spec_draft_step_ms=draft_timing["draft_ms"], spec_verify_step_ms=draft_timing["verify_ms"],
                         spec_timed_steps=int(draft_timing["steps"]),
                         spec_tokens_per_verification_at_70pct=target,
                         spec_projected_output_tok_per_s_at_70pct=(
                             total_output_tokens(requests) / wall * target / measured))
    return RunResult(label, wall, len(requests), total_prompt_tokens(requests), total_output_tokens(requests),
                     load_s=load_s, ttft_s=ttft, decode_tok_per_s=decode_tok_per_s, stats=stats)


# --------------------------------------------------------------------------------------------------
# HF
# --------------------------------------------------------------------------------------------------


def run_hf(args: argparse.Namespace, bench_model: BenchModel, requests: Sequence[BenchRequest],
           device: torch.device, dtype: torch.dtype) -> list[RunResult]:
    subset = list(requests[: args.hf_subset]) if args.hf_subset else list(requests)
    subset_note = (f"HF ran the first {len(subset)} of {len(requests)} requests (--hf-subset); throughput is "
                   f"that subset's" if len(subset) < len(requests) else None)
    full_output = total_output_tokens(requests)
    results: list[RunResult] = []

    def record(hf: HFRunResult, load_s: float) -> None:
        notes = list(hf.notes)
        if subset_note:
            estimate = hf.wall_s * full_output / hf.output_tokens
            notes.append(f"{subset_note}; estimated time for all {len(requests)}: {estimate:.1f} s "
                         "(scaled by output tokens)")
        results.append(RunResult(hf.label, hf.wall_s, hf.num_requests, hf.prompt_tokens, hf.output_tokens,
                                 load_s=load_s, stats={"generated_tokens": hf.generated_tokens}, notes=notes))
        for note in notes:
            print(f"[{hf.label}] {note}")
        print(f"[{hf.label}] {hf.wall_s:.1f} s, {hf.output_tokens / hf.wall_s:,.1f} useful output tok/s")

    if not args.hf_skip_static:
        batch_size = args.hf_batch_size or (1 if args.workload == "batch1" else 16 if device.type == "cpu" else 64)
        start = time.perf_counter()
        model = load_hf_model(bench_model, device, dtype, args.hf_attn_implementation or "sdpa")
        load_s = time.perf_counter() - start
        print(f"[hf static] model load {load_s:.1f} s")
        warm = [BenchRequest(r.prompt_token_ids[:32], 4) for r in subset[:2]]
        run_hf_static(model, warm, batch_size, args.temperature)                      # warm-up
        record(run_hf_static(model, subset, batch_size, args.temperature, label=f"hf static b{batch_size}"), load_s)
        del model
        _free_device_memory(device)
    if args.hf_continuous:
        start = time.perf_counter()
        model = load_hf_model(bench_model, device, dtype, args.hf_attn_implementation or "paged|sdpa")
        load_s = time.perf_counter() - start
        print(f"[hf continuous] model load {load_s:.1f} s")
        record(run_hf_continuous(model, subset, args.temperature), load_s)
        del model
        _free_device_memory(device)
    return results


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[RunResult], floors: dict[str, float], workload: str) -> None:
    """floors: label -> that run's ideal floor in output tok/s (batch1: its weight-bandwidth roofline)."""
    reference = next((r for r in results if r.label.startswith("pagoda")), None)
    header = ["run", "wall s", "req/s", "out tok/s", "total tok/s", "mean TTFT ms", "% floor", "pagoda x"]
    rows = []
    for r in results:
        achieved = r.decode_tok_per_s if workload == "batch1" and r.decode_tok_per_s else r.output_tok_per_s
        pct = percent_of(achieved, floors[r.label]) if r.label in floors else None
        ratio = reference.output_tok_per_s / r.output_tok_per_s if reference and r is not reference else None
        mean_ttft = r.mean_ttft_s
        rows.append([r.label, _fmt(r.wall_s, ".2f"), _fmt(r.requests_per_s, ".2f"), _fmt(achieved, ",.1f"),
                     _fmt(r.total_tok_per_s, ",.1f"), _fmt(mean_ttft * 1e3 if mean_ttft is not None else None, ",.0f"),
                     _fmt(pct, ".1f"), _fmt(ratio, ".2f")])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print("\n" + line + "\n" + "-" * len(line))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    if workload == "batch1":
        print("batch1: 'out tok/s' is decode tok/s ((output - 1) / (finish - first token)) where known; "
              "'% floor' is % of the weight-bandwidth roofline")
    print("'pagoda x' = pagoda's output tok/s / that run's (HF counts only each request's own output tokens)")


def resolve_draft_shape(speculative_config: Optional[str], dtype: str) -> Optional[str]:
    """--speculative-config whose draft `model` is a bench shape ("llama3.2-1b-random"): the same JSON
    with that shape's config.json directory instead (random weights, like a random-weight target)."""
    if speculative_config is None:
        return None
    value = json.loads(speculative_config)
    draft = value.get("model") if isinstance(value, dict) else None
    if isinstance(draft, str) and draft.endswith(RANDOM_SUFFIX):
        value["model"] = resolve_bench_model(draft, dtype=dtype).model
        return json.dumps(value)
    return speculative_config


def expected_tokens_per_verification(acceptance: float, num_drafts: float) -> float:
    """Tokens a verification yields per request when each of its K drafts is accepted with probability
    `acceptance` independently (until the first rejection), plus the target's own: sum of a^i, i <= K."""
    if acceptance >= 1.0:
        return num_drafts + 1
    return (1 - acceptance ** (num_drafts + 1)) / (1 - acceptance)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = _device(args.device)
    dtype = _torch_dtype(args.dtype, device)
    args.speculative_config = resolve_draft_shape(args.speculative_config, str(dtype).removeprefix("torch."))
    bench_model = resolve_bench_model(args.model, dtype=str(dtype).removeprefix("torch."), quantization=args.quantization)
    hf_config = _hf_config(bench_model)
    vocab_size = int(hf_config.vocab_size)
    tokenizer = None
    if args.workload == "copy":
        from pagoda.engine.model_loader.model_source import resolve_model
        from pagoda.engine.processing.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(resolve_model(bench_model.model))
    requests = make_workload(args.workload, vocab_size, args.num_prompts, tokenizer=tokenizer)
    shape = ModelShape.from_hf_config(hf_config, dtype_bytes=torch.tensor([], dtype=dtype).element_size())
    commit = _commit()
    active = f", {shape.active_params / 1e9:.2f} B active per token" if shape.num_experts else ""
    print(f"pagoda bench: model {bench_model.name} ({shape.num_params / 1e9:.2f} B params{active}, "
          f"{shape.weight_bytes / 1e9:.2f} GB {dtype}), workload {args.workload}: {len(requests)} requests, "
          f"{total_prompt_tokens(requests):,} prompt + {total_output_tokens(requests):,} output tokens; "
          f"device {device}, tp {args.tp}, commit {commit}, python {platform.python_version()}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    ceilings: Optional[Ceilings] = None
    if args.ceilings == "on" or (args.ceilings == "auto" and device.type == "cuda"):
        if device.type == "cuda":
            ceilings = measure_ceilings(device)
        else:   # indicative only: a CPU has no single "copy bandwidth" worth a floor
            ceilings = measure_ceilings(device, copy_bytes=64 << 20, matmul_size=1024, dtype=torch.float32, repeats=5)
        if args.tp > 1:
            busbw = measure_allreduce_bus_bandwidth(args.tp, use_cuda=device.type == "cuda")
            ceilings = Ceilings(ceilings.copy_bandwidth_Bps, ceilings.matmul_flops, ceilings.device_name, busbw)
        print(f"ceilings on {ceilings.device_name}: copy {ceilings.copy_bandwidth_Bps / 1e9:,.0f} GB/s (read + write), "
              f"matmul {ceilings.matmul_flops / 1e12:,.3g} TFLOP/s"
              + (f", all-reduce bus {ceilings.allreduce_bus_bandwidth_Bps / 1e9:,.0f} GB/s"
                 if ceilings.allreduce_bus_bandwidth_Bps else ""))

    served_shape = shape.quantized(args.quantization, args.kv_cache_dtype)
    label = "pagoda" + (f" {args.quantization}" if args.quantization else "") + \
        (" kv-fp8" if args.kv_cache_dtype == "fp8" else "")
    label += " speculative" if args.speculative_config else ""
    baseline_label = "pagoda baseline"
    floors: dict[str, float] = {}
    floor = roofline = None
    if ceilings is not None:
        runs = [(label, served_shape)] + ([(baseline_label, shape)] if args.compare_baseline else [])
        for run_label, run_shape in runs:
            if args.workload == "batch1":
                roofline = floors[run_label] = batch1_roofline(run_shape, ceilings, args.tp)
                print(f"[{run_label}] batch-1 roofline (bandwidth / {run_shape.step_weight_bytes(1) / 1e9:.2f} GB "
                      f"of weights a token reads): {roofline:,.1f} tok/s")
            else:
                prefix = SHARED_PREFIX_LEN if args.workload == "shared-prefix" else 0
                run_floor = ideal_floor(requests, run_shape, ceilings, tp=args.tp, shared_prefix_len=prefix)
                floors[run_label] = run_floor.output_tok_per_s
                floor = floor or run_floor
                print(f"[{run_label}] ideal floor: {run_floor.seconds:.2f} s = {run_floor.output_tok_per_s:,.0f} "
                      f"output tok/s (prefill {run_floor.prefill_seconds:.2f} s, {run_floor.num_decode_steps} decode "
                      f"steps {run_floor.decode_seconds:.2f} s, {run_floor.memory_bound_steps} memory-bound; weights "
                      f"{run_shape.weight_bytes / 1e9:.2f} GB, KV {run_shape.kv_bytes_per_token:,} B/token)")
        if args.compare_prefix_caching and floor is not None:
            floors["pagoda cache on"] = floors["pagoda cache off"] = floor.output_tok_per_s

    results: list[RunResult] = []
    comparisons: dict[str, float] = {}
    if not args.skip_pagoda:
        if args.compare_prefix_caching:
            results.append(run_pagoda(args, bench_model, requests, vocab_size, True, "pagoda cache on"))
            results.append(run_pagoda(args, bench_model, requests, vocab_size, False, "pagoda cache off"))
        else:
            caching = not args.no_prefix_caching
            if args.compare_baseline:
                # a pre-quantized random shape carries its quantization_config: the baseline needs a plain one
                plain = resolve_bench_model(args.model, dtype=str(dtype).removeprefix("torch.")) \
                    if args.quantization in ("gptq", "awq") else bench_model
                results.append(run_pagoda(args, plain, requests, vocab_size, caching, baseline_label, variant=False))
            results.append(run_pagoda(args, bench_model, requests, vocab_size, caching,
                                      label if caching else f"{label} cache off"))
            if args.compare_baseline:
                base, served = results[0], results[1]
                key = "decode" if args.workload == "batch1" else "output"
                base_rate = base.decode_tok_per_s if key == "decode" else base.output_tok_per_s
                served_rate = served.decode_tok_per_s if key == "decode" else served.output_tok_per_s
                if base_rate and served_rate:
                    comparisons["variant_over_baseline"] = served_rate / base_rate
                    print(f"{label} vs baseline: {served_rate:,.1f} vs {base_rate:,.1f} {key} tok/s = "
                          f"{served_rate / base_rate:.2f}x")
        for r in results:
            print(f"[{r.label}] {r.wall_s:.2f} s, {r.output_tok_per_s:,.1f} output tok/s, "
                  f"mean TTFT {_fmt(r.mean_ttft_s and r.mean_ttft_s * 1e3, ',.0f')} ms, stats {r.stats}")
    if args.baseline == "hf":
        results.extend(run_hf(args, bench_model, requests, device, dtype))

    if args.compare_prefix_caching and len(results) >= 2:
        on, off = results[0], results[1]
        if on.mean_ttft_s and off.mean_ttft_s:
            comparisons["mean_ttft_off_over_on"] = off.mean_ttft_s / on.mean_ttft_s
        comparisons["throughput_on_over_off"] = on.output_tok_per_s / off.output_tok_per_s
        print(f"prefix caching: mean TTFT {_fmt(off.mean_ttft_s, '.3f')} s off -> {_fmt(on.mean_ttft_s, '.3f')} s on "
              f"({comparisons.get('mean_ttft_off_over_on', float('nan')):.2f}x lower); output throughput "
              f"{comparisons['throughput_on_over_off']:.2f}x (on / off)")
    print_table(results, floors, args.workload)

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": commit,
        "command": "python -m bench.throughput " + " ".join(sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": ceilings.device_name if ceilings else str(device), "dtype": str(dtype),
        "model_shape": asdict(served_shape), "ceilings": asdict(ceilings) if ceilings else None,
        "floor": asdict(floor) if floor else None, "batch1_roofline_tok_per_s": roofline,
        "results": [r.summary() for r in results], "comparisons": comparisons,
    }
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return report


if __name__ == "__main__":
    main()
