"""What keeping sessions and task records in Redis (``--state``) adds to each task, side by side with memory.

    python -m bench.state_cost [--tasks 300] [--images 20]

Starts a redis-server of its own on 127.0.0.1 (nothing kept on disk), and two servers in this process on the
embedded tiny model: one with the default in-memory state, one with ``--state`` on that Redis. Both are
driven alike, in turns (a task on one, then on the other), so that the machine's load falls on both:

- ``modelSearch``: a recorded task with no device work, so its round trip is almost all overhead;
- ``imageInference`` on the tiny model (128², 2 steps) for scale;
- getResponse for a finished task, which with Redis is read there.

Prints one table; latencies are from send to the answer, one request in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.client import BenchConnection
from bench.stats import milliseconds, summarize

API_KEY = "bench-key"


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    executable = shutil.which("redis-server")
    if executable is None:
        sys.exit("bench.state_cost: redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([executable, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                "--appendonly", "no", "--dir", str(directory)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(16).startswith(b"+PONG"):
                    return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            sys.exit("bench.state_cost: redis-server did not start")
        time.sleep(0.05)


async def measure(tasks: int, images: int, data_dir: Path, redis_url: str) -> dict[str, dict[str, Any]]:
    from imagewire.server.app import ImagewireServer
    from imagewire.server.config import Config

    servers = {}
    for name, state in (("memory", None), ("redis", redis_url)):
        server = ImagewireServer(Config(host="127.0.0.1", port=0, data_dir=data_dir / name, api_keys=(API_KEY,),
                                        state=state))
        await server.start()
        servers[name] = server
    try:
        connections = {name: await BenchConnection.open(server.url, API_KEY) for name, server in servers.items()}
        timings: dict[str, dict[str, list[float]]] = {name: {"modelSearch": [], "imageInference": [],
                                                             "getResponse": []} for name in servers}

        async def timed(name: str, kind: str, task: dict[str, Any]) -> None:
            started = time.perf_counter()
            await connections[name].run(task)
            timings[name][kind].append(time.perf_counter() - started)

        for warmup in range(5):
            for name in servers:
                await connections[name].run(search())
                await connections[name].run(inference(warmup))
        for index in range(tasks):
            for name in (("memory", "redis") if index % 2 else ("redis", "memory")):
                task = search()
                await timed(name, "modelSearch", task)
                await timed(name, "getResponse", {"taskType": "getResponse", "taskUUID": task["taskUUID"]})
        for index in range(images):
            for name in (("memory", "redis") if index % 2 else ("redis", "memory")):
                await timed(name, "imageInference", inference(index))
        for connection in connections.values():
            await connection.websocket.close()
    finally:
        for server in servers.values():
            await server.stop(grace=5)
    return {name: {kind: summarize(milliseconds(values)) for kind, values in kinds.items()}
            for name, kinds in timings.items()}


def search() -> dict[str, Any]:
    return {"taskType": "modelSearch", "taskUUID": str(uuid.uuid4()), "search": "tiny"}


def inference(seed: int) -> dict[str, Any]:
    return {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": "imagewire:tiny@1",
            "positivePrompt": "a red fox in the snow", "width": 128, "height": 128, "steps": 2, "seed": seed,
            "outputType": "URL", "outputFormat": "PNG"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.state_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300, help="modelSearch and getResponse round trips per state")
    parser.add_argument("--images", type=int, default=20, help="tiny imageInference tasks per state")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imagewire-state-cost-") as scratch:
        root = Path(scratch)
        process, redis_url = start_redis(root)
        try:
            results = asyncio.run(measure(args.tasks, args.images, root, redis_url))
        finally:
            process.terminate()
            process.wait(timeout=10)
    print(f"{'task':<16}{'state':<8}{'n':>5}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for kind in ("modelSearch", "getResponse", "imageInference"):
        for name in ("memory", "redis"):
            row = results[name][kind]
            print(f"{kind:<16}{name:<8}{row['n']:>5}{row['p50']:>10.2f}{row['p99']:>10.2f}{row['mean']:>10.2f}")


if __name__ == "__main__":
    main()
