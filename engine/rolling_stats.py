"""What a server did over the last minute: time to first token, inter-token latency (p50 / p99 / count)
and generated tokens per second, for the console's live view (`GET /v1/cluster/status`).

Prometheus histograms are cumulative and bucketed: a scraper computes rates and quantiles from two
scrapes. The console has no scraper, so the server keeps a rolling window itself:

    time ──> [bucket: 1 s][bucket][bucket] ... [bucket]      at most window_s / bucket_s + 1 buckets
              count, token sum, up to `samples_per_bucket` latency samples (reservoir sampling)

Memory is bounded whatever the load: a bucket keeps every sample until it has `samples_per_bucket`,
then a uniform random subset of that size (Algorithm R), and remembers how many it saw. Quantiles
weight each kept sample by seen / kept, so a busy second counts as much as it should; counts are exact.
Buckets older than the window are dropped as time moves on. Feeding is O(1); `snapshot` sorts at
most (buckets × samples_per_bucket) values, a few milliseconds at the console's polling rate.

Times come from an injected clock (time.monotonic by default; tests pass their own) or from the
caller's `now`, always in seconds.
"""
from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

WINDOW_S = 60.0


@dataclass(frozen=True)
class LatencySummary:
    """Quantiles of one latency over the window, in milliseconds (None when nothing was observed)."""

    p50: Optional[float]
    p99: Optional[float]
    count: int

    def to_dict(self) -> dict[str, Optional[float] | int]:
        return {"p50": self.p50, "p99": self.p99, "count": self.count}


@dataclass(frozen=True)
class RollingSnapshot:
    window_s: float
    ttft_ms: LatencySummary
    itl_ms: LatencySummary
    generation_tokens_per_s: float
    requests_finished_total: int          # cumulative, not windowed: finished requests since start


@dataclass
class _Bucket:
    start: float
    ttft: list[float] = field(default_factory=list)
    ttft_seen: int = 0
    itl: list[float] = field(default_factory=list)
    itl_seen: int = 0
    tokens: int = 0


class RollingStats:
    """TTFT / ITL samples and generated-token counts over the last `window_s` seconds."""

    def __init__(self, window_s: float = WINDOW_S, bucket_s: float = 1.0, samples_per_bucket: int = 256,
                 clock: Callable[[], float] = time.monotonic, rng: Optional[random.Random] = None) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        if not 0 < bucket_s <= window_s:
            raise ValueError(f"bucket_s must be in (0, window_s={window_s}], got {bucket_s!r}")
        if samples_per_bucket < 1:
            raise ValueError(f"samples_per_bucket must be >= 1, got {samples_per_bucket!r}")
        self.window_s = window_s
        self.bucket_s = bucket_s
        self.samples_per_bucket = samples_per_bucket
        self._clock = clock
        self._rng = rng or random.Random(0)
        self._buckets: deque[_Bucket] = deque()
        self._started = clock()
        self.requests_finished_total = 0

    # -- feeding ------------------------------------------------------------------------------------
    def add_ttft(self, seconds: float, now: Optional[float] = None) -> None:
        bucket = self._bucket(now)
        bucket.ttft_seen += 1
        self._keep(bucket.ttft, bucket.ttft_seen, seconds)

    def add_itl(self, seconds: float, now: Optional[float] = None) -> None:
        bucket = self._bucket(now)
        bucket.itl_seen += 1
        self._keep(bucket.itl, bucket.itl_seen, seconds)

    def add_tokens(self, count: int, now: Optional[float] = None) -> None:
        if count > 0:
            self._bucket(now).tokens += count

    def add_finished(self) -> None:
        self.requests_finished_total += 1

    # -- reading ------------------------------------------------------------------------------------
    def snapshot(self, now: Optional[float] = None) -> RollingSnapshot:
        now = self._clock() if now is None else now
        self._expire(now)
        live = [bucket for bucket in self._buckets if bucket.start + self.bucket_s > now - self.window_s]
        tokens = sum(bucket.tokens for bucket in live)
        # NOTE: a server up for 10 s has 10 s of history: dividing by the whole window would
        # understate its rate six times.
        span = min(self.window_s, max(now - self._started, self.bucket_s))
        return RollingSnapshot(
            window_s=self.window_s,
            ttft_ms=_summary([(b.ttft, b.ttft_seen) for b in live]),
            itl_ms=_summary([(b.itl, b.itl_seen) for b in live]),
            generation_tokens_per_s=tokens / span if tokens else 0.0,
            requests_finished_total=self.requests_finished_total)

    def num_kept_samples(self) -> int:
        """Latency values held (bounded by buckets × samples_per_bucket × 2)."""
        return sum(len(b.ttft) + len(b.itl) for b in self._buckets)

    # -- internals ----------------------------------------------------------------------------------
    def _bucket(self, now: Optional[float]) -> _Bucket:
        now = self._clock() if now is None else now
        start = math.floor(now / self.bucket_s) * self.bucket_s
        if self._buckets and self._buckets[-1].start >= start:
            # NOTE: an observation stamped slightly in the past (a token time read before another
            # output's) goes to the newest bucket rather than reopening an old one.
            return self._buckets[-1]
        self._buckets.append(_Bucket(start))
        self._expire(now)
        return self._buckets[-1]

    def _expire(self, now: float) -> None:
        while self._buckets and self._buckets[0].start + self.bucket_s <= now - self.window_s:
            self._buckets.popleft()

    def _keep(self, samples: list[float], seen: int, value: float) -> None:
        """Reservoir sampling: after n values, each is held with probability cap / n."""
        if len(samples) < self.samples_per_bucket:
            samples.append(value)
            return
        slot = self._rng.randrange(seen)
        if slot < self.samples_per_bucket:
            samples[slot] = value


def _summary(buckets: list[tuple[list[float], int]]) -> LatencySummary:
    """p50 / p99 in ms of weighted samples (each kept value stands for seen / kept values)."""
    count = sum(seen for _, seen in buckets)
    if count == 0:
        return LatencySummary(None, None, 0)
    weighted = sorted((value, seen / len(samples)) for samples, seen in buckets if samples for value in samples)
    total = sum(weight for _, weight in weighted)
    return LatencySummary(_quantile(weighted, total, 0.50) * 1000.0, _quantile(weighted, total, 0.99) * 1000.0,
                          count)


def _quantile(weighted: list[tuple[float, float]], total: float, q: float) -> float:
    """The smallest value whose cumulative weight reaches q of the total (nearest rank)."""
    target = q * total
    cumulative = 0.0
    for value, weight in weighted:
        cumulative += weight
        # NOTE: a small tolerance, as weights are fractions and their sum is rounded
        if cumulative >= target - 1e-9 * total:
            return value
    return weighted[-1][0]
