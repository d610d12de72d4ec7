"""The device queue: one worker thread owns the device and runs jobs from a bounded queue.

The event loop never waits on the device. ``submit`` either queues a job at once or
refuses it (queue full → ``serviceUnavailable``); the worker hands results back through
``loop.call_soon_threadsafe`` onto the job's own asyncio queue, which ``JobHandle``
iterates. The engine behind the worker is a seam (``Engine``): the real one runs
diffusers pipelines (``server/engine``); tests of queueing and failure pass a
small fake (``tests/engines.py``). This module imports no torch.

Jobs that wait together and share a ``batch_key`` (they differ only in prompts, seeds and
seed images) share one pipeline call, up to ``max_batch_size`` images: a device computes a
batch faster than the same images one by one, and no job waits for others to arrive,
because only jobs already queued are taken.

Loading a model costs far more than a call, so when the job at the head of the line needs a model
that is not on the device, the worker takes the first waiting job whose models are there instead,
but passes over no job more than ``max_passed_over`` times: a job waits at most that many jobs
longer than its turn.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from imagewire.tasks.errors import InferenceError, ServiceUnavailable, TaskError
from imagewire.tasks.jobs import Emit, Job

if TYPE_CHECKING:
    from imagewire.air_registry import ModelEntry

log = logging.getLogger("imagewire.scheduler")


class Engine(Protocol):
    @property
    def unavailable_samplers(self) -> Mapping[str, str]:
        """Sampler names this engine cannot run, each with why; the task layer refuses them before queueing."""

    @property
    def loaded_models(self) -> Mapping[str, str]:
        """Where each model in memory is, by AIR: ``"device"`` (ready to run) or ``"ram"`` (host memory)."""

    def load(self, model: ModelEntry) -> None: ...

    def run(self, jobs: Sequence[Job], emit: Emit) -> None:
        """Run jobs of one type and ``batch_key``; several are given only when their images fit one call."""

    def recover(self) -> None:
        """Called after a job failed: free what the failure may have left behind."""


_DONE = object()


@dataclass(eq=False)  # a handle is itself: the queue finds and removes handles by identity
class JobHandle:
    """The event-loop side of a queued job: iterate it for chunks of results."""

    job: Job
    _loop: asyncio.AbstractEventLoop
    _results: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None
    passed_over: int = 0  # times a later job went first because its model was loaded

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

    async def __aiter__(self) -> AsyncIterator[list[Any]]:
        while True:
            item = await self._results.get()
            if item is _DONE:
                return
            if isinstance(item, TaskError):
                raise item
            yield item


class DeviceQueue:
    def __init__(self, engine_factory: Callable[[], Engine], *, queue_size: int, max_batch_size: int,
                 max_passed_over: int = 0) -> None:
        self._engine_factory = engine_factory
        self._queue = _WorkQueue(queue_size)
        self._queue_size = queue_size
        self._max_batch_size = max_batch_size
        self._max_passed_over = max_passed_over
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.unavailable_samplers: Mapping[str, str] = {}
        # What the worker last saw in the engine's memory, for modelSearch: replaced whole, never changed in place.
        self.loaded_models: Mapping[str, str] = {}

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
        self._queue.put_control((model, done))
        return done

    @property
    def pending(self) -> int:
        return self._queue.jobs

    def submit(self, job: Job) -> JobHandle:
        if not self._accepting:
            raise ServiceUnavailable("The server is shutting down and takes no new inference tasks.")
        handle = JobHandle(job, asyncio.get_running_loop())
        if not self._queue.put_job(handle):
            raise ServiceUnavailable(
                f"The server is busy: {self._queue_size} inference tasks are already waiting. "
                "Retry in a moment.")
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
        self._queue.put_control(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------ worker thread

    def _work(self) -> None:
        try:
            engine = self._engine_factory()
            self.unavailable_samplers = dict(engine.unavailable_samplers)
        except BaseException as exc:
            self._start_error = exc
            return
        finally:
            self._ready.set()
        self._publish(engine)
        while True:
            # Only this thread changes what the engine holds, so what it holds now holds until the next job.
            item = self._queue.get(functools.partial(_on_device, dict(engine.loaded_models)), self._max_passed_over)
            if item is None:
                return
            if isinstance(item, JobHandle):
                group = [item, *self._queue.take_joining(item, self._max_batch_size)]
                self._run(engine, group)
            else:
                self._load(engine, *item)
            self._publish(engine)

    def _publish(self, engine: Engine) -> None:
        try:
            self.loaded_models = dict(engine.loaded_models)
        except Exception:
            log.exception("reading which models are loaded failed")

    def _load(self, engine: Engine, model: ModelEntry, done: threading.Event) -> None:
        try:
            engine.load(model)
        except Exception:
            log.exception("preloading %s failed; requests for it will report why", model.air)
        finally:
            done.set()

    def _run(self, engine: Engine, handles: list[JobHandle]) -> None:
        if len(handles) > 1:
            image_count = sum(handle.job.images for handle in handles)
            log.info("%d tasks (%d images) share a pipeline call: %s", len(handles), image_count,
                     " ".join(f"taskUUID={handle.job.task_uuid}" for handle in handles))
        started = time.perf_counter()
        for handle in handles:
            handle.started_at = started
            log.debug("taskUUID=%s on the device", handle.job.task_uuid)
        answered: set[int] = set()

        def emit(index: int, results: list[Any]) -> None:
            answered.add(index)
            # Published before the results go out, so that a client that has them sees their model loaded.
            self._publish(engine)
            handles[index]._post(results)

        try:
            engine.run([handle.job for handle in handles], emit)
        except Exception as exc:
            if len(handles) == 1:
                self._fail(engine, handles[0], exc)
            else:
                # Whatever failed (one job's input, memory for the larger batch), each job still
                # waiting gets its own answer: run those one by one.
                log.warning("a shared pipeline call failed (%s); running its tasks one by one", type(exc).__name__)
                self._recover(engine)
                for index, handle in enumerate(handles):
                    if index not in answered:
                        self._run(engine, [handle])
                handles = [handle for index, handle in enumerate(handles) if index in answered]
        finished = time.perf_counter()
        for handle in handles:
            handle.finished_at = finished
            handle._post(_DONE)

    def _fail(self, engine: Engine, handle: JobHandle, exc: Exception) -> None:
        if isinstance(exc, TaskError):
            handle._post(exc)
            return
        # The pipeline failed (out of memory, a bug in a model): only this task.
        log.error("taskUUID=%s inference failed", handle.job.task_uuid, exc_info=exc)
        handle._post(InferenceError(_describe_failure(exc)))
        self._recover(engine)

    @staticmethod
    def _recover(engine: Engine) -> None:
        try:
            engine.recover()
        except Exception:
            log.exception("recovering the engine failed")


class _WorkQueue:
    """FIFO of jobs (bounded) and control items (preloads, the stop sentinel; never refused).

    Unlike ``queue.Queue`` it lets the worker take the waiting jobs that can join the one it
    is about to run, wherever they are in the line.
    """

    def __init__(self, max_jobs: int) -> None:
        self._items: deque[Any] = deque()
        self._jobs = 0
        self._max_jobs = max_jobs
        self._changed = threading.Condition()

    @property
    def jobs(self) -> int:
        return self._jobs

    def put_job(self, handle: JobHandle) -> bool:
        """Queue a job; False when ``max_jobs`` are already waiting."""
        with self._changed:
            if self._jobs >= self._max_jobs:
                return False
            self._items.append(handle)
            self._jobs += 1
            self._changed.notify()
            return True

    def put_control(self, item: Any) -> None:
        with self._changed:
            self._items.append(item)
            self._changed.notify()

    def get(self, ready: Callable[[Job], bool] | None = None, max_passed_over: int = 0) -> Any:
        """The next item: the first in line, or the first job that is ``ready`` when the first is not, as long
        as no job ahead of it has been passed over ``max_passed_over`` times already. Control items are
        never jumped."""
        with self._changed:
            while not self._items:
                self._changed.wait()
            chosen = 0
            if ready is not None and max_passed_over > 0:
                for index, item in enumerate(self._items):
                    if not isinstance(item, JobHandle) or ready(item.job):
                        chosen = index if isinstance(item, JobHandle) else 0
                        break
                    if item.passed_over >= max_passed_over:
                        break  # it has waited long enough: nobody goes before it
            for skipped in itertools.islice(self._items, chosen):
                skipped.passed_over += 1
            item = self._items[chosen]
            del self._items[chosen]
            if isinstance(item, JobHandle):
                self._jobs -= 1
                if chosen:
                    log.debug("taskUUID=%s goes first: its model is loaded", item.job.task_uuid)
            return item

    def take_joining(self, first: JobHandle, max_images: int) -> list[JobHandle]:
        """Remove and return waiting jobs of ``first``'s type and batch key, in queue order, while the
        images of all of them and ``first`` stay within ``max_images``."""
        kind, key, images = type(first.job), first.job.batch_key(), first.job.images
        taken: list[JobHandle] = []
        with self._changed:
            for item in list(self._items):
                if images >= max_images:
                    break
                if (isinstance(item, JobHandle) and images + item.job.images <= max_images
                        and type(item.job) is kind and item.job.batch_key() == key):
                    self._items.remove(item)
                    self._jobs -= 1
                    taken.append(item)
                    images += item.job.images
        return taken


def _on_device(loaded: Mapping[str, str], job: Job) -> bool:
    return all(loaded.get(air) == "device" for air in job.models)


def _describe_failure(exc: BaseException) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name or "out of memory" in str(exc).lower():
        return ("The device ran out of memory for this task; try fewer numberResults or a smaller "
                "width and height. Other tasks are unaffected.")
    return f"Inference failed ({name}). Other tasks are unaffected; the server log has details."
