"""The one stand-in for the diffusers engine: it holds each call until released, so that tests can
show queueing, batching, failures and pongs during inference deterministically."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from imagewire.tasks.jobs import Emit, GeneratedImage, InferenceJob, Step
from tests.timing import seconds


class HeldEngine:
    """Blocks each call until released; fails calls holding a job whose prompt says "explode"."""

    unavailable_samplers: Mapping[str, str] = {}

    def __init__(self, *, released: bool = False, step_first: bool = False) -> None:
        self.step_first = step_first  # report step 1 of 2 for each job before holding
        # Where each model is, as the device queue reads it: a test puts AIRs here to say they are loaded.
        self.loaded_models: dict[str, str] = {}
        self.release = threading.Event()
        if released:
            self.release.set()
        self.started = threading.Event()
        self.ran: list[str] = []
        self.calls: list[list[str]] = []  # the taskUUIDs of each run() call

    def load(self, model: object) -> None:
        pass

    def run(self, jobs: Sequence[InferenceJob], emit: Emit) -> None:
        if self.step_first:
            for index, job in enumerate(jobs):
                emit.progress(index, Step(tuple(range(len(job.seeds))), 1, 2))
        self.started.set()
        if not self.release.wait(seconds(120)):
            raise RuntimeError("the test never released the engine")
        self.calls.append([job.task_uuid for job in jobs])
        if any("explode" in job.prompt for job in jobs):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        for index, job in enumerate(jobs):
            if emit.cancelled(index):
                continue
            self.ran.append(job.task_uuid)
            emit(index, [GeneratedImage(i, seed, Image.new("RGB", (job.width, job.height)), 0.01)
                         for i, seed in enumerate(job.seeds)])

    def before_call(self) -> None:
        pass

    def recover(self) -> None:
        pass

    def device_memory(self) -> dict[str, int]:
        return {}


class Collect:
    """An ``Emit`` for tests that drive an engine directly: what each job got, by index."""

    def __init__(self, jobs: int, *, cancelled: set[int] | None = None) -> None:
        self.results: list[list[Any]] = [[] for _ in range(jobs)]
        self.calls: list[int] = []  # how many results each emit carried
        self.steps: list[list[Step]] = [[] for _ in range(jobs)]
        self.cancel = cancelled if cancelled is not None else set()

    def __call__(self, index: int, results: list[Any]) -> None:
        self.results[index].extend(results)
        self.calls.append(len(results))

    def progress(self, index: int, step: Step) -> None:
        self.steps[index].append(step)

    def cancelled(self, index: int) -> bool:
        return index in self.cancel
