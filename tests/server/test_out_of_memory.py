"""Out of device memory is a task error, never a dead worker: the device queue runs the call's tasks again in
smaller calls, keeps that model's calls that small, and fails only what does not fit even alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import pytest
import torch

from imagewire.server.device import BATCH_REGROWTH_SECONDS, DeviceQueue
from imagewire.tasks.errors import InferenceError
from imagewire.tasks.jobs import Emit, Job
from tests.timing import seconds


@dataclass(kw_only=True)
class ImagesJob(Job):
    """``count`` images of ``model``; jobs of one model share calls."""

    model_air: str = "test:big@1"
    count: int = 1

    @property
    def images(self) -> int:
        return self.count

    def batch_key(self) -> Hashable:
        return self.model_air

    @property
    def models(self) -> tuple[str, ...]:
        return (self.model_air,)


class TightEngine:
    """Makes at most ``fits`` images of ``test:big@1`` per call: a larger call raises torch's out-of-memory error,
    as CUDA would. Splits a run into calls of the device queue's ``max_images``, as the diffusers engine does.
    Holds its first call until ``release`` is set, so that jobs queue behind it."""

    unavailable_samplers: dict[str, str] = {}
    loaded_models: dict[str, str] = {}

    def __init__(self, fits: int) -> None:
        self.fits = fits
        self.calls: list[list[str]] = []   # the taskUUID of each image of each call
        self.recovered = 0
        self.release = threading.Event()

    def load(self, model: Any) -> None:
        pass

    def before_call(self) -> None:
        pass

    def recover(self) -> None:
        self.recovered += 1

    def device_memory(self) -> dict[str, int]:
        return {}

    def run(self, jobs: Sequence[Job], emit: Emit) -> None:
        assert self.release.wait(seconds(30))
        per_call = getattr(emit, "max_images")  # noqa: B009 - the device queue's, not the Emit protocol's
        images = [(index, job) for index, job in enumerate(jobs) for _ in range(job.images)]
        for start in range(0, len(images), per_call):
            chunk = images[start:start + per_call]
            self.calls.append([job.task_uuid for _, job in chunk])
            if jobs[0].models == ("test:big@1",) and len(chunk) > self.fits:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(chunk)}.00 GiB")
            for index, made in groupby(chunk, key=lambda pair: pair[0]):
                emit(index, [job.task_uuid for _, job in made])


async def results(handle: Any) -> list[Any]:
    return [result async for chunk in handle for result in chunk]


async def test_a_call_out_of_memory_runs_again_smaller_and_caps_that_model():
    engine = TightEngine(fits=2)
    device = DeviceQueue(lambda: engine, queue_size=16, max_batch_size=4)
    await asyncio.to_thread(device.start)
    try:
        # A first job holds the device while four single-image jobs of the model queue behind it.
        first = device.submit(ImagesJob(task_uuid="other", model_air="test:small@1"))
        together = [device.submit(ImagesJob(task_uuid=f"t{n}")) for n in range(4)]
        engine.release.set()
        assert await results(first) == ["other"]
        # Each task gets its own image: none fails, none is made twice.
        assert [await results(handle) for handle in together] == [["t0"], ["t1"], ["t2"], ["t3"]]
        # Tried as one call of four, then again in calls of two.
        assert engine.calls[1:] == [["t0", "t1", "t2", "t3"], ["t0", "t1"], ["t2", "t3"]]
        assert engine.recovered == 1
        assert device.batch_limits == {"test:big@1": 2}

        # Later: one job of four images runs in calls of two, with no failed call first.
        engine.calls.clear()
        assert await results(device.submit(ImagesJob(task_uuid="four", count=4))) == ["four"] * 4
        assert engine.calls == [["four", "four"], ["four", "four"]]
        # Another model keeps the full batch size.
        assert await results(device.submit(ImagesJob(task_uuid="small", model_air="test:small@1", count=4))) == \
            ["small"] * 4
        assert engine.calls[-1] == ["small"] * 4
        assert engine.recovered == 1
    finally:
        await asyncio.to_thread(device.stop, seconds(10))


async def test_one_image_that_does_not_fit_fails_its_task_and_the_next_task_runs():
    engine = TightEngine(fits=0)
    engine.release.set()
    device = DeviceQueue(lambda: engine, queue_size=16, max_batch_size=4)
    await asyncio.to_thread(device.start)
    try:
        with pytest.raises(InferenceError) as failed:
            await results(device.submit(ImagesJob(task_uuid="two", count=2)))
        # What was asked and that one image alone does not fit.
        assert "one image of test:big@1, even alone in its call" in str(failed.value)
        assert engine.calls == [["two", "two"], ["two"]]
        assert device.batch_limits == {"test:big@1": 1}
        # The worker lives on: the next task on another model runs.
        assert await results(device.submit(ImagesJob(task_uuid="next", model_air="test:small@1"))) == ["next"]
        assert device.ready
    finally:
        await asyncio.to_thread(device.stop, seconds(10))


async def test_a_capped_model_grows_back_after_a_wait_that_doubles_with_each_failure():
    engine = TightEngine(fits=2)
    engine.release.set()
    now = [1000.0]
    device = DeviceQueue(lambda: engine, queue_size=16, max_batch_size=4, clock=lambda: now[0])
    await asyncio.to_thread(device.start)
    try:
        assert await results(device.submit(ImagesJob(task_uuid="a", count=4))) == ["a"] * 4
        assert device.batch_limits == {"test:big@1": 2}
        # Before the wait is over the cap holds.
        now[0] += BATCH_REGROWTH_SECONDS - 1
        engine.calls.clear()
        assert await results(device.submit(ImagesJob(task_uuid="b", count=4))) == ["b"] * 4
        assert engine.calls == [["b", "b"], ["b", "b"]]
        # After it, four are tried again; still too many: halved again, and the next wait is twice as long.
        now[0] += 1
        engine.calls.clear()
        assert await results(device.submit(ImagesJob(task_uuid="c", count=4))) == ["c"] * 4
        assert engine.calls == [["c"] * 4, ["c", "c"], ["c", "c"]]
        assert device.batch_limits == {"test:big@1": 2}
        now[0] += BATCH_REGROWTH_SECONDS
        engine.calls.clear()
        assert await results(device.submit(ImagesJob(task_uuid="d", count=4))) == ["d"] * 4
        assert engine.calls == [["d", "d"], ["d", "d"]]
        # Memory came back (another model left the device): after the longer wait, one call of four again.
        engine.fits = 4
        now[0] += BATCH_REGROWTH_SECONDS
        engine.calls.clear()
        assert await results(device.submit(ImagesJob(task_uuid="e", count=4))) == ["e"] * 4
        assert engine.calls == [["e"] * 4]
        assert device.batch_limits == {}
    finally:
        await asyncio.to_thread(device.stop, seconds(10))
