"""The server as a real process: graceful stop on SIGTERM, and nothing answered lost to a hard kill."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed

from tests.timing import seconds
from tests.wire import API_KEY, Wire, eventually, inference

READY = re.compile(r"imagewire ready: (ws://\S+)")


class ServerProcess:
    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url

    @classmethod
    async def start(cls, data_dir: Path, *extra: str) -> ServerProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imagewire.server", "--port", "0", "--data-dir", str(data_dir), "--api-key", API_KEY,
            *extra, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
        assert process.stderr is not None
        start = b""
        while True:
            line = await asyncio.wait_for(process.stderr.readline(), seconds(120))
            assert line, "the server exited before it was ready"
            start += line
            match = READY.search(line.decode())
            if match:
                server = cls(process, match.group(1))
                server.log = start
                server._drain = asyncio.ensure_future(server._read_rest())
                return server

    log = b""

    async def _read_rest(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(65536):
            self.log += chunk

    async def on_the_device(self, task_uuid: str) -> None:
        """Wait until the server logs that the task runs (the server must log at DEBUG)."""
        line = f"taskUUID={task_uuid} on the device".encode()

        async def logged() -> bool:
            return line in self.log

        await eventually(logged, timeout=seconds(120))

    async def wait(self, timeout: float = seconds(60)) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await self._drain
        return code


@pytest.fixture
async def processes() -> AsyncIterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.process.returncode is None:
            server.process.kill()
            await server.process.wait()


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=seconds(10)) as response:
        return response.read()


async def sigterm_while_running(data_dir: Path, processes: list[ServerProcess], grace: str,
                                task: dict) -> tuple[ServerProcess, Wire]:
    """Start a server with ``--shutdown-grace grace``, send ``task``, and SIGTERM it once the task runs."""
    server = await ServerProcess.start(data_dir, "--shutdown-grace", grace, "--log-level", "DEBUG")
    processes.append(server)
    wire = await Wire.open(server.url)
    await wire.send([task])
    await server.on_the_device(task["taskUUID"])
    server.process.send_signal(signal.SIGTERM)
    return server, wire


async def test_sigterm_lets_running_tasks_finish_then_closes_with_1001_and_exits_0(data_dir, processes):
    task = inference(width=384, height=384, steps=12, numberResults=2)
    server, wire = await sigterm_while_running(data_dir, processes, "300", task)
    data, errors = await wire.items_for(task["taskUUID"], 2, timeout=seconds(120))
    assert len(data) == 2 and not errors
    with pytest.raises(ConnectionClosed):
        await wire.receive(timeout=seconds(30))
    assert wire.websocket.close_code == 1001
    assert await server.wait() == 0
    assert b"shutting down" in server.log and b"stopped" in server.log


async def test_tasks_cut_off_by_the_end_of_the_grace_period_are_told_so(data_dir, processes):
    task = inference(width=512, height=512, steps=40, numberResults=4)
    server, wire = await sigterm_while_running(data_dir, processes, "0.2", task)
    _, errors = await wire.items_for(task["taskUUID"], 4, timeout=seconds(60))
    assert errors[0]["code"] == "serviceUnavailable" and "shut down" in errors[0]["message"]
    assert await server.wait() == 0


async def test_a_hard_kill_loses_nothing_already_answered(data_dir, processes):
    first = await ServerProcess.start(data_dir)
    processes.append(first)
    wire = await Wire.open(first.url)
    buffer = io.BytesIO()
    Image.new("RGB", (160, 128), (0, 90, 200)).save(buffer, "PNG")
    [upload] = await wire.run({"taskType": "imageUpload", "image": base64.b64encode(buffer.getvalue()).decode()})
    [generated] = await wire.run(inference())
    before = {item["imageUUID"]: await asyncio.to_thread(http_get, item["imageURL"]) for item in (upload, generated)}
    first.process.kill()  # SIGKILL: no chance to clean up
    await first.wait()
    # what an interrupted write would leave behind
    folder = next(path for path in (data_dir / "images").iterdir() if path.is_dir())
    leftover = folder / ".00000000-0000-4000-8000-000000000000.png.abc123.tmp"
    leftover.write_bytes(b"half an image")

    second = await ServerProcess.start(data_dir)
    processes.append(second)
    assert not leftover.exists()
    wire = await Wire.open(second.url)
    for image_uuid, data in before.items():
        url = second.url.replace("ws://", "http://").removesuffix("/v1") + f"/image/{image_uuid}"
        extension = "png"
        assert await asyncio.to_thread(http_get, f"{url}.{extension}") == data
        assert await wire.run(inference(seedImage=image_uuid, strength=0.5))
    await wire.close()
    second.process.send_signal(signal.SIGINT)
    assert await second.wait() == 0


async def test_a_start_logs_nothing_an_operator_could_not_act_on(data_dir, processes):
    # transformers names each image processor that falls back to PIL without torchvision, and the first model's
    # load imports every diffusers pipeline: a plain start printed three notices asking for torchvision.
    server = await ServerProcess.start(data_dir)
    processes.append(server)
    wire = await Wire.open(server.url)
    await wire.run(inference())
    await wire.close()
    server.process.send_signal(signal.SIGTERM)
    assert await server.wait() == 0
    log = server.log.decode()
    assert "loaded model imagewire:tiny@1" in log, log
    assert "torchvision" not in log and "Traceback" not in log and " WARNING " not in log, log
