"""Throughput with 1, 4 and 16 connections against the raw loop, and ping round trips under full load.

The speed of a small shared machine drifts by ±10 % over tens of seconds, more than the effect
being measured. So each level runs in short rounds with a raw block of the same size before and
after every round, and compares its throughput with those raw blocks only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from PIL import Image

from bench.client import BenchConnection
from bench.context import BenchContext, progress
from bench.served import PING_INTERVAL, after_raw, raw_block
from bench.stats import milliseconds, ratio, summarize
from bench.workloads import Workload, tasks_at_level
from imagewire.server.config import Config


@dataclass
class _Level:
    """What the rounds of one concurrency level add up to."""

    latencies: list[float] = field(default_factory=list)
    uuids: list[str] = field(default_factory=list)
    served_wall: float = 0.0
    raw_count: int = 0
    raw_wall: float = 0.0
    pings: list[float] = field(default_factory=list)
    served_rates: list[float] = field(default_factory=list)  # images/s of each served round
    raw_rates: list[float] = field(default_factory=list)  # images/s of each raw block, in order

    def add(self, other: _Level) -> None:
        self.latencies += other.latencies
        self.uuids += other.uuids
        self.pings += other.pings
        self.served_wall += other.served_wall
        self.raw_count += other.raw_count
        self.raw_wall += other.raw_wall
        self.served_rates += other.served_rates
        self.raw_rates += other.raw_rates

    def round_ratios(self) -> list[float]:
        """Each round's throughput over the mean of the raw blocks just before and after it."""
        pairs = zip(self.served_rates, self.raw_rates, self.raw_rates[1:], strict=False)
        return [round(served / ((before + after) / 2), 4) for served, before, after in pairs]


async def ping_until(connection: BenchConnection, stop: asyncio.Event) -> list[float]:
    rtts: list[float] = []
    while not stop.is_set():
        rtts.append(await connection.ping())
        await asyncio.sleep(PING_INTERVAL)
    return rtts


async def _served_round(connections: list[BenchConnection], workload: Workload, seed_uuid: str | None,
                        first_index: int, per_connection: int, probe: BenchConnection | None,
                        level: _Level) -> None:
    """Every connection sends ``per_connection`` requests back to back, all connections at once."""

    async def submit(connection: BenchConnection, first: int) -> None:
        for index in range(first, first + per_connection):
            task = workload.task(index, seed_uuid)
            latency, _ = await connection.run(task)
            level.latencies.append(latency)
            level.uuids.append(task["taskUUID"])

    stop = asyncio.Event()
    pinging = asyncio.create_task(ping_until(probe, stop)) if probe is not None else None
    started = time.perf_counter()
    try:
        await asyncio.gather(*(submit(connection, first_index + k * per_connection)
                               for k, connection in enumerate(connections)))
    finally:
        wall = time.perf_counter() - started
        level.served_wall += wall
        level.served_rates.append(len(connections) * per_connection / wall)
        stop.set()
        if pinging is not None:
            level.pings += await pinging


async def _raw_round(ctx: BenchContext, workload: Workload, count: int, init: Image.Image | None,
                     level: _Level) -> None:
    started = time.perf_counter()
    await raw_block(ctx, workload, range(count), init)
    wall = time.perf_counter() - started
    level.raw_wall += wall
    level.raw_count += count
    level.raw_rates.append(count / wall)


def _raw_count(ctx: BenchContext, served: int) -> int:
    return ctx.budget.raw_per_round or served


async def _one_round(ctx: BenchContext, workload: Workload, seed_uuid: str | None, init: Image.Image | None,
                     connections: list[BenchConnection], first_index: int, per_round: int,
                     probe: BenchConnection | None) -> _Level:
    """A raw block, then the same number of requests served: one comparable pair."""
    pair = _Level()
    await _raw_round(ctx, workload, _raw_count(ctx, len(connections) * per_round), init, pair)
    await after_raw()
    await _served_round(connections, workload, seed_uuid, first_index, per_round, probe, pair)
    return pair


