"""What one Ray Serve handle-stream item costs: SSE events through the Serve proxy, generated in the
ingress itself vs relayed item by item from another deployment vs relayed in batches.

    python -m bench.serve_relay [--streams 32] [--events 200] [--batch 32] [--num-cpus 2]

No model: the producer yields integers. `/local` is the ceiling of the ingress + proxy path; `/relay`
is a per-request token relay (one handle-stream item per event); `/relay-batched` moves the
same events `--batch` per item. The gap between the last two is what batching outputs of many
requests into one item (the ingress's token channel, cluster/channels.py) recovers.
"""
from __future__ import annotations

import argparse
import asyncio
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--events", type=int, default=200, help="events per stream")
    parser.add_argument("--batch", type=int, default=32, help="events per item for /relay-batched")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    import httpx
    import ray
    from fastapi import FastAPI
    from ray import serve
    from starlette.responses import StreamingResponse

    events, batch = args.events, args.batch

    @serve.deployment(max_ongoing_requests=10_000)
    class Producer:
        async def items(self, count: int, per_item: int):
            for start in range(0, count, per_item):
                yield list(range(start, min(start + per_item, count)))
                await asyncio.sleep(0)

    app = FastAPI()

    @serve.deployment(max_ongoing_requests=10_000)
    @serve.ingress(app)
    class Ingress:
        def __init__(self, producer) -> None:
            self.producer = producer

        def _relay(self, per_item: int) -> StreamingResponse:
            async def body():
                async for item in self.producer.options(stream=True).items.remote(events, per_item):
                    for value in item:
                        yield f"data: {value}\n\n"
            return StreamingResponse(body(), media_type="text/event-stream")

        @app.get("/local")
        async def local(self) -> StreamingResponse:
            async def body():
                for value in range(events):
                    yield f"data: {value}\n\n"
                    await asyncio.sleep(0)
            return StreamingResponse(body(), media_type="text/event-stream")

        @app.get("/relay")
        async def relay(self) -> StreamingResponse:
            return self._relay(1)

        @app.get("/relay-batched")
        async def relay_batched(self) -> StreamingResponse:
            return self._relay(batch)

    async def load(path: str) -> tuple[int, float]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.port}", timeout=600) as http:
            async def one() -> int:
                count = 0
                async with http.stream("GET", path) as response:
                    async for line in response.aiter_lines():
                        count += line.startswith("data:")
                return count
            start = time.perf_counter()
            counts = await asyncio.gather(*[one() for _ in range(args.streams)])
            return sum(counts), time.perf_counter() - start

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"port": args.port})
        serve.run(Ingress.bind(Producer.bind()), route_prefix="/")
        print(f"{args.streams} streams x {events} events, Ray {ray.__version__}, {args.num_cpus} CPUs")
        for path in ("/local", "/relay", "/relay-batched"):
            asyncio.run(load(path))                       # warm-up
            count, seconds = asyncio.run(load(path))
            print(f"{path:>15}: {count:,} events in {seconds:.2f} s = {count / seconds:>9,.0f} events/s")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
