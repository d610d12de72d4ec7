"""What Ray Serve itself costs per call, apart from imagewire: a replica that does nothing but stream two small
messages per call (a job's queue position, then its encoded image and end, as ``server/replica.py`` sends a task
without progress), called from this process as the gateway calls its replicas. It prints the calls per second and
the CPU each side spends per call, the floor under the gateway's and the replica's cost per task
(BENCHMARKS.md, "Cluster").

    python -m bench.serve_cost [--calls 400]

A Ray cluster of this machine on loopback, as the gateway starts one (docs/cluster.md, "Where Ray listens").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any

from imagewire.server.cluster import LOOPBACK_ONLY

MESSAGE_BYTES = 12_000  # about a 128² JPEG of the tiny model


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def _measure(calls: int) -> None:
    import ray
    from ray import serve

    from imagewire.server.replica import keep_serve_on_loopback

    @serve.deployment(max_ongoing_requests=8, ray_actor_options={"num_cpus": 1})
    class Echo:
        def __init__(self) -> None:
            keep_serve_on_loopback()

        async def run(self, payload: bytes) -> AsyncIterator[list[Any]]:
            yield ["queued"]
            yield ["results and end", payload]

        def cpu(self) -> float:
            return _cpu_seconds()

    ray.init(include_dashboard=False, num_cpus=2, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(Echo.bind(), name="serve-cost")
        payload = b"x" * MESSAGE_BYTES

        async def one() -> None:
            async for _ in handle.options(stream=True).run.remote(payload):
                pass

        for _ in range(50):  # warm-up
            await one()
        for concurrency in (1, 4):
            replica_before, caller_before = await handle.cpu.remote(), _cpu_seconds()
            started = time.perf_counter()

            async def caller(count: int) -> None:
                for _ in range(count):
                    await one()

            await asyncio.gather(*(caller(calls // concurrency) for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            replica_cpu, caller_cpu = await handle.cpu.remote() - replica_before, _cpu_seconds() - caller_before
            print(f"{concurrency} call(s) at a time: {calls / elapsed:.0f} calls/s; CPU per call: replica "
                  f"{1000 * replica_cpu / calls:.2f} ms, caller {1000 * caller_cpu / calls:.2f} ms")
        serve.shutdown()
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per measurement (default 400)")
    args = parser.parse_args()
    os.environ.update(LOOPBACK_ONLY)   # before Ray is imported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # Ray Serve's pydantic notices, on import
        asyncio.run(_measure(args.calls))


if __name__ == "__main__":
    main()
