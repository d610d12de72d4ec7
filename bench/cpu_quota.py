"""Torch's default thread count against the server's under this process's CPU quota, in one run.

    python -m bench.cpu_quota [--rounds 4] [--per-round 10]

Run it inside the limit to measure, for example a container started with ``--cpus 1``, or a cgroup of its
own (cgroup v1, as root)::

    mkdir /sys/fs/cgroup/cpu/quota-bench && echo 100000 > /sys/fs/cgroup/cpu/quota-bench/cpu.cfs_quota_us
    sh -c 'echo $$ > /sys/fs/cgroup/cpu/quota-bench/tasks && exec python -m bench.cpu_quota'

torch's default is a thread per physical core of the machine, whatever the quota; the server takes the
quota's whole cores (``usable_cores`` in ``server/engine/threads.py``), and at least one. Both counts run
the same raw tiny img2img call, alternating in rounds so that drift hits both alike. With no quota the two
counts are equal, and the run says so rather than measure one count against itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.stats import milliseconds, percentile
from bench.workloads import TINY_IMG2IMG


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Print the comparison and return its figures: milliseconds by thread count; None with nothing to compare."""
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_quota", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds, each running both counts (default 4)")
    parser.add_argument("--per-round", type=int, default=10, help="calls per count and round (default 10)")
    args = parser.parse_args(argv)

    import torch

    from bench.environment import describe
    from imagewire.server.engine.threads import allowed_cpus, cpu_quota, usable_cores

    default, served, quota = torch.get_num_threads(), usable_cores(), cpu_quota()
    environment = describe("cpu", [])  # before the thread count changes
    environment["command"] = shlex.join(["python", "-m", "bench.cpu_quota", *(argv or sys.argv[1:])])
    limit = "none" if quota is None else f"{quota:g} core" + ("" if quota == 1 else "s")
    print(f"CPUs this process may run on: {len(allowed_cpus())}; CPU quota: {limit}; torch threads: {default} by "
          f"default, {served} in the server")
    if default == served:
        print("torch's default and the server's count are the same here: nothing to compare")
        return None
    seconds = asyncio.run(_alternate((default, served), args.rounds, args.per_round))
    rows: dict[int, dict[str, float]] = {}
    for threads, values in seconds.items():
        ms = milliseconds(values)
        rows[threads] = {"p50_ms": round(percentile(ms, 50), 1), "mean_ms": round(sum(ms) / len(ms), 1),
                         "p90_ms": round(percentile(ms, 90), 1)}
    print(f"| torch threads | p50 ms | mean ms | p90 ms |  ({TINY_IMG2IMG.name}, "
          f"{args.rounds * args.per_round} calls each)")
    print("| --- | --- | --- | --- |")
    for threads, row in rows.items():
        label = f"{threads} (torch's default)" if threads == default else f"{threads} (the server's)"
        print(f"| {label} | {row['p50_ms']} | {row['mean_ms']} | {row['p90_ms']} |")
    result = {"environment": environment, "quota_cores": quota, "threads": rows}
    print(json.dumps(result))
    return result


async def _alternate(counts: tuple[int, int], rounds: int, per_round: int) -> dict[int, list[float]]:
    """Seconds per call at each thread count, the counts taking turns; torch runs on the raw runner's thread."""
    from bench.images import test_picture
    from bench.raw import RawRunner

    raw = RawRunner(device="cpu", data_dir=Path(tempfile.mkdtemp(prefix="imagewire-quota-bench-")))
    picture = test_picture(TINY_IMG2IMG.width)
    seconds: dict[int, list[float]] = {threads: [] for threads in counts}
    try:
        await raw.call(raw.load, TINY_IMG2IMG)
        for _ in range(rounds):
            for threads in counts:
                await raw.call(raw.use_threads, threads)
                for index in range(2):  # warm-up at this count
                    await raw.call(raw.run_one, TINY_IMG2IMG, index, picture)
                for index in range(per_round):
                    seconds[threads].append(await raw.call(raw.run_one, TINY_IMG2IMG, index, picture))
    finally:
        await raw.call(raw.use_threads, raw.default_threads)  # the count new threads of this process start on
        raw.unload()
    return seconds


if __name__ == "__main__":
    main()
