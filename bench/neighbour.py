"""Throughput with one busy process beside the server: how the served path holds up on a shared machine.

A second process spinning on one core is what a small box sees whenever anything else runs
(a build, a test suite, a second service). Requests are time-boxed rather than counted, because
a pipeline disturbed this way can be many times slower.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

from bench.client import BenchConnection
from bench.concurrency import ping_until
from bench.context import BenchContext, progress
from bench.stats import milliseconds, ratio, summarize
from bench.workloads import Workload

CONNECTIONS = 4
SERVED_SECONDS = 20.0
RAW_SECONDS = 15.0
_SPIN = "while True: pass"


async def _served_for(ctx: BenchContext, workload: Workload, seed_uuid: str | None,
                      seconds: float) -> dict[str, Any]:
    connections = [await ctx.connect() for _ in range(CONNECTIONS)]
    probe = await ctx.connect()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def submit(connection: BenchConnection, first: int) -> None:
        index = first
        while time.perf_counter() < deadline:
            latency, _ = await connection.run(workload.task(index, seed_uuid))
            latencies.append(latency)
            index += 1

    stop = asyncio.Event()
    pinging = asyncio.create_task(ping_until(probe, stop))
    started = time.perf_counter()
    try:
        await asyncio.gather(*(submit(connection, k * 100_000) for k, connection in enumerate(connections)))
    finally:
        wall = time.perf_counter() - started
        stop.set()
        rtts = await pinging
        for connection in [*connections, probe]:
            await connection.close()
    return {"tasks": len(latencies), "wall_s": round(wall, 2), "images_per_s": round(len(latencies) / wall, 4),
            "latency_ms": summarize(milliseconds(latencies)), "ping_rtt_ms": summarize(milliseconds(rtts))}


async def _raw_for(ctx: BenchContext, workload: Workload, init: Any, seconds: float) -> float:
    raw = ctx.raw
    assert raw is not None
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        await raw.call(raw.run_one, workload, count, init)
        count += 1
    return count / (time.perf_counter() - started)


async def neighbour_section(ctx: BenchContext, workload: Workload) -> dict[str, Any]:
    """Served (4 connections) and raw throughput while another process keeps one core busy."""
    seed_uuid, init = await ctx.seed_image(workload)
    raw = ctx.raw
    assert raw is not None
    await ctx.conditions.quiet()
    quiet_raw = await _raw_for(ctx, workload, init, RAW_SECONDS)
    spinner = subprocess.Popen([sys.executable, "-c", _SPIN])
    try:
        await asyncio.sleep(1.0)
        served = await _served_for(ctx, workload, seed_uuid, SERVED_SECONDS)
        busy_raw = await _raw_for(ctx, workload, init, RAW_SECONDS)
    finally:
        spinner.terminate()
        spinner.wait()
    progress(f"neighbour {workload.name}: served {served['images_per_s']:.2f} images/s beside a busy process")
    return {
        "workload": workload.name,
        "torch_threads": raw.server_threads,
        "connections": CONNECTIONS,
        "raw_images_per_s_quiet": round(quiet_raw, 4),
        "raw_images_per_s_beside_busy": round(busy_raw, 4),
        "served": served,
        "served_relative_to_quiet_raw": ratio(served["images_per_s"], quiet_raw),
        "served_relative_to_raw_beside_busy": ratio(served["images_per_s"], busy_raw),
    }
