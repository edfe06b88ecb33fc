"""Reads the device timeline of a `PAGODA_TORCH_PROFILER_DIR` trace (engine/worker/step_profiler.py).

    python -m bench.trace_summary /tmp/prof/rank0.trace.json.gz [--top 25] [--gap-us 5]

Prints, over the window: the span from the first kernel's start to the last one's end, the time
some kernel ran (union over streams) and the idle rest; the kernels grouped by name with their
total and mean time; and the idle gaps longer than --gap-us, totalled by the kernel before them.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict


def load_kernels(path: str) -> list[tuple[float, float, str, int]]:
    """(start us, duration us, name, stream) of every device kernel/memcpy/memset event."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kernels = [(float(e["ts"]), float(e.get("dur", 0.0)), e.get("name", "?"), int(e.get("tid", 0)))
               for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(kernels)


def short_name(name: str) -> str:
    name = re.sub(r"<.*", "", name)               # template arguments
    name = re.sub(r"\(.*", "", name)
    return name[:80]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--gap-us", type=float, default=5.0)
    args = parser.parse_args()
    kernels = load_kernels(args.trace)
    if not kernels:
        raise SystemExit(f"{args.trace} has no device kernels (a CPU run?)")
    start = kernels[0][0]
    end = max(ts + dur for ts, dur, _, _ in kernels)
    busy = 0.0
    cursor = start
    gaps: dict[str, list[float]] = defaultdict(list)
    previous = "(start)"
    for ts, dur, name, _ in kernels:
        if ts > cursor:
            if ts - cursor >= args.gap_us:
                gaps[previous].append(ts - cursor)
        busy += max(0.0, ts + dur - max(ts, cursor))
        if ts + dur > cursor:
            cursor = ts + dur
            previous = short_name(name)
    span = end - start
    print(f"span {span / 1e3:.3f} ms, busy {busy / 1e3:.3f} ms ({100 * busy / span:.1f}%), "
          f"idle {(span - busy) / 1e3:.3f} ms, {len(kernels)} device events")
    by_name: dict[str, list[float]] = defaultdict(list)
    for _, dur, name, _ in kernels:
        by_name[short_name(name)].append(dur)
    print(f"\n{'kernel':80s} {'total ms':>9s} {'share':>6s} {'calls':>6s} {'mean us':>8s}")
    for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        print(f"{name:80s} {sum(durs) / 1e3:9.3f} {100 * sum(durs) / busy:5.1f}% {len(durs):6d} {sum(durs) / len(durs):8.1f}")
    print(f"\nidle gaps >= {args.gap_us} us, by the kernel before them")
    for name, values in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        print(f"{name:80s} {sum(values) / 1e3:9.3f} ms {len(values):6d} gaps, max {max(values):8.1f} us")


if __name__ == "__main__":
    main()
