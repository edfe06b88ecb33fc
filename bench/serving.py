"""Online serving benchmark: a benchmark workload sent to any OpenAI-compatible server over HTTP.

    python -m bench.serving --base-url http://127.0.0.1:8000 --workload s64 --vocab-size 49152 \\
        --request-rate 1 4 inf
    python -m bench.serving --base-url http://gpu-host:8000 --workload w256 --request-rate inf \\
        --max-concurrency 64 --goodput ttft:500 tpot:50

Each request streams `POST /v1/completions` with the prompt as token ids, `max_tokens` = its output
length, `ignore_eos` (vLLM's extension, so every request produces exactly its output length) and
temperature 0. Arrivals are a Poisson process at each `--request-rate` (requests/s; `inf` sends
them all at once), run one rate after another; `--max-concurrency` caps requests in flight;
`--client-processes K` sends from K processes (one Python client tops out at some 10-20k events/s).

Reported per rate (mean, p50, p99 for the latencies):
- TTFT: request sent -> first streamed chunk with content;
- TPOT: per request, (end-to-end - TTFT) / (output tokens - 1);
- ITL: gaps between consecutive content chunks (a chunk can carry more than one token);
- end-to-end latency; request and token throughput over the run's duration;
- goodput: requests/s that met every SLO given with --goodput (ttft, tpot, e2el, in ms).
A request that errors or does not return exactly its output length counts as failed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import httpx

if __package__ in (None, ""):          # run as a script (python bench/serving.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workloads import WORKLOADS, BenchRequest, make_workload  # noqa: E402

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_len: int                      # what was asked for
    output_tokens: int = 0               # what came back
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> Optional[float]:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass
class LatencySummary:
    mean_ms: float
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, values_s: Sequence[float]) -> Optional["LatencySummary"]:
        if not values_s:
            return None
        ordered = sorted(values_s)
        return cls(1000 * sum(ordered) / len(ordered), 1000 * percentile(ordered, 50), 1000 * percentile(ordered, 99))


@dataclass
class RateResult:
    request_rate: float
    max_concurrency: Optional[int]
    duration_s: float
    completed: int
    failed: int
    prompt_tokens: int
    output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: Optional[LatencySummary]
    tpot: Optional[LatencySummary]
    itl: Optional[LatencySummary]
    e2el: Optional[LatencySummary]
    goodput: Optional[float]
    slos_ms: dict[str, float]
    errors: list[str]


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of an ascending sequence (numpy's default)."""
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def parse_slos(items: Sequence[str]) -> dict[str, float]:
    slos = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in SLO_METRICS or not value:
            raise ValueError(f"--goodput takes NAME:MS with NAME in {SLO_METRICS}, got {item!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput value must be milliseconds, got {item!r}") from None
    return slos


def meets_slos(result: RequestResult, slos_ms: dict[str, float]) -> bool:
    measured = {"ttft": result.ttft_s, "tpot": result.tpot_s or 0.0, "e2el": result.e2e_s}
    return result.ok and all(1000 * measured[name] <= limit for name, limit in slos_ms.items())


async def send_one(http: httpx.AsyncClient, url: str, model: str, request: BenchRequest,
                   headers: dict[str, str]) -> RequestResult:
    body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult(ok=False, prompt_len=request.prompt_len, output_len=request.output_len)
    start = time.perf_counter()
    last_chunk_at: Optional[float] = None
    chunks = 0
    try:
        async with http.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    result.error = str(event["error"].get("message"))
                    return result
                if event.get("usage"):
                    result.output_tokens = int(event["usage"]["completion_tokens"])
                if any(choice.get("text") for choice in event.get("choices", [])):
                    now = time.perf_counter()
                    if last_chunk_at is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last_chunk_at)
                    last_chunk_at = now
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.e2e_s = time.perf_counter() - start
    if last_chunk_at is None:             # no visible text at all: first token ~ end of the stream
        result.ttft_s = result.e2e_s
    if result.output_tokens == 0:         # a server without usage in streams: count content chunks
        result.output_tokens = chunks
    result.ok = result.output_tokens == request.output_len
    if not result.ok:
        result.error = f"asked for {request.output_len} tokens, got {result.output_tokens}"
    return result


