"""The tests' stand-in for the diffusers engine: the shipped fake engine (``--engine fake``), held at each
call until released, so that tests can show queueing, batching, failures and pongs during inference
deterministically."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from imagewire.server.fake_engine import FakeEngine
from imagewire.tasks.jobs import Emit, Job, Step
from tests.timing import seconds


class HeldEngine(FakeEngine):
    """Blocks each call until released, then answers as the fake engine does; fails calls holding a job whose
    prompt says "explode"."""

    def __init__(self, *, released: bool = False, step_first: bool = False) -> None:
        super().__init__()
        self.step_first = step_first  # report step 1 of 2 for each job before holding
        self.release = threading.Event()
        if released:
            self.release.set()
        self.started = threading.Event()
        self.ran: list[str] = []
        self.calls: list[list[str]] = []  # the taskUUIDs of each run() call

    def mark_loaded(self, airs: Sequence[str]) -> None:
        # A test says which models are loaded by writing loaded_models itself; loading and running change nothing.
        pass

    def run(self, jobs: Sequence[Job], emit: Emit) -> None:
        if self.step_first:
            for index, job in enumerate(jobs):
                emit.progress(index, Step(tuple(range(job.images)), 1, 2))
        self.started.set()
        if not self.release.wait(seconds(120)):
            raise RuntimeError("the test never released the engine")
        self.calls.append([job.task_uuid for job in jobs])
        if any("explode" in getattr(job, "prompt", "") for job in jobs):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        self.ran += [job.task_uuid for index, job in enumerate(jobs) if not emit.cancelled(index)]
        super().run(jobs, emit)


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
