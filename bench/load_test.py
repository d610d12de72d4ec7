"""A bounded load test: many connections pinging and submitting at once against one server.

    python -m bench.load_test --connections 100 --duration 60

Starts its own server on loopback (the embedded tiny model), opens the connections, and for
``--duration`` seconds has each one submit tasks back to back (an upload first and every tenth after, small
text-to-image otherwise) while pinging every second. Reports tasks completed, errors by code,
ping round-trip p50/p99 and the server's peak memory, as a table and as JSON. Only loopback
traffic; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect

from bench.server_process import ServerProcess
from bench.stats import milliseconds, summarize

API_KEY = "load-test-key"


class LoadConnection:
    """One socket with a reader that routes answers to whoever waits for them (pings and tasks at once)."""

    def __init__(self, websocket: ClientConnection) -> None:
        self.websocket = websocket
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.pongs: collections.deque[asyncio.Future[float]] = collections.deque()
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, url: str, *, api_key: str = API_KEY) -> LoadConnection:
        websocket = await connect(url, max_size=None, compression=None, ping_interval=None, open_timeout=60)
        await websocket.send(orjson.dumps([{"taskType": "authentication", "apiKey": api_key}]).decode())
        reply = orjson.loads(await websocket.recv())
        if "data" not in reply:
            raise RuntimeError(f"authentication failed: {reply}")
        return cls(websocket)

    async def _read(self) -> None:
        async for frame in self.websocket:
            message = orjson.loads(frame)
            for item in message.get("data", []) + message.get("errors", []):
                if item.get("taskType") == "ping" and self.pongs:
                    self.pongs.popleft().set_result(time.perf_counter())
                future = self.waiting.pop(item.get("taskUUID", ""), None)
                if future is not None and not future.done():
                    future.set_result(item)

    async def ping(self) -> float:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.pongs.append(future)
        started = time.perf_counter()
        await self.websocket.send('[{"taskType":"ping","ping":true}]')
        return await asyncio.wait_for(future, 30) - started

    async def run(self, task: dict[str, Any]) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[task["taskUUID"]] = future
        await self.websocket.send(orjson.dumps([task]).decode())
        return await asyncio.wait_for(future, 300)

    async def close(self) -> None:
        await self.websocket.close()
        self.reader.cancel()


def small_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (40, 120, 200)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def drive(connection: LoadConnection, deadline: float, tally: dict[str, Any], upload: str) -> None:
    async def submit() -> None:
        count = 0
        while time.monotonic() < deadline:
            count += 1
            task: dict[str, Any]
            if count % 10 == 1:  # the first task of each connection, then every tenth
                task = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": upload}
            else:
                task = {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": "imagewire:tiny@1",
                        "positivePrompt": "load test", "width": 128, "height": 128, "steps": 2,
                        "outputType": "URL", "outputFormat": "JPG"}
            try:
                item = await connection.run(task)
            except TimeoutError:
                tally["errors"]["clientTimeout"] += 1
                continue
            if "code" in item:
                tally["errors"][item["code"]] += 1
            else:
                tally["completed"][task["taskType"]] += 1

    async def keep_pinging() -> None:
        while time.monotonic() < deadline:
            tally["pings"].append(await connection.ping())
            await asyncio.sleep(1.0)

    await asyncio.gather(submit(), keep_pinging())


async def sample_memory(server: ServerProcess, deadline: float, samples: list[int]) -> None:
    while time.monotonic() < deadline + 5:
        samples.append(server.memory_kib().get("VmRSS", 0))
        await asyncio.sleep(1.0)


async def load_test(connections: int, duration: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as data_dir, ServerProcess(
            data_dir=Path(data_dir), api_key=API_KEY, device="cpu") as server:
        sockets = []
        for start in range(0, connections, 10):  # in small batches, as real clients arrive
            sockets += await asyncio.gather(*(LoadConnection.open(server.url)
                                              for _ in range(min(10, connections - start))))
        tally: dict[str, Any] = {"completed": collections.Counter(), "errors": collections.Counter(), "pings": []}
        memory: list[int] = []
        started = time.monotonic()
        deadline = started + duration
        upload = small_png()
        sampler = asyncio.ensure_future(sample_memory(server, deadline, memory))
        await asyncio.gather(*(drive(socket, deadline, tally, upload) for socket in sockets))
        elapsed = time.monotonic() - started
        sampler.cancel()
        peak = server.memory_kib()
        for socket in sockets:
            await socket.close()
    completed = sum(tally["completed"].values())
    return {
        "connections": connections,
        "duration_s": round(elapsed, 1),
        "tasks_completed": dict(tally["completed"]),
        "tasks_per_second": round(completed / elapsed, 2),
        "errors_by_code": dict(tally["errors"]),
        "ping_ms": summarize(milliseconds(tally["pings"])),
        "server_rss_mib": {"peak_sampled": round(max(memory, default=0) / 1024, 1),
                           "high_water_mark": round(peak.get("VmHWM", 0) / 1024, 1),
                           "at_end": round(peak.get("VmRSS", 0) / 1024, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    result = asyncio.run(load_test(args.connections, args.duration))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
