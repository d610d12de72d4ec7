"""The GPU scheduler: one worker thread owns the device and runs jobs from a bounded queue.

The event loop never waits on the device. ``submit`` either queues a job at once or
refuses it (queue full → ``serviceUnavailable``); the worker hands results back through
``loop.call_soon_threadsafe`` onto the job's own asyncio queue, which ``JobHandle``
iterates. The engine behind the worker is a seam (``Engine``): the real one runs
diffusers pipelines (``server/engine.py``); tests of queueing and failure can pass a
small fake. This module imports no torch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from server.errors import InferenceError, ServiceUnavailable, TaskError

if TYPE_CHECKING:
    from PIL.Image import Image

    from air_registry.catalog import ModelEntry
    from air_registry.schedulers import SchedulerSpec

log = logging.getLogger("imagewire.scheduler")


@dataclass
class InferenceJob:
    """Everything the device needs for one task, fully validated."""

    task_uuid: str
    model: ModelEntry
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    cfg_scale: float
    scheduler: SchedulerSpec | None
    seeds: list[int]
    init_image: Image | None = None  # already resized to width × height
    strength: float = 0.8


@dataclass(frozen=True)
class GeneratedImage:
    index: int
    seed: int
    image: Image
    seconds: float  # device time spent on this image (its share of its batch), for includeCost


class Engine(Protocol):
    def load(self, model: ModelEntry) -> None: ...

    def run(self, job: InferenceJob, emit: Callable[[list[GeneratedImage]], None]) -> None: ...

    def recover(self) -> None:
        """Called after a job failed: free what the failure may have left behind."""


_DONE = object()


@dataclass
class JobHandle:
    """The event-loop side of a queued job: iterate it for chunks of images."""

    job: InferenceJob
    _loop: asyncio.AbstractEventLoop
    _results: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def queue_seconds(self) -> float:
        return (self.started_at or self.submitted_at) - self.submitted_at

    @property
    def compute_seconds(self) -> float:
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return self.finished_at - self.started_at

    def _post(self, item: Any) -> None:
        """Called from the worker thread."""
        self._loop.call_soon_threadsafe(self._results.put_nowait, item)

    async def __aiter__(self) -> AsyncIterator[list[GeneratedImage]]:
        while True:
            item = await self._results.get()
            if item is _DONE:
                return
            if isinstance(item, TaskError):
                raise item
            yield item


class Scheduler:
    def __init__(self, engine_factory: Callable[[], Engine], *, queue_size: int) -> None:
        self._engine_factory = engine_factory
        self._queue: queue.Queue[JobHandle | tuple[ModelEntry, threading.Event] | None] = queue.Queue(
            maxsize=queue_size)
        self._queue_size = queue_size
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    def start(self) -> None:
        """Start the worker and wait until its engine exists (imports done, device checked).

        Blocking: call it from a thread. Raises what building the engine raised.
        """
        self._accepting = True
        self._thread = threading.Thread(target=self._work, name="imagewire-device", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    def preload(self, model: ModelEntry) -> threading.Event:
        """Load a model in the worker before the first request needs it; the event is set when done."""
        done = threading.Event()
        self._queue.put((model, done))
        return done

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, job: InferenceJob) -> JobHandle:
        if not self._accepting:
            raise ServiceUnavailable("The server is shutting down and takes no new inference tasks.")
        handle = JobHandle(job, asyncio.get_running_loop())
        try:
            self._queue.put_nowait(handle)
        except queue.Full:
            raise ServiceUnavailable(
                f"The server is busy: {self._queue_size} inference tasks are already waiting. "
                "Retry in a moment.") from None
        return handle

    def close_intake(self) -> None:
        """Refuse new jobs from now on; queued and running ones go on."""
        self._accepting = False

    @property
    def busy(self) -> bool:
        """Whether the worker thread is still alive (after ``stop``: still inside a job)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, let the queued ones finish, then end the worker."""
        self._accepting = False
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------ worker thread

    def _work(self) -> None:
        try:
            engine = self._engine_factory()
        except BaseException as exc:
            self._start_error = exc
            return
        finally:
            self._ready.set()
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, JobHandle):
                self._run(engine, item)
            else:
                self._load(engine, *item)

    def _load(self, engine: Engine, model: ModelEntry, done: threading.Event) -> None:
        try:
            engine.load(model)
        except Exception:
            log.exception("preloading %s failed; requests for it will report why", model.air)
        finally:
            done.set()

    def _run(self, engine: Engine, handle: JobHandle) -> None:
        handle.started_at = time.perf_counter()
        try:
            engine.run(handle.job, handle._post)
        except TaskError as error:
            handle._post(error)
        except Exception as exc:  # the pipeline failed (out of memory, a bug in a model): only this task
            log.exception("taskUUID=%s inference failed", handle.job.task_uuid)
            handle._post(InferenceError(_describe_failure(exc)))
            try:
                engine.recover()
            except Exception:
                log.exception("recovering the engine failed")
        finally:
            handle.finished_at = time.perf_counter()
            handle._post(_DONE)


def _describe_failure(exc: BaseException) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name or "out of memory" in str(exc).lower():
        return ("The device ran out of memory for this task; try fewer numberResults or a smaller "
                "width and height. Other tasks are unaffected.")
    return f"Inference failed ({name}). Other tasks are unaffected; the server log has details."
