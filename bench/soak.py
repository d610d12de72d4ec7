"""A soak test: many mixed loopback clients against one server with the fake engine, for minutes.

    python -m bench.soak --minutes 10 [--clients 100] [--out FILE]

One server (``--engine fake``: the whole server path, results at once, no torch) and ``--clients`` clients
of one API key, each kind in turn: WebSocket clients running tasks one at a time (an upload every tenth, a
cancelTask right after every seventh), REST clients posting a task at a time, clients sending bad inputs,
one polling getResponse for finished tasks, and a few hostile ones (a getResponse storm, a client that
never reads its answers, a keyless gzip body). Another key pings every 0.2 s throughout.

It checks, and exits non-zero when one fails: every task sent got exactly one final answer (a result or an
error item, never both, never two, never none), the server's RSS stayed within ``--max-rss-growth-mib`` of
where it began, and the other key's ping p99 stayed under 100 ms. Only loopback traffic; it stops itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import gzip
import io
import json
import multiprocessing
import queue
import socket
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bench.server_process import ServerProcess
from bench.stats import percentile

KEY = "soak-key"
PINGER_KEY = "soak-pinger-key"
PING_P99_BOUND_MS = 100.0


def task_uuid() -> str:
    return str(uuid.uuid4())


def inference(**fields: Any) -> dict[str, Any]:
    task = {"taskType": "imageInference", "taskUUID": task_uuid(), "model": "imagewire:tiny@1",
            "positivePrompt": "soak", "width": 128, "height": 128, "steps": 2, "outputType": "URL"}
    task.update(fields)
    return task


def png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 140, 90)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def connect_retrying(url: str, **options: Any) -> ClientConnection:
    """A WebSocket connection, tried again a few times: a hundred clients starting at once from one address
    pass the server's bound on handshakes in progress per address, which drops the oldest."""
    for attempt in range(10):
        try:
            return await connect(url, max_size=None, compression=None, ping_interval=None, open_timeout=60,
                                 **options)
        except (OSError, InvalidHandshake, EOFError, TimeoutError):
            if attempt == 9 or "sock" in options:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


class Tally:
    """Final answers by taskUUID, for tasks this run sent and must see answered exactly once."""

    def __init__(self) -> None:
        self.sent: set[str] = set()
        self.answers: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.hostile: collections.Counter[str] = collections.Counter()
        self.pings: list[float] = []
        self.pinger_error: str | None = None
        self.kinds: dict[str, str] = {}  # taskUUID → which client sent it, to say where an answer went missing
        self.failed_requests: collections.Counter[str] = collections.Counter()

    def send(self, task_uuid: str, kind: str) -> None:
        self.sent.add(task_uuid)
        self.kinds[task_uuid] = kind

    def answered(self, item: dict[str, Any]) -> None:
        if item.get("taskUUID") in self.sent:
            self.answers[item["taskUUID"]] += 1
            self.outcomes[item.get("code", "success")] += 1


