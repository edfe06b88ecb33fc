"""Serving benchmark through the Ray Serve ingress: one workload, several replica layouts, one table.

    # on a 2-GPU host: W256 through the HTTP ingress, three layouts and the standalone server
    python -m bench.cluster_bench --model llama3-8b-random --layouts 1xtp1 2xtp1 1xtp2 standalone \\
        --workload w256 --json results/cluster_w256.json

A layout `NxtpK` deploys `pagoda.cluster.app:build_app` with N replicas of tensor_parallel_size K
(N*K GPUs) on a local Ray cluster (started here, or joined with --address), serves it on --port, sends
the workload with `bench.serving` (streamed /v1/completions, token-id prompts, ignore_eos, greedy; all
requests at once unless --request-rate), then deletes the application before the next layout.
`standalone` runs the same workload against `pagoda serve --standalone` (one process, no Ray) on the
first GPU: the 1xtp1 row minus it is what the Serve ingress and routing cost. A suffix picks where
the model runs: `1xtp1:uni` / `standalone:uni` in the serving process, `:mp` in a worker process
(`ModelDeployment.distributed_executor_backend`).

Untimed before each run: the deployment's start-up (printed) and --warmup-requests short requests.
Reported per layout: bench.serving's numbers (duration, req/s, output tok/s, TTFT/TPOT/ITL/E2E
mean, p50, p99) plus how the replicas shared the work (generated tokens per replica, from their own
stats). CPU smoke run: --device cpu --model tiny-random --workload s64 --vocab-size 16384.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import httpx

if __package__ in (None, ""):          # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.models import resolve_bench_model, server_engine_args  # noqa: E402
from bench.serving import format_result, run_rate  # noqa: E402
from bench.workloads import WORKLOADS, BenchRequest, make_w256, make_workload  # noqa: E402

APP_NAME = "pagoda-bench"
SERVED_NAME = "bench"
READY_TIMEOUT_S = 1800.0
_LAYOUT = re.compile(r"^(\d+)xtp(\d+)(?::(uni|mp|ray))?$")


def parse_layout(text: str) -> tuple[int, int, Optional[str]]:
    """'2xtp1' -> (replicas, tensor_parallel_size, None); '1xtp1:uni' also names the executor backend."""
    match = _LAYOUT.match(text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(f"layout {text!r} is not NxtpK[:uni|mp|ray] (e.g. 1xtp1, 2xtp1, 1xtp2, 1xtp1:uni) "
                         "or 'standalone'")
    return int(match.group(1)), int(match.group(2)), match.group(3)


def app_args(model: str, engine_args: dict[str, Any], replicas: int, tp: int, num_gpus_per_worker: float,
             max_ongoing_requests: int, executor_backend: Optional[str] = None,
             ingress_replicas: int = 1) -> dict[str, Any]:
    deployment = {
        "model": model, "served_model_name": SERVED_NAME, "tensor_parallel_size": tp, "num_replicas": replicas,
        "num_gpus_per_worker": num_gpus_per_worker, "max_ongoing_requests": max_ongoing_requests,
        "target_ongoing_requests": min(32, max_ongoing_requests), "engine_args": engine_args}
    if executor_backend is not None:
        deployment["distributed_executor_backend"] = executor_backend
    return {"models": [deployment], "ingress_replicas": ingress_replicas}


def add_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """Gives a random-weight model a tokenizer: token i <-> the word "t<i>" (a WordLevel vocabulary).

    NOTE: the OpenAI server streams text, and a model without a tokenizer streams no chunks until it
    finishes, so TTFT/ITL could not be measured; this one costs a real incremental detokenization.
    """
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)      # joins words with spaces
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(str(directory))


def run_workload(base_url: str, requests: list[BenchRequest], args: argparse.Namespace) -> Any:
    if args.warmup_requests:
        warmup = [BenchRequest(r.prompt_token_ids[:32], 4) for r in requests[:args.warmup_requests]]
        asyncio.run(run_rate(base_url, SERVED_NAME, warmup, math.inf, None, {}, {}, 0))
    return asyncio.run(run_rate(base_url, SERVED_NAME, requests, args.request_rate, args.max_concurrency, {}, {}, 0,
                                args.client_processes))


def wait_ready(base_url: str, timeout_s: float, process: Optional[subprocess.Popen] = None) -> float:
    start = time.monotonic()
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            response = httpx.post(f"{base_url}/v1/completions", timeout=60,
                                  json={"model": SERVED_NAME, "prompt": [1, 2, 3], "max_tokens": 1})
            if response.status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{base_url} not ready after {timeout_s:.0f} s")
        time.sleep(2)


def bench_layout(layout: str, args: argparse.Namespace, model: str, engine_args: dict[str, Any],
                 requests: list[BenchRequest]) -> dict[str, Any]:
    from ray import serve

    from pagoda.cluster.app import build_app

    replicas, tp, backend = parse_layout(layout)
    num_gpus = 0.0 if args.device == "cpu" else 1.0
    base_url = f"http://127.0.0.1:{args.port}"
    started = time.monotonic()
    serve.run(build_app(app_args(model, engine_args, replicas, tp, num_gpus, args.max_ongoing_requests, backend,
                                 args.ingress_replicas)),
              name=APP_NAME, route_prefix="/", blocking=False)
    try:
        wait_ready(base_url, READY_TIMEOUT_S)
        # NOTE: the app answers as soon as one replica is up; a burst sent before the others report
        # would all land on that one.
        wait_replicas(replicas, READY_TIMEOUT_S - (time.monotonic() - started))
        startup_s = time.monotonic() - started
        before = _generation_tokens()
        result = run_workload(base_url, requests, args)
        time.sleep(3)                  # one more stats report after the last request
        after = _generation_tokens()
    finally:
        serve.delete(APP_NAME)
    per_replica = {replica: tokens - before.get(replica, 0) for replica, tokens in after.items()}
    return {"layout": layout, "startup_s": startup_s, "result": result, "generation_tokens_per_replica": per_replica}


def wait_replicas(replicas: int, timeout_s: float) -> None:
    """Until every replica of the layout has reported its stats (so routers see them all)."""
    deadline = time.monotonic() + timeout_s
    while len(_generation_tokens()) < replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {replicas} replicas reported within {timeout_s:.0f} s")
        time.sleep(1)


def _generation_tokens() -> dict[str, int]:
    from ray import serve

    rows = serve.get_app_handle(APP_NAME).status.remote().result(timeout_s=60)
    return {row["replica"]: row["generation_tokens"] for row in rows}


def _scaled(requests: list[BenchRequest], args: argparse.Namespace, replicas: int) -> list[BenchRequest]:
    """The layout's requests: `replicas` interleaved copies of the workload under --per-replica."""
    if not args.per_replica or replicas == 1:
        return requests
    if args.workload != "w256":
        raise ValueError("--per-replica draws its copies of W256 only")
    copies = [requests] + [make_w256(len(requests), seed=i) for i in range(1, replicas)]
    return [copy[i] for i in range(len(requests)) for copy in copies]


