"""``python -m bench.cluster_nodes``: one gateway and two CPU replicas over two Ray nodes of this machine, then
one node's death.

The nodes are two ``ray start`` processes (``bench/ray_nodes.py``): a head at 127.0.0.2 and a node at 127.0.0.3
that joins it. A gateway joins the head with --ray-address and deploys two replicas (tiny model, 128², 2 steps,
one job per replica at a time); Serve spreads them over both nodes. Printed as JSON:

- where each replica runs, and what every process of the cluster listens on;
- latency: tasks one at a time (p50 and the rest), and how many tasks each node ran when several connections
  send at once;
- the node's death: slower tasks keep both replicas busy, the second node is killed (every process, SIGKILL)
  while it holds some of them; how many it held, whether each task was answered once with its image, how
  long after the kill the last of them came (the time to recover), the latency of the next tasks, and how
  long the board still showed the dead node's replica, and when Serve had two replicas running again.

About two minutes on a 2-core machine, most of it starting Ray and the replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.client import BenchConnection
from bench.cluster import TINY_CLUSTER
from bench.context import progress
from bench.ray_nodes import RayNode, cluster_environment, descendants
from bench.server_process import ServerProcess
from bench.stats import milliseconds, summarize
from bench.workloads import Workload

API_KEY = "bench-cluster-nodes-key"
CONNECTIONS = 4
# Several seconds each on 2 cores: still running when the node dies.
SLOW = Workload("tiny txt2img 256² 30 steps", "imagewire:tiny@1", 256, 256, 30)
RETRY = "before any image; trying another replica"


def read_board() -> list[Mapping[str, Any]]:
    from imagewire.server.board import read_board as board

    return board()


def ran_by_node(board: list[Mapping[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for replica in board:
        counts[replica["node"]] = counts.get(replica["node"], 0) + sum(replica["runs"].values())
    return counts


def listeners(pids: set[int]) -> list[str]:
    """What the processes listen on, one "address process" line each (ports left out: they are free ones)."""
    output = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in output.splitlines():
        owners = {int(pid) for pid in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            address = line.split()[3].rsplit(":", 1)[0]
            name = re.search(r'\(\("([^"]+)"', line)
            found.add(f"{address} {name.group(1) if name else '?'}")
    return sorted(found)


async def wait_until(check: Any, timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"still {result!r} after {timeout:.0f} s")
        await asyncio.sleep(interval)
    return result


async def seconds_until(check: Any, since: float, timeout: float) -> float | None:
    """Seconds from ``since`` until ``check()`` holds; None if it did not within ``timeout``."""
    try:
        await wait_until(check, timeout, interval=0.5)
    except TimeoutError:
        return None
    return round(time.monotonic() - since, 1)


async def measure(url: str, head: RayNode, second: RayNode, sequential: int, per_connection: int) -> dict[str, Any]:
    connections = [await BenchConnection.open(url, API_KEY) for _ in range(CONNECTIONS)]
    try:
        await asyncio.gather(*(connection.run(TINY_CLUSTER.task(10_000 + index))
                               for index, connection in enumerate(connections)))
        progress("latency, one task at a time")
        latencies = [(await connections[0].run(TINY_CLUSTER.task(index)))[0] for index in range(sequential)]

        progress("several connections at once")
        before = ran_by_node(read_board())

        async def client(connection: BenchConnection, offset: int) -> None:
            for index in range(per_connection):
                await connection.run(TINY_CLUSTER.task(offset + index))

        await asyncio.gather(*(client(connection, 20_000 + 1000 * number)
                               for number, connection in enumerate(connections)))
        total = CONNECTIONS * per_connection
        after = await wait_until(lambda: (ran := ran_by_node(read_board()))
                                 and sum(ran.values()) - sum(before.values()) == total and ran, 30)
        by_node = {node: after.get(node, 0) - before.get(node, 0) for node in (head.address, second.address)}
        return {"latency_ms": summarize(milliseconds(latencies)), "tasks": total, "tasks_by_node": by_node}
    finally:
        for connection in connections:
            await connection.close()


async def node_death(gateway: ServerProcess, head: RayNode, second: RayNode) -> dict[str, Any]:
    """Four slow tasks (two on each replica), the second node killed while it holds some."""
    retries: list[float] = []
    gateway.on_line.append(lambda line: retries.append(time.monotonic()) if RETRY in line else None)
    connections = [await BenchConnection.open(gateway.url, API_KEY) for _ in range(4)]
    tasks = [SLOW.task(30_000 + index) for index in range(len(connections))]
    answered: dict[str, float] = {}
    failed: dict[str, str] = {}

    async def run(connection: BenchConnection, task: dict[str, Any]) -> None:
        try:
            await connection.run(task)
            answered[task["taskUUID"]] = time.monotonic()
        except Exception as exc:
            failed[task["taskUUID"]] = str(exc)

    try:
        running = [asyncio.create_task(run(connection, task)) for connection, task in zip(connections, tasks,
                                                                                          strict=True)]
        held = await wait_until(lambda: [uuid for replica in read_board() if replica["node"] == second.address
                                         for uuid in replica["jobs"]], 120)
        progress(f"killing node {second.name} ({second.address}) while it holds {len(held)} tasks")
        killed_at = time.monotonic()
        killed = second.kill()
        # From the kill on, alongside the tasks: when the board stops showing the dead node's replica, and when
        # Serve has started another in its place (where there is room: the head has a CPU left).
        def on_the_head() -> list[str]:
            return [replica["node"] for replica in read_board() if replica["node"] == head.address]

        left_board = asyncio.create_task(seconds_until(lambda: len(read_board()) == len(on_the_head()), killed_at,
                                                       60))
        replaced = asyncio.create_task(seconds_until(lambda: len(on_the_head()) == 2, killed_at, 120))
        await asyncio.gather(*running)
        progress("after the death")
        after = [(await connections[0].run(TINY_CLUSTER.task(40_000 + index)))[0] for index in range(4)]
        board_clear_s, replaced_s = await left_board, await replaced
        board = read_board()
    finally:
        for connection in connections:
            await connection.close()
    held_answered = [answered[uuid] - killed_at for uuid in held if uuid in answered]
    return {
        "processes_killed": len(killed), "tasks": len(tasks), "held_by_dead_node": len(held),
        "answered_with_image": len(answered), "failed": failed, "retried": len(retries),
        # The gateway's retry comes once Ray has told it that the replica's process is unreachable.
        "first_retry_after_s": round(retries[0] - killed_at, 2) if retries else None,
        "recovered_after_s": round(max(held_answered), 2) if held_answered else None,
        "latency_after_ms": summarize(milliseconds(after)),
        "dead_replica_left_board_after_s": board_clear_s, "two_replicas_again_after_s": replaced_s,
        "replicas_after": [{"node": replica["node"], "runs": sum(replica["runs"].values())} for replica in board]}


async def run(sequential: int, per_connection: int) -> dict[str, Any]:
    environment = cluster_environment()
    os.environ.update(environment)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # this process's own Ray, reading the board: loopback
    root = Path(tempfile.mkdtemp(prefix="iw-bench-nodes-"))
    progress("starting the head and a second node")
    started = time.monotonic()
    head = RayNode("a", 0, root, environment, cpus=2)
    nodes = [head]
    gateway: ServerProcess | None = None
    try:
        second = RayNode("b", 1, root, environment, cpus=2, head=head)
        nodes.append(second)
        gateway = ServerProcess(data_dir=root / "data", api_key=API_KEY, device="cpu", env=environment,
                                extra_args=("--engine", "ray", "--ray-address", head.gcs_address, "--replicas", "2",
                                            "--max-batch-size", "1"))
        await asyncio.to_thread(gateway.start, 600.0)
        import ray

        ray.init(address=head.gcs_address, namespace="imagewire", configure_logging=False, log_to_driver=False)
        board = await wait_until(lambda: len(board := read_board()) == 2 and board, 120)
        result: dict[str, Any] = {
            "started_s": round(time.monotonic() - started, 1),
            "replicas": [{"node": replica["node"], "node_id": replica["node_id"][:12]} for replica in board],
            "listening": listeners({pid for node in nodes for pid in node.processes}
                                   | set(descendants(gateway.pid)))}
        progress("measuring")
        result.update(await measure(gateway.url, head, second, sequential, per_connection))
        result["node_death"] = await node_death(gateway, head, second)
        return result
    finally:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
        if gateway is not None:
            await asyncio.to_thread(gateway.stop)
        for node in reversed(nodes):
            await asyncio.to_thread(node.stop)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_nodes", description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=10, help="tasks one at a time, for the latency")
    parser.add_argument("--per-connection", type=int, default=4,
                        help=f"tasks from each of {CONNECTIONS} connections at once")
    options = parser.parse_args()
    # This process reads the board as a Ray driver, and Ray prints its cluster events (a node marked dead) to
    # the driver's stdout: stdout is kept for the results.
    results, sys.stdout = sys.stdout, sys.stderr
    measured = asyncio.run(run(options.sequential, options.per_connection))
    json.dump(measured, results, indent=2)
    print(file=results)


if __name__ == "__main__":
    main()
