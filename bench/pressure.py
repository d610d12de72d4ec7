"""What a hostile but authenticated client can make the server hold, and what others see meanwhile.

    python -m bench.pressure [--scenarios silent,crowd,...] [--out FILE] [--server-checkout DIR]

Each scenario starts its own server (CPU, the embedded tiny model, loopback only) and reports figures:

- ``silent``: a client that never reads sends 60 tasks whose error replies are twice their size
  (a ~900 KB unknown key each), then frames of almost ``--max-frame-mib`` back to back. Server RSS.
- ``crowd``: eight such clients at once, each sending frames of almost ``--max-frame-mib`` back to
  back, against the default ``--max-inbound-mib`` and against a budget too large to matter, side by
  side; a ninth client pings throughout. Server RSS, frames taken, ping round trips.
- ``seeds``: while a slow task holds the device, 40 image-to-image tasks whose seed is a one-colour
  4000² PNG (a ~75 KB data URI), output 128². Server RSS while they wait.
- ``fairness``: key A queues 128 tasks (256², 4 steps) and disconnects; key B then runs 128² tasks.
- ``disk``: images stored and last used long ago, then the disk (a tmpfs; needs root) fills up. Reads,
  image-to-image from those UUIDs, and uploads, before and after space returns.
- ``handshakes``: 1,100 sockets from one address each send half an HTTP request and open again when
  dropped, for 30 s, against a server limited to 1,024 open files. A normal client connects and
  authenticates every 2 s; the server's log volume is counted.
- ``storm``: key A sends frames of 64 getResponse for one finished 20-image task, reading every answer, for
  20 s; key B pings every 50 ms. B's ping round trips, A's answers and refusals.
- ``gzip``: ten keyless REST bodies at once, each 256 MiB of zeros gzipped. Statuses, server RSS.
- ``slowbody``: four keyless chunked REST bodies trickle in; then key B uploads a 198 KB image over its
  socket. Answered, and how soon.
- ``restanswer``: one POST of 64 getResponse, each for a task of 20 base64 PNG results. Status, answer size,
  server RSS.
- ``logforge``: tasks with a newline and a made-up log line in their taskUUID, a key and their taskType. Log
  lines starting with it.

``--server-checkout DIR`` runs the servers of another checkout (with its own ``.venv``), e.g. a worktree of the
commit before a fix, so that before and after come from the same scenario code.

Every loop is bounded in time; nothing but loopback traffic is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gzip
import io
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bench.load_test import API_KEY as KEY_A
from bench.load_test import LoadConnection
from bench.server_process import ServerProcess
from bench.stats import percentile

KEY_B = "pressure-key-b"
MIB = 1024 * 1024
# --server-checkout: the checkout whose server the scenarios run against (its own .venv); None: this one.
SERVER_CHECKOUT: Path | None = None


@contextlib.contextmanager
def server_on(data_dir: Path, *args: str, open_files: int | None = None) -> Any:
    server = ServerProcess(data_dir=data_dir, api_key=KEY_A, device="cpu",
                           extra_args=(f"--api-key={KEY_B}", *args), open_files=open_files,
                           checkout=SERVER_CHECKOUT)
    with server:
        yield server


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


def http_base(server: ServerProcess) -> str:
    return "http://" + urllib.parse.urlsplit(server.url).netloc


def port_of(server: ServerProcess) -> int:
    return int(urllib.parse.urlsplit(server.url).port or 80)


def metric(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(http_base(server) + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else float("nan")


class MemoryWatch:
    """Samples the server's RSS every 0.2 s while it runs."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.samples: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.samples.append(self.server.memory_kib().get("VmRSS", 0))
            await asyncio.sleep(0.2)

    async def __aenter__(self) -> MemoryWatch:
        self._task = asyncio.ensure_future(self._sample())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()

    @property
    def peak_mib(self) -> float:
        return mib(max(self.samples, default=0))


