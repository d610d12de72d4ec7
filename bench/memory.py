"""Resident memory of the server process: after loading the model, and along a long run of small tasks."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.client import BenchConnection
from bench.context import BenchContext, progress
from bench.workloads import Workload

CONNECTIONS = 4  # enough to keep the queue from running dry between tasks


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


async def memory_section(ctx: BenchContext, workloads: tuple[Workload, ...]) -> dict[str, Any]:
    """RSS after warm-up, then every ``memory_sample_every`` tasks; a leak shows as growth in the second half.

    Run on a server of its own, so what it reports is the model and the requests, nothing earlier.
    Workloads alternate, so both pipelines (txt2img and img2img) and the decode path stay exercised.
    """
    budget = ctx.budget
    connections = [await ctx.connect() for _ in range(CONNECTIONS)]
    try:
        seeds = [(await ctx.seed_image(workload, connections[0]))[0] for workload in workloads]
        for index, (workload, seed) in enumerate(zip(workloads, seeds, strict=True)):
            await connections[0].run(workload.task(index, seed))
        loaded = ctx.server.memory_kib()
        samples = [{"tasks": 0, "rss_mib": _mib(loaded["VmRSS"])}]
        done = 0
        next_index = 0

        async def keep_busy(connection: BenchConnection) -> None:
            nonlocal done, next_index
            while next_index < budget.memory_tasks:
                index, next_index = next_index, next_index + 1
                workload = workloads[index % len(workloads)]
                await connection.run(workload.task(index, seeds[index % len(workloads)]))
                done += 1
                if done % budget.memory_sample_every == 0:
                    samples.append({"tasks": done, "rss_mib": _mib(ctx.server.memory_kib()["VmRSS"])})
                    progress(f"memory: {done}/{budget.memory_tasks} tasks, RSS {samples[-1]['rss_mib']} MiB")

        await asyncio.gather(*(keep_busy(connection) for connection in connections))
        final = ctx.server.memory_kib()
    finally:
        for connection in connections:
            await connection.close()
    half = [sample for sample in samples if sample["tasks"] >= budget.memory_tasks // 2]
    return {
        "workloads": [workload.name for workload in workloads],
        "tasks": done,
        "rss_after_load_mib": _mib(loaded["VmRSS"]),
        "peak_rss_after_load_mib": _mib(loaded["VmHWM"]),
        "rss_final_mib": _mib(final["VmRSS"]),
        "peak_rss_final_mib": _mib(final["VmHWM"]),
        "samples": samples,
        "growth_second_half_mib": round(half[-1]["rss_mib"] - half[0]["rss_mib"], 1) if len(half) > 1 else None,
    }
