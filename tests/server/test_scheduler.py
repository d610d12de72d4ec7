"""The device scheduler behind a real server, with a controllable engine in place of diffusers.

The engine seam lets these tests hold a job on the 'device' for as long as they need, which
is how a full queue, a failing job and pongs during inference are shown deterministically.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from PIL import Image

from server.scheduler import GeneratedImage, InferenceJob
from tests.wire import Wire, inference


class HeldEngine:
    """Blocks each job until released; fails jobs whose prompt says so."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.ran: list[str] = []

    def load(self, model: object) -> None:
        pass

    def run(self, job: InferenceJob, emit: Callable[[list[GeneratedImage]], None]) -> None:
        self.started.set()
        self.release.wait(30)
        self.ran.append(job.task_uuid)
        if "explode" in job.prompt:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        emit([GeneratedImage(i, seed, Image.new("RGB", (job.width, job.height)), 0.01)
              for i, seed in enumerate(job.seeds)])

    def recover(self) -> None:
        pass


async def test_pongs_flow_while_the_device_is_busy(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    task = inference()
    await wire.send([task])
    await asyncio.to_thread(engine.started.wait, 10)
    for _ in range(3):
        await wire.send([{"taskType": "ping", "ping": True}])
        reply = await wire.receive(timeout=5)
        assert reply["data"][0]["pong"] is True, reply
    engine.release.set()
    data, _ = await wire.items_for(task["taskUUID"], 1)
    assert data[0]["imageUUID"]
    await wire.close()


async def test_a_full_queue_answers_service_unavailable(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine, queue_size=1)
    wire = await Wire.open(server.url)
    running, waiting, refused = inference(), inference(), inference()
    await wire.send([running])
    await asyncio.to_thread(engine.started.wait, 10)
    await wire.send([waiting, refused])
    _, errors = await wire.items_for(refused["taskUUID"], 1)
    assert errors[0]["code"] == "serviceUnavailable" and "busy" in errors[0]["message"]
    engine.release.set()
    for task in (running, waiting):
        data, errors = await wire.items_for(task["taskUUID"], 1)
        assert data and not errors
    await wire.close()


async def test_a_failing_job_fails_only_its_task(start_server):
    engine = HeldEngine()
    engine.release.set()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    error = await wire.error(inference(positivePrompt="explode please"))
    assert error["code"] == "inferenceError" and "out of memory" in error["message"]
    assert "Traceback" not in error["message"]
    assert await wire.run(inference())
    await wire.close()


async def test_jobs_never_run_concurrently_and_all_finish(start_server):
    engine = HeldEngine()
    engine.release.set()
    server = await start_server(engine_factory=lambda: engine)
    wires = [await Wire.open(server.url) for _ in range(4)]
    tasks = [inference() for _ in range(4)]
    for wire, task in zip(wires, tasks, strict=True):
        await wire.send([task])
    for wire, task in zip(wires, tasks, strict=True):
        data, errors = await wire.items_for(task["taskUUID"], 1)
        assert data and not errors
    assert sorted(engine.ran) == sorted(t["taskUUID"] for t in tasks)
    for wire in wires:
        await wire.close()
