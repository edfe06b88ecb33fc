"""Prometheus metrics of served models, in vLLM's vocabulary under the `pagoda:` prefix.

Every series carries a `model_name` label. Two inputs feed them:
- `record_stats(model_name, stats)`: the engine's own counters and gauges (`EngineStats`: running and
  waiting requests, KV-cache usage, prefix-cache queries/hits, preemptions, token counts, and with
  speculative decoding its drafts / draft tokens / accepted tokens, per draft position too), exported as
  they are at scrape time (the engine keeps the running totals, so nothing is double counted);
- `observe(model_name, output, now)`: per-request latencies read from the stream of `RequestOutput`s
  (time to first token, inter-token latency, end-to-end latency, queue time) and finish reasons.
  The same observations feed each model's `RollingStats` (rolling_stats.py: the last minute's TTFT,
  inter-token latency and tokens per second, which the console reads through `rolling(model_name)`).

Each `EngineMetrics` owns a private `CollectorRegistry` (never prometheus_client's global one), so
several engines or apps can live in one process. An ingress that forwards to replicas can keep its
own `EngineMetrics`, observe the outputs it streams and record aggregated stats the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .outputs import EngineStats, RequestOutput
from .rolling_stats import RollingStats

PREFIX = "pagoda:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets as vLLM's, so dashboards written for vLLM read these too.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class _RequestTiming:
    num_tokens: int = 0
    last_token_time: Optional[float] = None


class _StatsCollector(Collector):
    """Exports the latest `EngineStats` per model at scrape time."""

    def __init__(self) -> None:
        self.stats: dict[str, EngineStats] = {}

    def collect(self) -> Iterator:
        gauges = (
            ("num_requests_running", "Number of requests in model execution batches.", "num_running"),
            ("num_requests_waiting", "Number of requests waiting to be processed.", "num_waiting"),
            ("kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent of blocks in use.", "kv_cache_usage"),
        )
        counters = (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
            ("num_preemptions", "Cumulative number of preemptions.", "num_preemptions"),
            ("prompt_tokens", "Number of prefill tokens processed.", "prompt_tokens"),
            ("generation_tokens", "Number of generation tokens processed.", "generation_tokens"),
        )
        for name, doc, field in gauges:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            for model_name, stats in self.stats.items():
                family.add_metric([model_name], float(getattr(stats, field)))
            yield family
        for name, doc, field in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            for model_name, stats in self.stats.items():
                family.add_metric([model_name], float(getattr(stats, field)))
            yield family
        yield from self._spec_decode()

    def _spec_decode(self) -> Iterator:
        """vLLM's speculative-decoding counters, for the models that speculate (K per-position
        entries: the series exist once speculation is configured, zeros included)."""
        speculating = {name: stats for name, stats in self.stats.items()
                       if stats.spec_decode_num_accepted_tokens_per_pos}
        if not speculating:
            return
        counters = (
            ("spec_decode_num_drafts", "Number of spec decoding drafts (verifications of a request's drafts).",
             "spec_decode_num_drafts"),
            ("spec_decode_num_draft_tokens", "Number of draft tokens.", "spec_decode_num_draft_tokens"),
            ("spec_decode_num_accepted_tokens", "Number of accepted tokens.", "spec_decode_num_accepted_tokens"),
        )
        for name, doc, field in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            for model_name, stats in speculating.items():
                family.add_metric([model_name], float(getattr(stats, field)))
            yield family
        family = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                     "Accepted tokens per draft position.", labels=["model_name", "position"])
        for model_name, stats in speculating.items():
            for position, count in enumerate(stats.spec_decode_num_accepted_tokens_per_pos):
                family.add_metric([model_name, str(position)], float(count))
        yield family

    def describe(self) -> Iterator:
        return iter(())    # unchecked collector: its names are known to be unique in this registry


class EngineMetrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._stats = _StatsCollector()
        self.registry.register(self._stats)
        labels = ["model_name"]
        self.request_success = Counter(
            PREFIX + "request_success", "Count of finished requests, by finish reason.",
            labels + ["finished_reason"], registry=self.registry)
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time to first token in seconds.", labels,
            buckets=_TTFT_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between consecutive output tokens in seconds.",
            labels, buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "End-to-end request latency in seconds.", labels,
            buckets=_REQUEST_BUCKETS, registry=self.registry)
        self.request_queue_time = Histogram(
            PREFIX + "request_queue_time_seconds", "Time a request waited before it first ran, in seconds.",
            labels, buckets=_REQUEST_BUCKETS, registry=self.registry)
        self._timings: dict[tuple[str, str], _RequestTiming] = {}
        self._rolling: dict[str, RollingStats] = {}

    def rolling(self, model_name: str) -> RollingStats:
        """The model's last-minute window (created empty on first use)."""
        window = self._rolling.get(model_name)
        if window is None:
            window = self._rolling[model_name] = RollingStats()
        return window

    def record_stats(self, model_name: str, stats: EngineStats) -> None:
        self._stats.stats[model_name] = stats

    def observe(self, model_name: str, output: RequestOutput, now: Optional[float] = None) -> None:
        """Records one `RequestOutput` of a request's stream (call it for every output, in order)."""
        now = time.monotonic() if now is None else now
        key = (model_name, output.request_id)
        timing = self._timings.setdefault(key, _RequestTiming())
        metrics = output.metrics
        num_tokens = sum(len(completion.token_ids) for completion in output.outputs)
        if num_tokens > timing.num_tokens and metrics is not None:
            rolling = self.rolling(model_name)
            rolling.add_tokens(num_tokens - timing.num_tokens, now)
            token_time = metrics.last_token_time or now
            if timing.last_token_time is None:
                ttft = max(0.0, (metrics.first_token_time or token_time) - metrics.arrival_time)
                self.time_to_first_token.labels(model_name).observe(ttft)
                rolling.add_ttft(ttft, now)
            else:
                itl = max(0.0, token_time - timing.last_token_time)
                self.inter_token_latency.labels(model_name).observe(itl)
                rolling.add_itl(itl, now)
            timing.num_tokens = num_tokens
            timing.last_token_time = token_time
        if not output.finished:
            return
        del self._timings[key]
        self.rolling(model_name).add_finished()
        if metrics is not None:
            finished = metrics.finished_time or now
            self.e2e_request_latency.labels(model_name).observe(max(0.0, finished - metrics.arrival_time))
            if metrics.first_scheduled_time is not None:
                self.request_queue_time.labels(model_name).observe(
                    max(0.0, metrics.first_scheduled_time - metrics.arrival_time))
        for completion in output.outputs:
            self.request_success.labels(model_name, completion.finish_reason or "abort").inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of everything recorded."""
        return generate_latest(self.registry)
