"""pagoda's benchmarks: workloads, ceilings and the ideal floor, throughput runs. Run from the repo root as
`python -m bench.throughput ...` (see bench/README.md)."""