def inference(**fields: Any) -> dict[str, Any]:
    task = {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": "imagewire:tiny@1",
            "positivePrompt": "pressure", "width": 128, "height": 128, "steps": 2, "outputFormat": "JPG",
            "outputType": "URL"}
    task.update(fields)
    return task


def png_data_uri(side: int, colour: tuple[int, int, int] = (200, 40, 40)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


def large_frame() -> str:
    """62 ping tasks padded to 1 MiB each: a frame of almost the default --max-frame-mib."""
    return "[" + ",".join(["{\"taskType\":\"ping\",\"pad\":\"" + "x" * (MIB - 40) + "\"}"] * 62) + "]"


async def non_reading_client(server: ServerProcess) -> Any:
    """An authenticated socket with a small receive window, whose client then never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect(("127.0.0.1", port_of(server)))
    websocket = await connect(server.url, sock=sock, max_size=None, max_queue=1, compression=None,
                              ping_interval=None, open_timeout=30)
    await websocket.send(orjson.dumps([{"taskType": "authentication", "apiKey": KEY_A}]).decode())
    await websocket.recv()
    return websocket


async def silent(data_dir: Path, duration: float = 40.0) -> dict[str, Any]:
    with server_on(data_dir) as server:
        warm = await LoadConnection.open(server.url)
        await warm.run(inference())
        await warm.close()
        baseline = server.memory_kib()["VmRSS"]
        websocket = await non_reading_client(server)
        wide = [inference(**{"k" * 900_000: 1}) for _ in range(60)]
        frame = large_frame()
        sent = 0
        started = time.monotonic()
        closed_after = None
        async with MemoryWatch(server) as memory:
            try:
                await asyncio.wait_for(websocket.send(orjson.dumps(wide).decode()), 30)
                sent += 1
                while time.monotonic() - started < duration:
                    await asyncio.wait_for(websocket.send(frame), duration)
                    sent += 1
            except (ConnectionClosed, TimeoutError, OSError):
                pass
            closed_after = time.monotonic() - started
            await asyncio.sleep(2)
        closed = [line for line in server.log_tail().splitlines() if "not reading its answers" in line]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(websocket.close(), 2)
        after = server.memory_kib()
    return {"frames_sent": sent, "frame_mib": round(len(frame) / MIB, 1),
            "seconds_until_the_server_stopped_it": round(closed_after, 1),
            "closed_1008_not_reading": bool(closed),
            "rss_mib": {"before": mib(baseline), "peak_sampled": memory.peak_mib,
                        "high_water_mark": mib(after["VmHWM"]), "after": mib(after["VmRSS"])}}


async def crowd(data_dir: Path, sockets: int = 8, duration: float = 40.0) -> dict[str, Any]:
    results: dict[str, Any] = {"sockets": sockets}
    for budget_mib in (256, 65536):
        results[f"max_inbound_mib_{budget_mib}"] = await crowd_against(data_dir / str(budget_mib), budget_mib,
                                                                       sockets, duration)
    return results


async def crowd_against(data_dir: Path, budget_mib: int, sockets: int, duration: float) -> dict[str, Any]:
    frame = large_frame()
    with server_on(data_dir, f"--max-inbound-mib={budget_mib}") as server:
        pinger = await LoadConnection.open(server.url)
        await pinger.run(inference())
        baseline = server.memory_kib()["VmRSS"]
        senders = []
        for _ in range(sockets):
            senders.append(await non_reading_client(server))
        sent = [0] * sockets
        pings: list[float] = []
        deadline = time.monotonic() + duration

        async def flood(index: int) -> None:
            with contextlib.suppress(ConnectionClosed, TimeoutError, OSError):
                while time.monotonic() < deadline:
                    await asyncio.wait_for(senders[index].send(frame), max(0.1, deadline - time.monotonic()))
                    sent[index] += 1

        async def ping() -> None:
            while time.monotonic() < deadline:
                pings.append(await pinger.ping() * 1000)
                await asyncio.sleep(0.5)

        async with MemoryWatch(server) as memory:
            await asyncio.gather(ping(), *(flood(index) for index in range(sockets)))
        after = server.memory_kib()
        for websocket in senders:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(websocket.close(), 2)
        await pinger.close()
    pings.sort()
    return {"frame_mib": round(len(frame) / MIB, 1), "frames_sent": sum(sent),
            "rss_mib": {"before": mib(baseline), "peak_sampled": memory.peak_mib,
                        "high_water_mark": mib(after["VmHWM"])},
            "ping_ms": {"median": round(statistics.median(pings), 1), "max": round(pings[-1], 1),
                        "count": len(pings)} if pings else None}


async def seeds(data_dir: Path, waiting: int = 40) -> dict[str, Any]:
    seed = png_data_uri(4000)
    with server_on(data_dir) as server:
        connection = await LoadConnection.open(server.url)
        await connection.run(inference(seedImage=png_data_uri(256), strength=0.5))
        baseline = server.memory_kib()["VmRSS"]
        holder = asyncio.ensure_future(connection.run(inference(width=1024, height=1024, steps=40)))
        await until(lambda: metric(server, "imagewire_queue_depth") == 0, 30)
        tasks = [inference(seedImage=seed, strength=0.5, seed=index) for index in range(waiting)]
        async with MemoryWatch(server) as memory:
            runs = [asyncio.ensure_future(connection.run(task)) for task in tasks]
            # Every seed decoded and resized: each task then holds exactly its 128² seed.
            held_all = await until(lambda: metric(server, "imagewire_held_input_pixels") == waiting * 128 * 128, 180)
            await asyncio.sleep(2)
            holding = server.memory_kib()["VmRSS"]
            still_waiting = not holder.done()
            held = metric(server, "imagewire_held_input_pixels")
        results = await asyncio.gather(holder, *runs)
        await connection.close()
        failed = [item for item in results if "code" in item]
    return {"seed_data_uri_kb": round(len(seed) / 1000), "waiting_tasks": waiting,
            "all_decoded_while_the_device_was_busy": held_all and still_waiting,
            "held_input_pixels": int(held), "failed": len(failed),
            "rss_mib": {"before": mib(baseline), "while_waiting": mib(holding), "peak_sampled": memory.peak_mib,
                        "per_waiting_task": round((holding - baseline) / 1024 / waiting, 2)}}


async def fairness(data_dir: Path, backlog: int = 128) -> dict[str, Any]:
    with server_on(data_dir, "--max-tasks-in-flight", str(backlog)) as server:
        key_b = await LoadConnection.open(server.url, api_key=KEY_B)
        idle = []
        for _ in range(3):
            started = time.perf_counter()
            await key_b.run(inference())
            idle.append(time.perf_counter() - started)
        key_a = await LoadConnection.open(server.url)
        for _ in range(backlog):
            await key_a.websocket.send(orjson.dumps([inference(width=256, height=256, steps=4)]).decode())
        await until(lambda: metric(server, "imagewire_queue_depth") >= backlog // 2, 60)
        await key_a.close()
        behind = []
        depth_after = []
        for _ in range(3):
            started = time.perf_counter()
            await key_b.run(inference())
            behind.append(time.perf_counter() - started)
            depth_after.append(int(metric(server, "imagewire_queue_depth")))
        drained_at = time.perf_counter()
        await until(lambda: metric(server, "imagewire_queue_depth") == 0, 600)
        backlog_left_s = time.perf_counter() - drained_at
        await key_b.close()
    return {"key_b_idle_s": [round(value, 3) for value in idle],
            "key_b_behind_a_backlog_s": [round(value, 3) for value in behind],
            "a_jobs_still_queued_after_each_b_task": depth_after,
            "seconds_a_backlog_still_took_after_b": round(backlog_left_s, 1)}


@contextlib.contextmanager
def small_tmpfs(size_mib: int) -> Any:
    directory = Path(tempfile.mkdtemp(prefix="imagewire-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=False)
        directory.rmdir()


async def disk(_: Path, images: int = 10) -> dict[str, Any]:
    try:
        mount = small_tmpfs(160)
        directory = mount.__enter__()
    except (subprocess.CalledProcessError, OSError) as exc:
        return {"skipped": f"cannot mount a tmpfs: {exc}"}
    try:
        with server_on(directory, "--min-free-disk-gib", "0") as server:
            connection = await LoadConnection.open(server.url)
            stored = []
            for index in range(images):
                item = await connection.run({"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()),
                                             "image": png_data_uri(256, (index * 20, 90, 160))})
                stored.append(item["imageUUID"])
            for metadata in (directory / "images").glob("*/*.json"):
                record = json.loads(metadata.read_text())
                record["last_used"] = time.time() - 3600  # so that the next read wants to note its use
                metadata.write_text(json.dumps(record))
            filler = directory / "filler"
            with filler.open("wb") as out, contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * MIB)
                    out.flush()
            full: dict[str, Any] = {"reads_ok": 0, "image_to_image": {}, "upload": None}
            for image_uuid in stored:
                request = urllib.request.Request(f"{http_base(server)}/image/{image_uuid}.png")
                with contextlib.suppress(Exception), urllib.request.urlopen(request, timeout=10) as answer:
                    full["reads_ok"] += answer.status == 200
                item = await connection.run(inference(seedImage=image_uuid, strength=0.5, outputType="base64Data"))
                outcome = item.get("code", "success") + (f" ({item['parameter']})" if "parameter" in item else "")
                full["image_to_image"][outcome] = full["image_to_image"].get(outcome, 0) + 1
                full.setdefault("image_to_image_message", item.get("message"))
            upload = await connection.run({"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()),
                                           "image": png_data_uri(256)})
            full["upload"] = upload.get("code", "success")
            filler.unlink()
            upload = await connection.run({"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()),
                                           "image": png_data_uri(256)})
            half_written = [path.name for path in (directory / "images").glob("*/.*")]
            await connection.close()
        return {"images": images, "disk_full": full, "upload_once_space_returned": upload.get("code", "success"),
                "temporary_files_left": half_written}
    finally:
        mount.__exit__(None, None, None)


async def half_handshakes(port: int, sockets: int, deadline: float, counts: dict[str, int]) -> None:
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"  # never finished

    async def one() -> None:
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                counts["refused"] += 1
                await asyncio.sleep(0.1)
                continue
            counts["opened"] += 1
            writer.write(request)
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(reader.read(), max(0.0, deadline - time.monotonic()))
            writer.close()

    await asyncio.gather(*(one() for _ in range(sockets)))


async def handshakes(data_dir: Path, sockets: int = 1100, duration: float = 30.0) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * sockets)), hard))
    with server_on(data_dir, open_files=1024) as server:
        port = port_of(server)
        idle = await timed_connect(server.url)
        assert idle is not None, "an idle server refused a client"
        lines, size = server.log_lines, server.log_bytes
        counts = {"opened": 0, "refused": 0}
        deadline = time.monotonic() + duration
        flood = asyncio.ensure_future(half_handshakes(port, sockets, deadline, counts))
        connects: list[float | None] = []
        await asyncio.sleep(2)
        while time.monotonic() < deadline - 2:
            connects.append(await timed_connect(server.url))
            await asyncio.sleep(2)
        await flood
        accept_errors = sum("accept" in line for line in server.log_tail().splitlines())
        log = {"lines": server.log_lines - lines, "bytes": server.log_bytes - size}
    done = [seconds for seconds in connects if seconds is not None]
    return {"flood_sockets": sockets, "seconds": duration, "flood_connections_opened": counts["opened"],
            "flood_connects_refused": counts["refused"], "connect_and_authenticate_idle_s": round(idle, 3),
            "connect_and_authenticate_during_flood_s": {
                "median": round(statistics.median(done), 3) if done else None,
                "max": round(max(done), 3) if done else None,
                "attempts": len(connects), "dropped": len(connects) - len(done)},
            "server_log_during_flood": log, "accept_error_lines_in_the_last_60": accept_errors}


async def pinging(connection: LoadConnection, deadline: float, every: float = 0.05) -> list[float]:
    """Round trips of ``connection``'s pings, in ms, one every ``every`` s until ``deadline``."""
    pings: list[float] = []
    while time.monotonic() < deadline:
        try:
            pings.append(await connection.ping() * 1000)
        except TimeoutError:
            pings.append(30_000.0)
        await asyncio.sleep(every)
    return pings


def ping_summary(pings: list[float]) -> dict[str, Any]:
    return {"p50": round(percentile(pings, 50), 1), "p99": round(percentile(pings, 99), 1),
            "max": round(max(pings), 1), "count": len(pings)} if pings else {"count": 0}


async def storm(data_dir: Path, duration: float = 20.0) -> dict[str, Any]:
    """Key A asks getResponse for one finished 20-image task, 64 times a frame, as fast as it reads the
    answers; key B pings every 50 ms on its own socket."""
    with server_on(data_dir) as server:
        pinger = await LoadConnection.open(server.url, api_key=KEY_B)
        connection = await LoadConnection.open(server.url)
        finished = inference(numberResults=20)
        await connection.run(finished)
        await asyncio.sleep(1)  # its other results arrive
        await connection.close()
        quiet = await pinging(pinger, time.monotonic() + 3)
        websocket = await connect(server.url, max_size=None, compression=None, ping_interval=None)
        await websocket.send(orjson.dumps([{"taskType": "authentication", "apiKey": KEY_A}]).decode())
        await websocket.recv()
        frame = orjson.dumps([{"taskType": "getResponse", "taskUUID": finished["taskUUID"]}] * 64).decode()
        tally = {"frames_sent": 0, "bytes_sent": 0, "bytes_received": 0, "answers": 0, "refused": {}}
        deadline = time.monotonic() + duration

        async def send() -> None:
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                while time.monotonic() < deadline:
                    await asyncio.wait_for(websocket.send(frame), max(0.1, deadline - time.monotonic()))
                    tally["frames_sent"] += 1
                    tally["bytes_sent"] += len(frame)
                    await asyncio.sleep(0)

        async def receive() -> None:
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                while time.monotonic() < deadline:
                    message = await asyncio.wait_for(websocket.recv(), max(0.1, deadline - time.monotonic()))
                    tally["bytes_received"] += len(message)
                    answer = orjson.loads(message)
                    if answer.get("data"):
                        tally["answers"] += 1
                    for error in answer.get("errors", []):
                        tally["refused"][error.get("code")] = tally["refused"].get(error.get("code"), 0) + 1

        pings, *_ = await asyncio.gather(pinging(pinger, deadline), send(), receive())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(websocket.close(), 2)
        await pinger.close()
    return {"seconds": duration, "storm": {**tally, "bytes_out_per_byte_in":
                                            round(tally["bytes_received"] / max(1, tally["bytes_sent"]), 1)},
            "other_key_ping_ms_idle": ping_summary(quiet), "other_key_ping_ms_during_storm": ping_summary(pings)}


async def raw_post(port: int, headers: dict[str, str], body: bytes, *, timeout: float) -> tuple[int | None, float]:
    """POST ``body`` over a raw connection; the answer's status (None if none came in time) and seconds taken."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"POST /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode()
                 + body)
    try:
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        status = int(line.split()[1]) if line.startswith(b"HTTP/") else None
    except (OSError, TimeoutError, ValueError, IndexError):
        status = None
    writer.close()
    return status, round(time.monotonic() - started, 2)


async def gzip_bodies(data_dir: Path, bodies: int = 10) -> dict[str, Any]:
    """Ten keyless REST bodies at once, each 256 MiB of zeros gzipped to ~250 KB, whose senders keep their
    connections open waiting for an answer."""
    bomb = gzip.compress(b"\0" * (256 * MIB), compresslevel=9)
    with server_on(data_dir) as server:
        warm = await LoadConnection.open(server.url)
        await warm.run(inference())
        await warm.close()
        baseline = server.memory_kib()["VmRSS"]
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        async with MemoryWatch(server) as memory:
            answers = await asyncio.gather(*(raw_post(port_of(server), headers, bomb, timeout=30)
                                             for _ in range(bodies)))
            await asyncio.sleep(1)
        after = server.memory_kib()
    statuses: dict[str, int] = {}
    for status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"bodies": bodies, "compressed_kb": round(len(bomb) / 1000), "inflated_mib": 256,
            "statuses": statuses, "slowest_answer_s": max(seconds for _, seconds in answers),
            "rss_mib": {"before": mib(baseline), "peak_sampled": memory.peak_mib,
                        "high_water_mark": mib(after["VmHWM"]), "after": mib(after["VmRSS"])}}


async def trickle(port: int, deadline: float) -> None:
    """A keyless chunked REST body that sends one byte a second until ``deadline``."""
    with contextlib.suppress(OSError):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n1\r\n[\r\n")
        while time.monotonic() < deadline:
            await asyncio.sleep(1)
            writer.write(b"1\r\n \r\n")
            await writer.drain()
        writer.close()


async def slowbody(data_dir: Path, trickles: int = 4, wait: float = 40.0) -> dict[str, Any]:
    """Four keyless chunked REST bodies trickle in a byte a second; then another key uploads a 197 KB image over
    its socket. Is it answered, and how soon?"""
    noise = Image.frombytes("RGB", (222, 222), os.urandom(222 * 222 * 3))  # a PNG that does not compress
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with server_on(data_dir) as server:
        uploader = await LoadConnection.open(server.url, api_key=KEY_B)
        deadline = time.monotonic() + wait + 5
        slow = [asyncio.ensure_future(trickle(port_of(server), deadline)) for _ in range(trickles)]
        await asyncio.sleep(3)
        started = time.monotonic()
        try:
            item = await asyncio.wait_for(uploader.run({"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()),
                                                        "image": image}), wait)
            outcome, latency = item.get("code", "success"), round(time.monotonic() - started, 2)
        except TimeoutError:
            outcome, latency = f"no answer within {wait:g} s", None
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
        await uploader.close()
    return {"trickling_bodies": trickles, "upload_kb": round(len(image) / 1000), "upload": outcome,
            "upload_answered_after_s": latency}


async def restanswer(data_dir: Path, tasks: int = 64, results: int = 20) -> dict[str, Any]:
    """One POST of 64 getResponse tasks, each for one finished task of 20 base64 PNG results (256², noise-like
    output of the random-weight model): an answer of 64 × 20 images."""
    with server_on(data_dir) as server:
        connection = await LoadConnection.open(server.url)
        finished = inference(numberResults=results, width=256, height=256, outputType="base64Data",
                             outputFormat="PNG")
        await connection.run(finished)
        await asyncio.sleep(2)  # its other results
        await connection.close()
        baseline = server.memory_kib()["VmRSS"]
        body = orjson.dumps([{"taskType": "getResponse", "taskUUID": finished["taskUUID"]}] * tasks)
        request = urllib.request.Request(http_base(server) + "/v1", data=body, method="POST", headers={
            "Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
        started = time.monotonic()
        async with MemoryWatch(server) as memory:
            def post() -> tuple[int, int]:
                try:
                    with urllib.request.urlopen(request, timeout=55) as answer:
                        return answer.status, len(answer.read())
                except urllib.error.HTTPError as error:
                    return error.code, len(error.read())
            try:
                status, size = await asyncio.to_thread(post)
            except (OSError, TimeoutError) as exc:
                status, size = f"failed: {exc!r}", 0
        seconds = round(time.monotonic() - started, 1)
        after = server.memory_kib()
    return {"tasks": tasks, "results_each": results, "status": status, "answer_mib": round(size / MIB, 1),
            "seconds": seconds, "rss_mib": {"before": mib(baseline), "peak_sampled": memory.peak_mib,
                                            "growth_to_high_water_mark": mib(after["VmHWM"] - baseline)}}


FORGED = "FORGED imagewire.task taskUUID=00000000-0000-0000-0000-000000000000 outcome=success"


async def logforge(data_dir: Path) -> dict[str, Any]:
    """Tasks whose taskUUID (and a prompt and an unknown key) carry a newline and a line of the client's making:
    how many lines of the server's log start with it?"""
    forged_uuid = "x\n" + FORGED
    with server_on(data_dir) as server:
        connection = await LoadConnection.open(server.url)
        tasks = [inference(taskUUID=forged_uuid), {"taskType": "getResponse", "taskUUID": forged_uuid},
                 inference(**{"\n" + FORGED: 1}), {"taskType": "\n" + FORGED, "taskUUID": forged_uuid}]
        await connection.websocket.send(orjson.dumps(tasks).decode())
        await asyncio.sleep(3)
        await connection.close()
        lines = server.log_tail().splitlines()
    return {"tasks_sent": len(tasks), "log_lines_starting_with_the_forged_prefix":
            sum(line.startswith("FORGED") for line in lines)}


async def timed_connect(url: str, source: str = "127.0.0.2") -> float | None:
    """Seconds to connect and authenticate from ``source`` (another loopback address than the flood's,
    as a real client has another address than an attacker); None if the server dropped it."""
    started = time.perf_counter()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    split = urllib.parse.urlsplit(url)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (split.hostname, split.port))
        websocket = await connect(url, sock=sock, compression=None, ping_interval=None, open_timeout=60)
        await websocket.send(orjson.dumps([{"taskType": "authentication", "apiKey": KEY_A}]).decode())
        reply = orjson.loads(await websocket.recv())
    except (OSError, ConnectionClosed, TimeoutError, EOFError) as exc:
        print(f"connect failed: {exc!r}", flush=True)
        sock.close()
        return None
    elapsed = time.perf_counter() - started
    await websocket.close()
    return elapsed if "data" in reply else None


SCENARIOS = {"silent": silent, "crowd": crowd, "seeds": seeds, "fairness": fairness, "disk": disk,
             "handshakes": handshakes, "storm": storm, "gzip": gzip_bodies, "slowbody": slowbody,
             "restanswer": restanswer, "logforge": logforge}


async def run(names: list[str]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    for name in names:
        with tempfile.TemporaryDirectory() as data_dir:
            yield name, await SCENARIOS[name](Path(data_dir))


async def main_async(names: list[str], out: Path | None) -> None:
    results: dict[str, Any] = {"command": "python -m bench.pressure --scenarios " + ",".join(names),
                               "cpus": os.cpu_count()}
    async for name, result in run(names):
        results[name] = result
        print(json.dumps({name: result}, indent=2), flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pressure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--server-checkout", type=Path,
                        help="run the servers of another checkout of this project (with its own .venv), e.g. an "
                             "older commit's worktree, for a before-and-after figure")
    args = parser.parse_args()
    global SERVER_CHECKOUT
    SERVER_CHECKOUT = args.server_checkout
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {sorted(SCENARIOS)}")
    asyncio.run(main_async(names, args.out))


if __name__ == "__main__":
    main()