class Socket:
    """One authenticated socket whose reader counts every final answer item and wakes who waits for it."""

    def __init__(self, websocket: ClientConnection, tally: Tally, counts: bool) -> None:
        self.websocket = websocket
        self.tally = tally
        self.counts = counts  # False for getResponse pollers: their answers name other tasks
        self.waiting: dict[str, asyncio.Future[None]] = {}
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, url: str, tally: Tally, api_key: str = KEY, counts: bool = True) -> Socket:
        """Connect and authenticate, again as a client would where the server turned the socket away: a hundred
        sockets from one address opening at once pass its bound on sockets not yet authenticated, and the
        oldest is answered an error and closed (1008)."""
        for attempt in range(10):
            websocket = await connect_retrying(url)
            await websocket.send(orjson.dumps([{"taskType": "authentication", "apiKey": api_key}]).decode())
            with contextlib.suppress(ConnectionClosed):
                answer = orjson.loads(await websocket.recv())
                if not answer.get("errors"):
                    return cls(websocket, tally, counts)
            tally.failed_requests["socket turned away before authenticating"] += 1
            with contextlib.suppress(Exception):
                await websocket.close()
            await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("the server turned this socket away ten times before it could authenticate")

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.websocket:
                message = orjson.loads(frame)
                for item in message.get("data", []) + message.get("errors", []):
                    # A cancelTask's answer names the task it stopped; it is not that task's answer.
                    if not self.counts or item.get("taskType") in ("cancelTask", "ping"):
                        continue
                    self.tally.answered(item)
                    waiter = self.waiting.pop(item.get("taskUUID", ""), None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)

    async def run(self, *tasks: dict[str, Any], timeout: float = 60) -> None:
        """Send ``tasks`` in one frame; wait for the first one's answer."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiting[tasks[0]["taskUUID"]] = waiter
        for task in tasks:
            if task["taskType"] != "cancelTask":
                self.tally.send(task["taskUUID"], f"socket {task['taskType']}{' cancelled' if len(tasks) > 1 else ''}")
        await self.websocket.send(orjson.dumps(list(tasks)).decode())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, timeout)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.websocket.close(), 5)
        # A socket the server is not reading (the storm's, slowed) cannot finish its closing handshake.
        self.websocket.transport.abort()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


async def socket_client(url: str, deadline: float, tally: Tally, upload: str, finished: list[str]) -> None:
    connection = await Socket.open(url, tally)
    count = 0
    while time.monotonic() < deadline:
        count += 1
        task = ({"taskType": "imageUpload", "taskUUID": task_uuid(), "image": upload} if count % 10 == 1
                else inference(seed=count))
        if count % 7 == 0:
            await connection.run(task, {"taskType": "cancelTask", "taskUUID": task["taskUUID"]})
        else:
            await connection.run(task)
        finished.append(task["taskUUID"])
        del finished[:-200]
    await asyncio.sleep(1)  # the last answers of cancelled tasks
    await connection.close()


async def rest_client(url: str, deadline: float, tally: Tally) -> None:
    endpoint = "http://" + urllib.parse.urlsplit(url).netloc + "/v1"
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            task = inference()
            tally.send(task["taskUUID"], "rest")
            try:
                async with session.post(endpoint, json=[task], headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=60)) as answer:
                    body = await answer.json()
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Not the server's answer: the request never got one (say, dropped while connecting).
                tally.failed_requests[type(exc).__name__] += 1
                tally.sent.discard(task["taskUUID"])
                continue
            for item in body.get("data", []) + body.get("errors", []):
                tally.answered(item)


async def bad_input_client(url: str, deadline: float, tally: Tally) -> None:
    connection = await Socket.open(url, tally)
    bad = [lambda: inference(width=129), lambda: inference(steps=0), lambda: inference(model="nobody:0@0"),
           lambda: inference(seedImage="not-an-image", strength=0.5), lambda: inference(unknownThing=1),
           lambda: {"taskType": "getResponse", "taskUUID": task_uuid()}]
    count = 0
    while time.monotonic() < deadline:
        await connection.run(bad[count % len(bad)]())
        count += 1
        await asyncio.sleep(0.05)
    await connection.close()


async def poller(url: str, deadline: float, tally: Tally, finished: list[str]) -> None:
    """getResponse for recently finished tasks, one at a time: its answers are counted apart."""
    connection = await Socket.open(url, tally, counts=False)
    while time.monotonic() < deadline:
        if finished:
            await connection.websocket.send(orjson.dumps(
                [{"taskType": "getResponse", "taskUUID": finished[-1]}]).decode())
            tally.hostile["getResponse polls"] += 1
        await asyncio.sleep(0.1)
    await connection.close()


async def storm(url: str, deadline: float, tally: Tally, finished: list[str]) -> None:
    """Frames of 64 getResponse as fast as the server reads them."""
    connection = await Socket.open(url, tally, counts=False)
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        while time.monotonic() < deadline:
            if not finished:
                await asyncio.sleep(0.1)
                continue
            frame = orjson.dumps([{"taskType": "getResponse", "taskUUID": finished[0]}] * 64).decode()
            await asyncio.wait_for(connection.websocket.send(frame), max(0.1, deadline - time.monotonic()))
            tally.hostile["storm frames"] += 1
    await connection.close()


async def non_reader(url: str, deadline: float, tally: Tally) -> None:
    """Sends tasks and never reads an answer (until the server closes it); then connects again."""
    port = urllib.parse.urlsplit(url).port
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.connect(("127.0.0.1", port))
        try:
            websocket = await connect(url, sock=sock, max_size=None, compression=None, ping_interval=None)
        except (OSError, InvalidHandshake, EOFError, TimeoutError):
            sock.close()
            await asyncio.sleep(0.5)
            continue
        await websocket.send(orjson.dumps([{"taskType": "authentication", "apiKey": KEY}]).decode())
        websocket.transport.pause_reading()
        with contextlib.suppress(ConnectionClosed, TimeoutError, OSError):
            while time.monotonic() < deadline:
                await asyncio.wait_for(websocket.send(orjson.dumps(
                    [{"taskType": "modelSearch", "taskUUID": task_uuid(), "limit": 100}] * 20).decode()), 5)
                await asyncio.sleep(0.2)
        tally.hostile["non-reader connections"] += 1
        websocket.transport.abort()


async def gzip_bomber(url: str, deadline: float, tally: Tally) -> None:
    """A keyless 64 MiB-of-zeros gzip body every 2 s."""
    endpoint = "http://" + urllib.parse.urlsplit(url).netloc + "/v1"
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.post(endpoint, data=bomb, headers={"Content-Encoding": "gzip"},
                                        timeout=aiohttp.ClientTimeout(total=30)) as answer:
                    tally.hostile[f"gzip bodies answered {answer.status}"] += 1
            await asyncio.sleep(2)


async def ping_every(url: str, seconds: float) -> tuple[list[float], str | None]:
    """Round trips in ms, and what stopped them early, if anything."""
    pings: list[float] = []
    deadline = time.monotonic() + seconds
    try:
        websocket = await connect_retrying(url)
        await websocket.send(orjson.dumps([{"taskType": "authentication", "apiKey": PINGER_KEY}]).decode())
        await websocket.recv()
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await websocket.send('[{"taskType":"ping","ping":true}]')
            await asyncio.wait_for(websocket.recv(), 30)
            pings.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.2)
        await websocket.close()
    except Exception as exc:  # reported with the figures, rather than leaving the parent waiting
        return pings, repr(exc)
    return pings, None


def _ping_process(url: str, seconds: float, out: Any) -> None:
    out.put(asyncio.run(ping_every(url, seconds)))


async def pinger(url: str, seconds: float, tally: Tally) -> None:
    """Another key's pings, from a process of their own: in this one, its event loop would be busy with the
    hundred other clients, and a round trip would measure this process rather than the server."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(target=_ping_process, args=(url, seconds, out), daemon=True)
    process.start()
    try:
        tally.pings, tally.pinger_error = await asyncio.to_thread(out.get, True, seconds + 60)
    except queue.Empty:
        tally.pinger_error = f"the ping process gave nothing back (exit code {process.exitcode})"
    await asyncio.to_thread(process.join, 10)