async def _send_all(base_url: str, model: str, requests: list[BenchRequest], request_rate: float,
                    max_concurrency: Optional[int], headers: dict[str, str], seed: int,
                    start_at: Optional[float] = None) -> tuple[list[RequestResult], float, float]:
    """Sends `requests` (Poisson arrivals at request_rate/s); returns the results and the run's
    start and end on `time.monotonic()` (one clock for every process of this host)."""
    url = f"{base_url}/v1/completions"
    rng = random.Random(seed)
    limit = max_concurrency or len(requests)
    semaphore = asyncio.Semaphore(limit)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as http:
        async def limited(request: BenchRequest) -> RequestResult:
            async with semaphore:
                return await send_one(http, url, model, request, headers)

        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        start = time.monotonic()
        tasks = []
        for index, request in enumerate(requests):
            tasks.append(asyncio.create_task(limited(request)))
            if math.isfinite(request_rate) and index + 1 < len(requests):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        end = time.monotonic()
    return list(results), start, end


def _client_process(args: tuple) -> tuple[list[RequestResult], float, float]:
    return asyncio.run(_send_all(*args))


async def run_rate(base_url: str, model: str, requests: list[BenchRequest], request_rate: float,
                   max_concurrency: Optional[int], headers: dict[str, str], slos_ms: dict[str, float],
                   seed: int, client_processes: int = 1) -> RateResult:
    """One run at `request_rate`. With client_processes > 1 the requests are dealt round-robin to
    that many processes (at most max_concurrency of them), each sending its share (rate/k, and a
    share of the concurrency cap; the shares add up to the cap) from one common start: a single
    Python client parses some 10-20k SSE events/s, which a fast server can exceed.
    NOTE: ITL is measured between SSE events; a server that merges tokens for a slow reader sends
    fewer, larger events."""
    if client_processes < 1:
        raise ValueError(f"client_processes must be >= 1, got {client_processes}")
    processes = min(client_processes, len(requests), max_concurrency or len(requests))
    if processes <= 1:
        results, start, end = await _send_all(base_url, model, requests, request_rate, max_concurrency,
                                              headers, seed)
    else:
        import concurrent.futures
        import multiprocessing

        shards = [requests[i::processes] for i in range(processes)]
        # the cap split exactly: the shares add up to max_concurrency (each >= 1: processes <= cap)
        caps: list[Optional[int]] = [None] * processes if max_concurrency is None else \
            [max_concurrency // processes + (i < max_concurrency % processes) for i in range(processes)]
        start_at = time.monotonic() + 3.0           # process start-up and imports happen before it
        jobs = [(base_url, model, shard, request_rate / processes, caps[i], headers, seed + i, start_at)
                for i, shard in enumerate(shards)]
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            loop = asyncio.get_running_loop()
            parts = await asyncio.gather(*(loop.run_in_executor(pool, _client_process, job) for job in jobs))
        results = [r for part, _, _ in parts for r in part]
        start, end = min(p[1] for p in parts), max(p[2] for p in parts)
    duration = end - start
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_len for r in done)
    return RateResult(
        request_rate=request_rate, max_concurrency=max_concurrency, duration_s=duration, completed=len(done),
        failed=len(results) - len(done), prompt_tokens=prompt_tokens, output_tokens=output_tokens,
        request_throughput=len(done) / duration, output_throughput=output_tokens / duration,
        total_token_throughput=(prompt_tokens + output_tokens) / duration,
        ttft=LatencySummary.of([r.ttft_s for r in done]),
        tpot=LatencySummary.of([r.tpot_s for r in done if r.tpot_s is not None]),
        itl=LatencySummary.of([gap for r in done for gap in r.itl_s]),
        e2el=LatencySummary.of([r.e2e_s for r in done]),
        goodput=sum(meets_slos(r, slos_ms) for r in results) / duration if slos_ms else None,
        slos_ms=slos_ms, errors=sorted({r.error for r in results if r.error})[:5])


