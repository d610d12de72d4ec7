"""Raw against served, one request at a time; pings on an idle server."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from PIL import Image

from bench.client import BenchConnection
from bench.context import BenchContext, progress
from bench.stages import stage_breakdown
from bench.stats import milliseconds, ratio, summarize
from bench.workloads import Workload

PING_INTERVAL = 0.02  # seconds between pings on the probe connection
IDLE_PINGS = 50


async def after_raw() -> None:
    """Wait before a served block that follows a raw one.

    To the server's CPU thread policy (``server/engine/threads.py``) a raw block that has just ended is
    another process keeping every core busy, and it rightly leaves that process a core for the next steps.
    A deployment has no torch loop taking turns with the server, so served blocks start once the policy's
    window has passed.
    """
    from imagewire.server.engine.threads import WINDOW_SECONDS  # imports torch, as the raw runner does

    await asyncio.sleep(2 * WINDOW_SECONDS)


async def raw_block(ctx: BenchContext, workload: Workload, indices: range,
                    init: Image.Image | None) -> list[float]:
    # Off the event loop, so this process keeps answering the server's keepalive pings.
    raw = ctx.raw
    assert raw is not None
    return [await raw.call(raw.run_one, workload, index, init) for index in indices]


async def _served_block(connection: BenchConnection, workload: Workload, indices: range,
                        seed_uuid: str | None) -> tuple[list[float], list[str]]:
    seconds, uuids = [], []
    for index in indices:
        task = workload.task(index, seed_uuid)
        latency, _ = await connection.run(task)
        seconds.append(latency)
        uuids.append(task["taskUUID"])
    return seconds, uuids


async def latency_section(ctx: BenchContext, workload: Workload) -> dict[str, Any]:
    """The same requests raw and served, one at a time, alternating in blocks so drift hits both alike.

    When the server's engine runs torch on fewer threads than torch's default (CPU inference), a
    third series runs raw at the default too: what that choice costs on an otherwise idle machine.
    """
    budget, raw = ctx.budget, ctx.raw
    assert raw is not None
    reference = raw.default_threads != raw.server_threads
    connection = await ctx.connect()
    raw_s: list[float] = []
    reference_s: list[float] = []
    served_s: list[float] = []
    uuids: list[str] = []

    async def block(indices: range) -> tuple[list[float], list[float], list[float], list[str]]:
        raw_times = await raw_block(ctx, workload, indices, init)
        reference_times: list[float] = []
        if reference:
            await raw.call(raw.use_threads, raw.default_threads)
            reference_times = await raw_block(ctx, workload, indices, init)
            await raw.call(raw.use_threads, raw.server_threads)
        await after_raw()
        served_times, block_uuids = await _served_block(connection, workload, indices, seed_uuid)
        return raw_times, reference_times, served_times, block_uuids

    try:
        seed_uuid, init = await ctx.seed_image(workload, connection)
        await block(range(10_000, 10_000 + budget.warmup))  # seeds outside the measured ones
        for start in range(0, budget.sequential, budget.block):
            indices = range(start, min(start + budget.block, budget.sequential))
            raw_times, reference_times, served_times, block_uuids = await ctx.conditions.clean(
                partial(block, indices))
            raw_s += raw_times
            reference_s += reference_times
            served_s += served_times
            uuids += block_uuids
            progress(f"latency {workload.name}: {len(served_s)}/{budget.sequential}")
    finally:
        await connection.close()
    raw_ms = summarize(milliseconds(raw_s))
    served = summarize(milliseconds(served_s))
    logs = await asyncio.to_thread(ctx.server.wait_for_logs, uuids)
    return {
        "workload": workload.name,
        "torch_threads": raw.server_threads,
        "raw_ms": raw_ms,
        "served_ms": served,
        "overhead_ms": {q: _difference(served[q], raw_ms[q]) for q in ("p50", "p99", "mean")},
        "served_over_raw": {q: ratio(served[q], raw_ms[q]) for q in ("p50", "p99")},
        "raw_default_threads": None if not reference else {
            "torch_threads": raw.default_threads,
            "raw_ms": summarize(milliseconds(reference_s)),
            "served_over_it": {q: ratio(served[q], summarize(milliseconds(reference_s))[q]) for q in ("p50", "p99")},
        },
        "stages": stage_breakdown(logs, dict(zip(uuids, served_s, strict=True)), raw_s),
    }


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


async def idle_pings(ctx: BenchContext) -> dict[str, Any]:
    connection = await ctx.connect()
    try:
        rtts = [await connection.ping() for _ in range(IDLE_PINGS)]
    finally:
        await connection.close()
    return summarize(milliseconds(rtts))
