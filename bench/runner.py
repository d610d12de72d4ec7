"""Runs a suite end to end: set up models and the server, run each section, check the targets."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.cluster import cluster_section
from bench.concurrency import concurrency_section
from bench.context import BenchContext, Conditions, progress
from bench.environment import describe
from bench.memory import memory_section
from bench.neighbour import neighbour_section
from bench.raw import RawRunner
from bench.served import idle_pings, latency_section
from bench.server_process import ServerProcess
from bench.stats import ratio
from bench.uploads import encoding_section, upload_section
from bench.workloads import GPU_SIZES, GPU_STEPS, GPU_STRENGTH, Budget, Suite
from imagewire.server.auth import new_api_key

SECTIONS = ("latency", "concurrency", "neighbour", "uploads", "encoding", "memory", "cluster")
# Run only when named in --sections: the cluster section starts Ray clusters and needs the [cluster] extra.
DEFAULT_SECTIONS = tuple(name for name in SECTIONS if name != "cluster")

# The CPU suite's targets (issue 4), checked on its first latency and concurrency workload.
TARGET_SERVED_OVER_RAW_P50 = 1.05
TARGET_THROUGHPUT_VS_RAW = 0.95
TARGET_PING_P99_MS = 50.0


@dataclass(frozen=True)
class RunOptions:
    suite: Suite
    budget: Budget
    sections: tuple[str, ...]
    models_dir: Path  # where built GPU-suite models are kept between runs
    argv: tuple[str, ...]
    quick: bool
    quiet_wait: float = 0.0  # see BenchContext.quiet_wait
    server_env: dict[str, str] = field(default_factory=dict)  # for the server process only (--server-env)


def _write_catalog(suite: Suite, models_dir: Path, directory: Path) -> tuple[Path, ...]:
    """Build the suite's models if needed and write the catalog the server and the raw loop both read."""
    if not suite.built_models:
        return ()
    import torch

    from bench.gpu_models import SERVED_AS, catalog_entry, ensure_model
    from imagewire.air_registry import ARCHITECTURES

    entries = []
    for architecture in suite.built_models:
        # Built in the precision the server runs the architecture in on CUDA (bfloat16 for FLUX and SD 3.5).
        cuda_dtype = getattr(torch, ARCHITECTURES[SERVED_AS[architecture]].cuda_dtype)
        dtype = cuda_dtype if suite.device.startswith("cuda") else torch.float32
        name = f"{architecture}-random-{'small' if suite.small_models else str(dtype).removeprefix('torch.')}"
        progress(f"model {architecture}: building or reusing {models_dir / name}")
        folder = ensure_model(architecture, models_dir / name, device=suite.device, dtype=dtype,
                              small=suite.small_models)
        size = 128 if suite.small_models else GPU_SIZES[architecture]
        entries.append(catalog_entry(architecture, folder, size=size, steps=GPU_STEPS, strength=GPU_STRENGTH))
    path = directory / "bench-catalog.json"
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return (path,)


