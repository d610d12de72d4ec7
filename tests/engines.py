"""The one stand-in for the diffusers engine: it holds each call until released, so that tests can
show queueing, batching, failures and pongs during inference deterministically."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from PIL import Image

from imagewire.tasks.jobs import Emit, GeneratedImage, InferenceJob
from tests.timing import seconds


class HeldEngine:
    """Blocks each call until released; fails calls holding a job whose prompt says "explode"."""

    unavailable_samplers: Mapping[str, str] = {}

    def __init__(self, *, released: bool = False) -> None:
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
        self.started.set()
        if not self.release.wait(seconds(120)):
            raise RuntimeError("the test never released the engine")
        self.calls.append([job.task_uuid for job in jobs])
        if any("explode" in job.prompt for job in jobs):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        for index, job in enumerate(jobs):
            self.ran.append(job.task_uuid)
            emit(index, [GeneratedImage(i, seed, Image.new("RGB", (job.width, job.height)), 0.01)
                         for i, seed in enumerate(job.seeds)])

    def recover(self) -> None:
        pass
