"""Where an offline run's time goes, step by step: host phases vs GPU forward.

    python -m bench.profile_steps --model llama3-8b-random --workload w256 [--num-prompts N]

Wraps the engine's phases with timers (no engine changes): schedule, input preparation, forward
(measured to a device sync at the start of `compute_logits`, so it is GPU time plus any launch
time the host spent), sampling (logits -> token ids on the host), scheduler update, output
processing. Decode-only steps and steps with prefill work are reported apart. The sync makes the
run slightly slower than an unprofiled one; the split, not the total, is the point.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.models import resolve_bench_model  # noqa: E402
from bench.workloads import make_workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b-random")
    parser.add_argument("--workload", default="w256")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    args = parser.parse_args()

    from pagoda.engine import SamplingParams
    from pagoda.engine.core.scheduler import Scheduler
    from pagoda.engine.llm import LLM
    from pagoda.engine.worker.model_runner import ModelRunner

    bench_model = resolve_bench_model(args.model)
    llm = LLM(model=bench_model.model, load_format=bench_model.load_format, skip_tokenizer_init=True,
              max_num_seqs=args.max_num_seqs)
    runner: ModelRunner = llm.engine.core.executor.runner
    scheduler: Scheduler = llm.engine.core.scheduler
    cuda = runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    state = {"kind": "decode", "mark": 0.0}

    def timed(obj, name, phase, before=None):
        original = getattr(obj, name)

        def wrapper(*a, **k):
            if before is not None:
                before()
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                totals[state["kind"]][phase] += time.perf_counter() - start
        setattr(obj, name, wrapper)

    original_prepare = runner._prepare_inputs

    def prepare(scheduler_output):
        state["kind"] = "decode" if all(len(s.token_ids) == 1 for s in scheduler_output.scheduled) else "prefill"
        start = time.perf_counter()
        result = original_prepare(scheduler_output)
        now = time.perf_counter()
        totals[state["kind"]]["prepare"] += now - start
        totals[state["kind"]]["steps"] += 1
        state["mark"] = now
        return result
    runner._prepare_inputs = prepare

    original_logits = runner.model.compute_logits

    def compute_logits(hidden):
        sync()
        totals[state["kind"]]["forward"] += time.perf_counter() - state["mark"]
        return original_logits(hidden)
    runner.model.compute_logits = compute_logits
    timed(scheduler, "schedule", "schedule")
    timed(scheduler, "update_from_output", "update")
    timed(runner, "_launch_sampling", "logits+sample")
    timed(llm.engine.output_processor, "process", "output")

    requests = make_workload(args.workload, llm.engine.config.model.vocab_size)
    if args.num_prompts:
        requests = requests[: args.num_prompts]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True, detokenize=False)
              for r in requests]
    warmup = prompts[:4]
    llm.generate(warmup, [SamplingParams(max_tokens=4, ignore_eos=True)] * len(warmup), use_tqdm=False)
    totals.clear()
    sync()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    sync()
    wall = time.perf_counter() - start
    out_tokens = sum(r.output_len for r in requests)
    print(f"{len(requests)} requests, {out_tokens} output tokens in {wall:.2f} s = {out_tokens / wall:,.0f} tok/s")
    phases = ["schedule", "prepare", "forward", "logits+sample", "update", "output"]
    print(f"{'steps':8} {'count':>6} " + " ".join(f"{p:>14}" for p in phases) + f" {'ms/step':>8}")
    for kind, row in totals.items():
        steps = row["steps"] or 1
        cells = " ".join(f"{row[p]:8.2f}s {1000 * row[p] / steps:4.1f}" for p in phases)
        print(f"{kind:8} {int(row['steps']):6} {cells} {1000 * sum(row[p] for p in phases) / steps:8.2f}")
    print("(each cell: total seconds, then ms per step)")


if __name__ == "__main__":
    main()