async def sample_rss(server: ServerProcess, deadline: float, samples: list[int]) -> None:
    while time.monotonic() < deadline:
        samples.append(server.memory_kib().get("VmRSS", 0))
        await asyncio.sleep(1)


async def soak(seconds: float, clients: int, max_rss_growth_mib: float) -> dict[str, Any]:
    tally = Tally()
    finished: list[str] = []
    upload = png_data_uri()
    with tempfile.TemporaryDirectory() as data_dir, ServerProcess(
            data_dir=Path(data_dir), api_key=KEY, device="cpu",
            extra_args=("--engine", "fake", f"--api-key={PINGER_KEY}", "--log-level", "INFO")) as server:
        url = server.url
        warm = await Socket.open(url, tally)
        await warm.run(inference())
        await warm.close()
        baseline = server.memory_kib()["VmRSS"]
        started = time.monotonic()
        deadline = started + seconds
        hostile = [storm(url, deadline, tally, finished), non_reader(url, deadline, tally),
                   gzip_bomber(url, deadline, tally), poller(url, deadline, tally, finished)]
        kinds = []
        for index in range(max(0, clients - len(hostile))):
            kind = index % 10
            if kind < 6:
                kinds.append(socket_client(url, deadline, tally, upload, finished))
            elif kind < 9:
                kinds.append(rest_client(url, deadline, tally))
            else:
                kinds.append(bad_input_client(url, deadline, tally))
        samples: list[int] = []
        await asyncio.gather(pinger(url, seconds, tally), sample_rss(server, deadline, samples), *hostile, *kinds)
        await asyncio.sleep(3)  # answers still on their way
        elapsed = time.monotonic() - started
        end = server.memory_kib()
    missing = [uuid_ for uuid_ in tally.sent if tally.answers[uuid_] == 0]
    twice = [uuid_ for uuid_ in tally.sent if tally.answers[uuid_] > 1]
    growth = (max(samples, default=baseline) - baseline) / 1024
    p99 = percentile(tally.pings, 99)
    checks = {"every task answered exactly once": not missing and not twice,
              f"RSS grew at most {max_rss_growth_mib:g} MiB": growth <= max_rss_growth_mib,
              f"ping p99 under {PING_P99_BOUND_MS:g} ms": p99 < PING_P99_BOUND_MS and tally.pinger_error is None}
    return {"seconds": round(elapsed, 1), "clients": clients, "tasks_sent": len(tally.sent),
            "outcomes": dict(tally.outcomes), "unanswered": len(missing), "answered_twice": len(twice),
            "unanswered_by_client": dict(collections.Counter(tally.kinds[uuid_] for uuid_ in missing)),
            "rest_requests_without_an_answer": dict(tally.failed_requests),
            "hostile": dict(tally.hostile),
            "pinger_error": tally.pinger_error,
            "ping_ms": {"p50": round(percentile(tally.pings, 50), 1), "p99": round(p99, 1),
                        "max": round(max(tally.pings, default=0), 1), "count": len(tally.pings)},
            "rss_mib": {"before": round(baseline / 1024, 1), "peak_sampled": round(max(samples, default=0) / 1024, 1),
                        "end": round(end["VmRSS"] / 1024, 1), "high_water_mark": round(end["VmHWM"] / 1024, 1)},
            "checks": checks, "passed": all(checks.values())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--max-rss-growth-mib", type=float, default=512.0)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = asyncio.run(soak(args.minutes * 60, args.clients, args.max_rss_growth_mib))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