def served_model(base_url: str, headers: dict[str, str]) -> str:
    response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def format_result(result: RateResult) -> str:
    rate = "inf" if math.isinf(result.request_rate) else f"{result.request_rate:g}"
    lines = [f"== request rate {rate}/s, max concurrency {result.max_concurrency or 'unbounded'} ==",
             f"  completed {result.completed}, failed {result.failed}, duration {result.duration_s:.2f} s",
             f"  throughput: {result.request_throughput:.2f} req/s, {result.output_throughput:.1f} output tok/s, "
             f"{result.total_token_throughput:.1f} total tok/s"]
    for name in ("ttft", "tpot", "itl", "e2el"):
        summary: Optional[LatencySummary] = getattr(result, name)
        if summary is not None:
            lines.append(f"  {name.upper():5s} ms: mean {summary.mean_ms:9.2f}  p50 {summary.p50_ms:9.2f}  "
                         f"p99 {summary.p99_ms:9.2f}")
    if result.goodput is not None:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in result.slos_ms.items())
        lines.append(f"  goodput: {result.goodput:.2f} req/s ({slos})")
    for error in result.errors:
        lines.append(f"  error: {error}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    parser.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    parser.add_argument("--api-key", default=os.environ.get("PAGODA_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--workload", default="s64", choices=[w for w in WORKLOADS if w != "batch1"])
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="the model's vocabulary size (s64 and shared-prefix draw ids below it)")
    parser.add_argument("--num-prompts", type=int, default=None, help="keep the workload's first N requests")
    parser.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                        help="requests/s of the Poisson arrivals, one run per value; inf = all at once")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--goodput", nargs="*", default=[], metavar="NAME:MS",
                        help=f"SLOs for goodput, NAME in {SLO_METRICS}, e.g. ttft:500 tpot:50")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="send from this many processes (a fast server outruns one Python client)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        slos_ms = parse_slos(args.goodput)
        if args.workload != "w256" and args.vocab_size is None:
            raise ValueError(f"--vocab-size is needed for the {args.workload} workload (e.g. 49152 for the "
                             "default model)")
        if any(rate <= 0 for rate in args.request_rate):
            raise ValueError(f"--request-rate values must be > 0 (or inf), got {args.request_rate}")
        if args.max_concurrency is not None and args.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
        if args.client_processes < 1:
            raise ValueError(f"--client-processes must be >= 1, got {args.client_processes}")
        requests = make_workload(args.workload, args.vocab_size or 0, args.num_prompts)
    except ValueError as error:
        print(f"bench.serving: error: {error}", file=sys.stderr)
        return 2
    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or served_model(base_url, headers)
    print(f"{args.workload}: {len(requests)} requests, {sum(r.prompt_len for r in requests)} prompt tokens, "
          f"{sum(r.output_len for r in requests)} output tokens -> {base_url} (model {model!r})")
    results = []
    for rate in args.request_rate:
        result = asyncio.run(run_rate(base_url, model, requests, rate, args.max_concurrency, headers, slos_ms,
                                      args.seed, args.client_processes))
        print(format_result(result))
        results.append(result)
    if args.json is not None:
        payload = [{**asdict(r), "request_rate": "inf" if math.isinf(r.request_rate) else r.request_rate}
                   for r in results]
        args.json.write_text(json.dumps({"workload": args.workload, "base_url": base_url, "model": model,
                                         "num_requests": len(requests), "results": payload}, indent=2))
    return 0 if all(r.failed == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
