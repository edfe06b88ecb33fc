"""Perplexity of one model across weight and KV-cache formats, on a fixed English text in the repo.

    python -m bench.perplexity                                   # default model, CPU, every variant
    python -m bench.perplexity --variants unquantized,fp8,kv-fp8 --dtype bfloat16
    python -m bench.perplexity --model DIR_OF_A_BF16_CHECKPOINT --extra int4=DIR_OF_ITS_INT4_CHECKPOINT

The text (`bench/data/sonnets.txt`, public domain, see bench/data/README.md) is tokenized once, cut
into windows of `--window` tokens, and every window is scored as a prompt: the engine's prompt
logprobs give log p(token i | tokens < i) for i >= 1 of each window; perplexity = exp(-mean). Every
variant scores the same token ids, one engine each, one after the other.

Variants (engine options on top of `--model` / `--dtype` / `--device`):
  unquantized   the weights in --dtype (a GGUF file dequantized to it)
  fp8           FP8 W8A8 quantized at load (--quantization fp8)
  kv-fp8        an FP8 KV cache with scales 1.0 (--kv-cache-dtype fp8)
  kv-fp8-calib  an FP8 KV cache with scales calibrated on the first window (--calculate-kv-scales)
  fp8+kv-fp8    both
  gguf          a GGUF file's own blocks kept quantized (--quantization gguf)
  NAME=PATH     (--extra) another checkpoint of the same model, e.g. an INT4 one made with llm-compressor
Each row reports perplexity and its change against the first variant.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):          # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXT = Path(__file__).resolve().parent / "data" / "sonnets.txt"

VARIANTS: dict[str, dict[str, Any]] = {
    "unquantized": {},
    "fp8": {"quantization": "fp8"},
    "kv-fp8": {"kv_cache_dtype": "fp8"},
    "kv-fp8-calib": {"kv_cache_dtype": "fp8", "calculate_kv_scales": True},
    "fp8+kv-fp8": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
    "gguf": {"quantization": "gguf"},
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct Q4_1 GGUF) or a path")
    p.add_argument("--variants", default="unquantized,fp8,kv-fp8,kv-fp8-calib,fp8+kv-fp8,gguf",
                   help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=PATH",
                   help="another checkpoint of the same model (same tokenizer) to score as variant NAME")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--window", type=int, default=1024, help="tokens per scored window")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    args.variant_list = [(name, args.model, VARIANTS[name]) for name in names]
    for item in args.extra:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--extra must be NAME=PATH, got {item!r}")
        args.variant_list.append((name, path, {}))
    if args.window < 2:
        p.error(f"--window must be >= 2, got {args.window}")
    return args


def text_token_ids(tokenizer: Any, max_tokens: Optional[int]) -> list[int]:
    ids = tokenizer(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return ids[:max_tokens] if max_tokens else ids


def windows(ids: list[int], size: int) -> list[list[int]]:
    """Consecutive windows of `size` tokens (the last one shorter; one of a single token is dropped:
    it predicts nothing)."""
    return [ids[i:i + size] for i in range(0, len(ids), size) if len(ids[i:i + size]) >= 2]


def score(model: str, engine_options: dict[str, Any], token_windows: list[list[int]], args: argparse.Namespace
          ) -> dict[str, Any]:
    """(sum of log p over every predicted token, their count, start-up seconds, scoring seconds)."""
    from pagoda.engine import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=model, dtype=args.dtype, device=args.device, max_model_len=args.window + 1,
              seed=0, **engine_options)
    load_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": w} for w in token_windows],
                               SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
        score_s = time.perf_counter() - start
    finally:
        llm.shutdown()
    total, count = 0.0, 0
    for window, output in zip(token_windows, outputs):
        entries = output.prompt_logprobs
        assert entries is not None and len(entries) == len(window), (len(entries or []), len(window))
        for token, entry in zip(window[1:], entries[1:]):
            value = entry[token]
            total += value.logprob if hasattr(value, "logprob") else float(value)
            count += 1
    return {"sum_logprob": total, "tokens": count, "perplexity": math.exp(-total / count),
            "load_s": load_s, "score_s": score_s}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    from pagoda.engine.model_loader.model_source import resolve_model
    from pagoda.engine.processing.tokenizer import load_tokenizer

    ids = text_token_ids(load_tokenizer(resolve_model(args.model)), args.max_tokens)
    token_windows = windows(ids, args.window)
    print(f"perplexity bench: {TEXT.name}, {len(ids):,} tokens in {len(token_windows)} windows of <= {args.window}; "
          f"model {args.model}, dtype {args.dtype}, device {args.device}")
    rows: list[dict[str, Any]] = []
    for name, model, options in args.variant_list:
        result = score(model, options, token_windows, args)
        result.update(variant=name, model=model, options=options)
        rows.append(result)
        print(f"[{name}] perplexity {result['perplexity']:.4f} over {result['tokens']:,} tokens "
              f"(start-up {result['load_s']:.1f} s, scoring {result['score_s']:.1f} s)")
    base = rows[0]["perplexity"]
    print(f"\n{'variant':<16} {'perplexity':>11} {'vs ' + rows[0]['variant']:>18}")
    for row in rows:
        row["change_pct"] = 100.0 * (row["perplexity"] / base - 1.0)
        print(f"{row['variant']:<16} {row['perplexity']:>11.4f} {row['change_pct']:>+17.2f}%")
    report = {"text": TEXT.name, "tokens": len(ids), "window": args.window, "dtype": args.dtype,
              "device": args.device, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
