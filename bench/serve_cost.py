"""What Ray Serve itself costs per call, apart from imagewire: a replica that does nothing but stream two small
messages per call (a job's queue position, then its encoded image and end, as ``server/replica.py`` sends a task
without progress), called from this process as the gateway calls its replicas. It prints the calls per second and
the CPU each side spends per call, the floor under the gateway's and the replica's cost per task
(BENCHMARKS.md, "Cluster"), over Ray's actor calls (what the gateway uses) and over Serve's gRPC transport (what
Ray's ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` turns on: the handle's ``_by_reference=False``); then the same for a
plain Ray actor streaming the same messages (Ray's streaming generators, no Serve), the floor of a path that
called replicas without Serve's handle.

    python -m bench.serve_cost [--calls 400]

A Ray cluster of this machine on loopback, as the gateway starts one (docs/cluster.md, "Where Ray listens").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from imagewire.server.cluster import LOOPBACK_ONLY

# Serve's gRPC transport bounds a message at gRPC's default of 4 MiB unless this is set before Serve is imported.
GRPC_MESSAGE_LIMIT = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1)}

MESSAGE_BYTES = 12_000  # about a 128² JPEG of the tiny model


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def _rates(label: str, one: Callable[[], Awaitable[None]], remote_cpu: Callable[[], Awaitable[float]],
                 calls: int) -> None:
    """Time ``calls`` calls of ``one``, one and four at a time, and print what each side's CPU spent per call."""
    for _ in range(50):  # warm-up
        await one()
    for concurrency in (1, 4):
        remote_before, caller_before = await remote_cpu(), _cpu_seconds()
        started = time.perf_counter()

        async def caller(count: int) -> None:
            for _ in range(count):
                await one()

        await asyncio.gather(*(caller(calls // concurrency) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        remote_spent, caller_spent = await remote_cpu() - remote_before, _cpu_seconds() - caller_before
        print(f"{label}, {concurrency} call(s) at a time: {calls / elapsed:.0f} calls/s; CPU per call: callee "
              f"{1000 * remote_spent / calls:.2f} ms, caller {1000 * caller_spent / calls:.2f} ms")


async def _measure(calls: int) -> None:
    import ray
    from ray import serve

    from imagewire.server.replica import keep_serve_on_loopback

    class Echo:
        async def run(self, payload: bytes) -> AsyncIterator[list[Any]]:
            yield ["queued"]
            yield ["results and end", payload]

        def cpu(self) -> float:
            return _cpu_seconds()

    @serve.deployment(max_ongoing_requests=8, ray_actor_options={"num_cpus": 1})
    class ServeEcho(Echo):
        def __init__(self) -> None:
            keep_serve_on_loopback()

    payload = b"x" * MESSAGE_BYTES
    ray.init(include_dashboard=False, num_cpus=2, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(ServeEcho.bind(), name="serve-cost")

        async def serve_cpu() -> float:
            return float(await handle.cpu.remote())

        for label, by_reference in (("Serve handle, actor calls", True), ("Serve handle, gRPC", False)):
            streaming = handle.options(stream=True, _by_reference=by_reference)

            async def through_serve(streaming: Any = streaming) -> None:
                async for _ in streaming.run.remote(payload):
                    pass

            await _rates(label, through_serve, serve_cpu, calls)
        serve.shutdown()

        actor = ray.remote(num_cpus=1)(Echo).remote()

        async def through_actor() -> None:
            async for message in actor.run.options(num_returns="streaming").remote(payload):
                await message

        async def actor_cpu() -> float:
            return float(await actor.cpu.remote())

        await _rates("plain actor", through_actor, actor_cpu, calls)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per measurement (default 400)")
    args = parser.parse_args()
    os.environ.update(LOOPBACK_ONLY | GRPC_MESSAGE_LIMIT)   # before Ray is imported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # Ray Serve's pydantic notices, on import
        asyncio.run(_measure(args.calls))


if __name__ == "__main__":
    main()
