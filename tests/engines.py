"""Engines for tests: the stand-in for the diffusers engine (the shipped fake engine, ``--engine fake``, held at
each call until released, so that tests can show queueing, batching, failures and pongs during inference
deterministically), and the real diffusers engine on CPU over the session's tiny models."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagewire.server.fake_engine import FakeEngine
from imagewire.tasks.jobs import Emit, Job, Step
from tests.timing import seconds

if TYPE_CHECKING:
    from imagewire.server.engine import DiffusersEngine


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


def data_dir_with_models(data: Path, models_dir: Path) -> Path:
    """``data`` made a data dir whose ``models`` folder is the session's built models (``models_dir`` of
    tests/conftest.py), so that an engine finds them where the catalog expects them and nothing is built again."""
    data.mkdir(parents=True, exist_ok=True)
    (data / "models").symlink_to(models_dir, target_is_directory=True)
    return data


def diffusers_engine(data_dir: Path, **settings: Any) -> DiffusersEngine:
    """The diffusers engine over ``data_dir``: on CPU, never downloading, four images a call, unless ``settings`` say
    otherwise."""
    # Imported here: the tests that hold a fake engine need not load diffusers.
    from imagewire.server.engine import DiffusersEngine

    return DiffusersEngine(**{"device": "cpu", "data_dir": data_dir, "allow_downloads": False, "max_batch_size": 4,
                              **settings})