def _server_gpu_memory_mib(pid: int) -> float | None:
    """What nvidia-smi says the server process holds on the GPU; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in output.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            return float(fields[1])
    return None


async def _served_sections(options: RunOptions, ctx: BenchContext, results: dict[str, Any]) -> None:
    suite, sections, measured = options.suite, options.sections, ctx.conditions.measured
    raw = ctx.raw
    assert raw is not None
    if "latency" in sections:
        results["latency"] = []
        for workload in suite.latency:
            raw.reset_peak_memory()
            row = await measured(f"latency: {workload.name}", partial(latency_section, ctx, workload))
            row["raw_gpu_peak_mib"] = raw.peak_memory_mib()
            row["server_gpu_mib"] = _server_gpu_memory_mib(ctx.server.pid)
            results["latency"].append(row)
    if "concurrency" in sections:
        results["idle_ping_ms"] = await measured("idle pings", partial(idle_pings, ctx))
        results["concurrency"] = [
            await measured(f"concurrency: {workload.name}", partial(concurrency_section, ctx, workload))
            for workload in suite.concurrency]
    if "neighbour" in sections and suite.neighbour is not None:
        # Not through ``measured``: the busy process is the point, and would be counted as foreign load.
        results["neighbour"] = await neighbour_section(ctx, suite.neighbour)
    if "uploads" in sections:
        results["uploads"] = await measured("uploads", partial(upload_section, ctx, suite.upload_sizes))
    if "concurrency" in results:
        _compare_with_default_threads(results)
    results["server_memory_mib"] = {key: round(value / 1024, 1) for key, value in ctx.server.memory_kib().items()}


async def run(options: RunOptions) -> dict[str, Any]:
    suite, budget, sections = options.suite, options.budget, options.sections
    api_key = new_api_key()
    results: dict[str, Any] = {"suite": suite.name, "quick": options.quick, "sections": list(sections),
                               "environment": describe(suite.device, options.argv)}
    conditions = Conditions(options.quiet_wait)
    with tempfile.TemporaryDirectory(prefix="imagewire-bench-") as scratch:
        data_dir = Path(scratch) / "data"
        # Not in a helper thread: a CPU build would give that thread an OpenMP pool of its own.
        catalogs = _write_catalog(suite, options.models_dir, Path(scratch))

        def new_server() -> ServerProcess:
            return ServerProcess(data_dir=data_dir, api_key=api_key, device=suite.device, catalogs=catalogs,
                                 env=options.server_env)

        if any(name in sections for name in ("latency", "concurrency", "neighbour", "uploads")):
            raw = RawRunner(device=suite.device, data_dir=data_dir, catalogs=catalogs)
            # Loading here also builds the tiny model into the data dir, so the server finds it there.
            await raw.call(raw.load, suite.latency[0])
            server = new_server()
            await asyncio.to_thread(server.start)
            conditions.our_pids = [server.pid]
            progress(f"server pid {server.pid} at {server.url}")
            try:
                await _served_sections(options, BenchContext(server, raw, api_key, budget, conditions), results)
            finally:
                await asyncio.to_thread(server.stop)
                await asyncio.to_thread(raw.unload)
                conditions.our_pids = []
        if "encoding" in sections:
            results["encoding"] = await conditions.measured(
                "encoding", partial(asyncio.to_thread, encoding_section, suite.encode_sizes, budget.encodes))
        if "memory" in sections and suite.memory and budget.memory_tasks:
            server = new_server()
            await asyncio.to_thread(server.start)
            conditions.our_pids = [server.pid]
            try:
                context = BenchContext(server, None, api_key, budget, conditions)
                results["memory"] = await conditions.measured("memory", partial(memory_section, context, suite.memory))
            finally:
                await asyncio.to_thread(server.stop)
                conditions.our_pids = []
        if "cluster" in sections:
            # Not through ``measured``: Ray's processes are not the server's children it counts as ours.
            results["cluster"] = await cluster_section(suite, quick=options.quick, data_dir=data_dir, api_key=api_key,
                                                       catalogs=catalogs, env=options.server_env)
    results["conditions"] = conditions.by_section
    results["repeated_blocks"] = conditions.repeated_blocks
    results["checks"] = check_targets(results) if suite.name == "cpu" else []
    return results


def _compare_with_default_threads(results: dict[str, Any]) -> None:
    """Throughput relative to raw at torch's default thread count, from the latency section's reference series."""
    references = {row["workload"]: row["raw_default_threads"] for row in results.get("latency", [])
                  if row.get("raw_default_threads")}
    for section in results["concurrency"]:
        reference = references.get(section["workload"])
        if reference is None or not reference["raw_ms"]["mean"]:
            continue
        rate = 1000 / reference["raw_ms"]["mean"]
        section["raw_default_threads_images_per_s"] = round(rate, 4)
        section["raw_relative_to_default_threads"] = ratio(section["raw_images_per_s"], rate)
        for level in section["levels"]:
            level["relative_to_raw_default_threads"] = ratio(level["images_per_s"], rate)


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The CPU targets of issue 4, each with the measured value; a section not run gives no check."""
    checks: list[dict[str, Any]] = []
    if results.get("latency"):
        first = results["latency"][0]
        value = first["served_over_raw"]["p50"]
        checks.append({"check": f"served/raw p50, {first['workload']}", "target": f"≤ {TARGET_SERVED_OVER_RAW_P50}",
                       "value": value, "passed": value is not None and value <= TARGET_SERVED_OVER_RAW_P50})
    if results.get("concurrency"):
        first = results["concurrency"][0]
        for level in first["levels"]:
            value = level["relative_to_raw"]
            checks.append({"check": f"throughput vs raw, {level['connections']} connections, {first['workload']}",
                           "target": f"≥ {TARGET_THROUGHPUT_VS_RAW}", "value": value,
                           "passed": value is not None and value >= TARGET_THROUGHPUT_VS_RAW})
        ping = first["ping_under_load"]["rtt_ms"]["p99"]
        checks.append({"check": f"ping p99 under load ({first['ping_under_load']['connections']} connections), ms",
                       "target": f"< {TARGET_PING_P99_MS:g}", "value": ping,
                       "passed": ping is not None and ping < TARGET_PING_P99_MS})
    return checks