async def _run_level(ctx: BenchContext, workload: Workload, count: int, seed_uuid: str | None,
                     init: Image.Image | None, probed: bool) -> dict[str, Any]:
    budget = ctx.budget
    per_connection = tasks_at_level(budget, count)
    rounds = max(1, min(budget.rounds, per_connection))
    per_round = per_connection // rounds
    connections = [await ctx.connect() for _ in range(count)]
    probe = await ctx.connect() if probed else None
    level = _Level()
    try:
        for round_index in range(rounds):
            pair = await ctx.conditions.clean(partial(
                _one_round, ctx, workload, seed_uuid, init, connections, round_index * count * per_round,
                per_round, probe))
            level.add(pair)
        # Closing raw block: every round then sits between two raw blocks.
        await ctx.conditions.clean(partial(_raw_round, ctx, workload, _raw_count(ctx, count * per_round), init,
                                           level))
    finally:
        for connection in [*connections, *([probe] if probe is not None else [])]:
            await connection.close()
    logs = await asyncio.to_thread(ctx.server.wait_for_logs, level.uuids)
    # Tasks that shared a pipeline call each log the whole call as their model time: divide it among
    # the call's images (the bench's tasks make one image each).
    per_call = [ctx.server.images_per_call(log) for log in logs]
    model_ms = [log.stages_ms.get("model", 0.0) / images for log, images in zip(logs, per_call, strict=True)]
    served_rate = len(level.latencies) / level.served_wall
    raw_rate = level.raw_count / level.raw_wall
    return {
        "connections": count,
        "tasks": len(level.latencies),
        "rounds": rounds,
        "served_wall_s": round(level.served_wall, 3),
        "images_per_s": round(served_rate, 4),
        "raw_images_per_s": round(raw_rate, 4),
        "relative_to_raw": ratio(served_rate, raw_rate),
        # The spread of the same ratio round by round: how far to trust the pooled figure.
        "round_ratios": level.round_ratios(),
        "latency_ms": summarize(milliseconds(level.latencies)),
        # Inside the server: device time per image, the images per pipeline call (tasks waiting together
        # share calls), and the share of the served time the device was busy. A throughput loss is either
        # slower calls (contention) or idle gaps.
        "server_model_ms": summarize(model_ms),
        "images_per_call": round(sum(per_call) / len(per_call), 2) if per_call else None,
        "device_busy": round(sum(model_ms) / 1000 / level.served_wall, 4),
        "ping_rtt_ms": summarize(milliseconds(level.pings)) if probed else None,
    }


async def _raw_batched(ctx: BenchContext, workload: Workload, init: Image.Image | None,
                       images_per_call: int) -> dict[str, Any]:
    """The raw loop making ``images_per_call`` images per pipeline call, as the server does for tasks that
    wait together: the limit the busier levels can reach. Alternates with one-image blocks (drift)."""
    raw = ctx.raw
    assert raw is not None
    images = max(images_per_call, tasks_at_level(ctx.budget, 1) // 3 // images_per_call * images_per_call)
    single = _Level()
    batched_wall, batched_images = 0.0, 0
    for _ in range(min(3, ctx.budget.rounds)):
        await ctx.conditions.clean(partial(_raw_round, ctx, workload, images, init, single))
        for first in range(0, images, images_per_call):
            indices = list(range(first, first + images_per_call))
            batched_wall += await raw.call(raw.run_call, workload, indices, init)
            batched_images += images_per_call
    batched_rate = batched_images / batched_wall
    return {"images_per_call": images_per_call, "images_per_s": round(batched_rate, 4),
            "relative_to_raw": ratio(batched_rate, single.raw_count / single.raw_wall)}


async def concurrency_section(ctx: BenchContext, workload: Workload) -> dict[str, Any]:
    """Each level keeps one request in flight per connection; a probe connection pings during the busiest."""
    seed_uuid, init = await ctx.seed_image(workload)
    levels: list[dict[str, Any]] = []
    busiest = max(ctx.budget.concurrency_levels)
    for count in ctx.budget.concurrency_levels:
        level = await _run_level(ctx, workload, count, seed_uuid, init, probed=count == busiest)
        levels.append(level)
        progress(f"concurrency {workload.name}: {count} connections, {level['images_per_s']:.2f} images/s, "
                 f"{level['relative_to_raw']} of raw")
    busiest_level = max(levels, key=lambda level: int(level["connections"]))
    raw_total = sum(level["raw_images_per_s"] for level in levels) / len(levels)
    batched = await _raw_batched(ctx, workload, init, Config.max_batch_size)
    progress(f"raw {workload.name}: {batched['images_per_call']} images per call, "
             f"{batched['relative_to_raw']} of one per call")
    return {
        "workload": workload.name,
        "raw_images_per_s": round(raw_total, 4),
        "raw_batched": batched,
        "levels": levels,
        "ping_under_load": {"connections": busiest, "rtt_ms": busiest_level["ping_rtt_ms"]},
    }