def _is_standalone(layout: str) -> bool:
    return layout in ("standalone", "standalone:uni", "standalone:mp")


def bench_standalone(layout: str, args: argparse.Namespace, model: str, engine_args: dict[str, Any],
                     requests: list[BenchRequest]) -> dict[str, Any]:
    port = _free_port()
    command = [sys.executable, "-m", "pagoda.engine.entrypoints.cli", "serve", model, "--standalone",
               "--port", str(port), "--served-model-name", SERVED_NAME, "--uvicorn-log-level", "warning"]
    if ":" in layout:
        command += ["--distributed-executor-backend", layout.split(":")[1]]
    for name, value in engine_args.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    env = dict(os.environ)
    if args.device != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    started = time.monotonic()
    process = subprocess.Popen(command, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", READY_TIMEOUT_S, process)
        startup_s = time.monotonic() - started
        result = run_workload(f"http://127.0.0.1:{port}", requests, args)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    return {"layout": layout, "startup_s": startup_s, "result": result, "generation_tokens_per_replica": {}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'layout':<13} {'start s':>8} {'dur s':>7} {'ok':>5} {'req/s':>7} {'out tok/s':>10} "
             f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'ITL p99':>8}  tokens per replica"]
    for row in rows:
        r = row["result"]

        def ms(summary: Any, field: str) -> str:
            return f"{getattr(summary, field + '_ms'):.0f}ms" if summary is not None else "-"

        shares = sorted(row["generation_tokens_per_replica"].values(), reverse=True)
        lines.append(f"{row['layout']:<13} {row['startup_s']:>8.1f} {r.duration_s:>7.1f} {r.completed:>5} "
                     f"{r.request_throughput:>7.2f} {r.output_throughput:>10.0f} {ms(r.ttft, 'p50'):>9} "
                     f"{ms(r.ttft, 'p99'):>9} {ms(r.tpot, 'p50'):>9} {ms(r.itl, 'p99'):>8}  {shares or '-'}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b-random", help="a bench model name or a checkpoint path")
    parser.add_argument("--layouts", nargs="+", default=["1xtp1", "2xtp1", "1xtp2"])
    parser.add_argument("--workload", default="w256", choices=[w for w in WORKLOADS if w != "batch1"])
    parser.add_argument("--vocab-size", type=int, default=None, help="for s64 / shared-prefix")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--request-rate", type=float, default=math.inf)
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--ingress-replicas", type=int, default=1, help="HTTP ingress replicas of the app")
    parser.add_argument("--per-replica", action="store_true",
                        help="weak scaling: a layout of N replicas gets N copies of the workload (copy i of "
                             "W256 drawn with seed i; copy 0 is W256 itself), so each replica has one "
                             "W256 of load; without it every layout gets the same single workload")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="send from this many processes (one Python client tops out at 10-20k events/s)")
    parser.add_argument("--max-ongoing-requests", type=int, default=256,
                        help="per replica (Serve); W256 sends 256 at once")
    parser.add_argument("--warmup-requests", type=int, default=8)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="extra engine option (JSON value), e.g. max_num_seqs=256")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    parser.add_argument("--port", type=int, default=8000, help="Serve's HTTP port")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for layout in args.layouts:
        if not _is_standalone(layout):
            parse_layout(layout)
    bench_model = resolve_bench_model(args.model, args.dtype)
    if bench_model.load_format == "dummy":
        config = json.loads((Path(bench_model.model) / "config.json").read_text())
        add_word_tokenizer(Path(bench_model.model), int(config["vocab_size"]))
    requests = make_workload(args.workload, args.vocab_size, args.num_prompts)
    engine_args = server_engine_args(bench_model, args.device, args.dtype, args.engine_arg)
    print(f"{args.workload}: {len(requests)} requests -> layouts {args.layouts} (model {args.model})")

    import ray
    from ray import serve

    ray.init(address=args.address, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    rows = []
    try:
        for layout in args.layouts:
            if _is_standalone(layout):
                row = bench_standalone(layout, args, bench_model.model, engine_args, requests)
            else:
                row = bench_layout(layout, args, bench_model.model, engine_args,
                                   _scaled(requests, args, parse_layout(layout)[0]))
            print(f"\n[{layout}] start-up {row['startup_s']:.1f} s\n{format_result(row['result'])}")
            rows.append(row)
    finally:
        if args.address is None:
            serve.shutdown()
        ray.shutdown()
    print("\n" + format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "workload": args.workload, "model": args.model, "num_requests": len(requests),
            "rows": [{**row, "result": asdict(row["result"])} for row in rows]}, indent=2, default=str))
    return 0 if all(row["result"].failed == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
