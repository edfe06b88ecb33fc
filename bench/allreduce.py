"""All-reduce latency at decode sizes: NCCL vs the symmetric-memory one-shot (engine/distributed/symm_all_reduce.py).

    python -m bench.allreduce --tp 2            # CUDA, one process per GPU

For each message size (bf16 tokens x hidden), every rank checks that NCCL, one-shot and two-shot give
the same sum (and the fused all-reduce + residual add + RMSNorm the same as NCCL then
`fused_add_rms_norm`), then times each replayed from a CUDA graph of 100 calls, the way decode steps
run (and NCCL eagerly, 200 calls back to back): two-shot + the norm kernel vs the fused kernel is
the saving per decoder sub-layer. Prints microseconds per call (rank 0's CUDA events).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = [(64, 4096), (256, 4096), (512, 4096), (256, 8192), (512, 8192)]   # (tokens, hidden)


def _time(fn, iterations: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iterations      # us


def _graph_time(fn, calls: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()                                                   # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return _time(graph.replay, 5) / calls


def _worker(rank: int, world: int, init_method: str) -> None:
    import torch.distributed as dist

    from pagoda.engine.distributed.parallel_state import init_tensor_parallel
    from pagoda.engine.distributed.symm_all_reduce import SymmAllReduce
    from pagoda.kernels.norm import fused_add_rms_norm

    device = torch.device("cuda", rank)
    init_tensor_parallel(rank, world, init_method, device)
    max_bytes = max(t * h for t, h in SIZES) * 2
    os.environ["PAGODA_FUSED_ALL_REDUCE_NORM"] = "1"          # time the fused kernel at any world size
    symm = SymmAllReduce(dist.group.WORLD, device, torch.bfloat16, max_bytes)
    rows = []
    for tokens, hidden in SIZES:
        torch.manual_seed(rank)
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        expected = x.float().clone()
        dist.all_reduce(expected)
        got = symm(x.clone())
        error = (got.float() - expected).abs().max().item()
        error = max(error, (symm(x.clone(), "two").float() - expected).abs().max().item())
        # the fused all-reduce + residual add + RMSNorm against NCCL then fused_add_rms_norm
        torch.manual_seed(7)                                   # the residual is the same on every rank
        residual = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        norm_weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(torch.bfloat16)
        reduced = x.clone()
        dist.all_reduce(reduced)
        want_out, want_residual = fused_add_rms_norm(reduced, residual, norm_weight, 1e-5)
        for slot in (0, 1):
            symm.norm.slot_view(slot, tokens, hidden).copy_(x)
            got_out, got_residual = symm.norm.add_rms_norm(
                symm.norm.slot_view(slot, tokens, hidden), residual, norm_weight, 1e-5, slot)
            for got, want in ((got_out, want_out), (got_residual, want_residual)):
                relative = (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()
                if relative > 2e-2:
                    raise SystemExit(f"fused all-reduce + norm at {tokens} x {hidden}: relative error {relative:.3g}")
        a, b, c, d = x.clone(), x.clone(), x.clone(), x.clone()
        calls = iter(range(10**9))

        def fused():
            slot = next(calls) % 2                             # alternate slots, as the model does
            symm.norm.add_rms_norm(symm.norm.slot_view(slot, tokens, hidden), residual, norm_weight, 1e-5, slot)

        times = [_graph_time(lambda: dist.all_reduce(a), 100), _graph_time(lambda: symm(b, "one"), 100),
                 _graph_time(lambda: symm(c, "two"), 100), _time(lambda: dist.all_reduce(a), 200),
                 _graph_time(lambda: fused_add_rms_norm(symm(d, "two"), residual, norm_weight, 1e-5), 100),
                 _graph_time(fused, 100)]
        rows.append((tokens, hidden, tokens * hidden * 2 / 2**20, *times, error))
    if rank == 0:
        print(f"all-reduce over {world} x {torch.cuda.get_device_name(0)} (bf16), us per call, in CUDA graphs "
              "(nccl eager for reference)")
        print(f"{'tokens x hidden':>16} {'MiB':>6} {'nccl':>8} {'one-shot':>9} {'two-shot':>9} {'nccl eager':>11} "
              f"{'two+norm':>9} {'fused':>7} {'max err':>8}")
        for tokens, hidden, mib, ng, one, two, ne, two_norm, fused_us, err in rows:
            print(f"{tokens:>7} x {hidden:<6} {mib:>6.2f} {ng:>8.1f} {one:>9.1f} {two:>9.1f} {ne:>11.1f} "
                  f"{two_norm:>9.1f} {fused_us:>7.1f} {err:>8.3f}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.device_count() < args.tp:
        raise SystemExit(f"needs {args.tp} CUDA devices")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from pagoda.engine.distributed.parallel_state import get_open_port

    torch.multiprocessing.spawn(_worker, args=(args.tp, f"tcp://127.0.0.1:{get_open_port()}"), nprocs=args.tp)


if __name__ == "__main__":
    main()
