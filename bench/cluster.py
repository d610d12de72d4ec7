"""The cluster section: the served path with ``--engine local`` beside ``--engine ray`` with 1, 2, … replicas.

Each configuration is a fresh server process (with ``--engine ray``, a gateway that starts a Ray cluster of
this machine on loopback and its replicas, one device each), measured alike: the same requests one at a time
(latency: what the gateway and Ray add to a task) and from several connections at once (throughput: what more
replicas give). On the CPU suite the requests are the tiny model's, 128², 2 steps, on CPU replicas; on the
GPU suite they are its first workload's, with one replica per GPU, up to every GPU there is.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path
from typing import Any

from bench.client import BenchConnection
from bench.context import progress
from bench.server_process import ServerProcess
from bench.stats import milliseconds, ratio, summarize
from bench.workloads import Suite, Workload

TINY_CLUSTER = Workload("tiny txt2img 128² 2 steps", "imagewire:tiny@1", 128, 128, 2)
CONNECTIONS = 4


def replica_counts(suite: Suite) -> tuple[int, ...]:
    if not suite.device.startswith("cuda"):
        return (1, 2)
    import torch

    return tuple(range(1, max(1, torch.cuda.device_count()) + 1))


async def _measure(server: ServerProcess, api_key: str, workload: Workload, sequential: int,
                   per_connection: int) -> tuple[list[float], float, int]:
    """(latencies of ``sequential`` tasks one at a time, seconds for the concurrent tasks, their count)."""
    connections = [await BenchConnection.open(server.url, api_key) for _ in range(CONNECTIONS)]
    try:
        # Warm-up from every connection at once: each replica gets work, loads and warms its model.
        await asyncio.gather(*(connection.run(workload.task(10_000 + index))
                               for index, connection in enumerate(connections)))
        latencies = [(await connections[0].run(workload.task(index)))[0] for index in range(sequential)]

        async def client(connection: BenchConnection, offset: int) -> None:
            for index in range(per_connection):
                await connection.run(workload.task(offset + index))

        started = time.perf_counter()
        await asyncio.gather(*(client(connection, 20_000 + 1000 * number)
                               for number, connection in enumerate(connections)))
        elapsed = time.perf_counter() - started
    finally:
        for connection in connections:
            await connection.close()
    return latencies, elapsed, CONNECTIONS * per_connection


async def cluster_section(suite: Suite, *, quick: bool, data_dir: Path, api_key: str,
                          catalogs: tuple[Path, ...], env: dict[str, str]) -> dict[str, Any]:
    workload = TINY_CLUSTER if suite.name == "cpu" else suite.latency[0]
    if importlib.util.find_spec("ray") is None:
        return {"skipped": "Ray is not installed: pip install -e '.[cluster]'", "workload": workload.name, "rows": []}
    sequential, per_connection, rounds = (4, 2, 1) if quick else (40, 20, 2)
    configurations: list[tuple[str, int | None, tuple[str, ...]]] = [("local", None, ())]
    configurations += [("ray", count, ("--engine", "ray", "--replicas", str(count))) for count in replica_counts(suite)]
    latencies: dict[int, list[float]] = {index: [] for index in range(len(configurations))}
    busy: dict[int, list[float]] = {index: [0.0, 0.0] for index in range(len(configurations))}  # seconds, images
    # Rounds in alternating order (local, 1, 2, then 2, 1, local): the machine's drift hits every configuration.
    for round_ in range(rounds):
        order = list(range(len(configurations)))
        for index in order if round_ % 2 == 0 else order[::-1]:
            engine, replicas, flags = configurations[index]
            label = engine if replicas is None else f"ray, {replicas} replica{'s' if replicas > 1 else ''}"
            progress(f"cluster round {round_ + 1}/{rounds}: {label}")
            server = ServerProcess(data_dir=data_dir, api_key=api_key, device=suite.device, catalogs=catalogs,
                                   extra_args=flags, env=env)
            await asyncio.to_thread(server.start, 600.0)
            try:
                measured, elapsed, images = await _measure(server, api_key, workload, sequential, per_connection)
            finally:
                await asyncio.to_thread(server.stop)
            latencies[index] += measured
            busy[index][0] += elapsed
            busy[index][1] += images
    rows = []
    for index, (engine, replicas, _) in enumerate(configurations):
        rows.append({"engine": engine, "replicas": replicas, "latency_ms": summarize(milliseconds(latencies[index])),
                     "images_per_s": round(busy[index][1] / busy[index][0], 3)})
    local = rows[0]
    for row in rows:
        row["overhead_p50_ms"] = (None if row["latency_ms"]["p50"] is None else
                                  round(row["latency_ms"]["p50"] - local["latency_ms"]["p50"], 1))
        row["throughput_vs_local"] = ratio(row["images_per_s"], local["images_per_s"])
    return {"workload": workload.name, "connections": CONNECTIONS, "sequential": sequential,
            "tasks_per_connection": per_connection, "rounds": rounds, "rows": rows}
