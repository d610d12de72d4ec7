"""The device queue: one worker thread owns the device and runs jobs from a bounded queue.

The event loop never waits on the device. ``submit`` either queues a job at once or refuses it
(queue full → ``serviceUnavailable``); the worker hands the job's events (``tasks/jobs.py``: ``Queued``,
``Step``, ``Results``, then ``Finished`` or ``Failed``) back through ``loop.call_soon_threadsafe`` to its
``JobHandle``. Above it is the device seam: the task side's ``Device`` and the server's ``DeviceService``,
which ``server/cluster.py``'s ``RayDevice`` implements too. Below it is the engine seam (``Engine``): the
real one runs diffusers pipelines (``server/engine``); tests of queueing and failure pass a small fake.
This module imports no torch.

Fairness: the device takes jobs round-robin across API keys, so one key's backlog delays another
key's job by about one call. Batching: jobs that wait together and share a type and a
``batch_key`` (they differ only in prompts, seeds and seed images) share one call, up to
``max_batch_size`` images, whoever sent them: a device computes a batch faster than the same images
one by one, and no job waits for others to arrive, because only jobs already queued are taken.

Loaded models first: loading a model costs far more than a call, so the worker walks the waiting jobs
in turn order (each key's oldest job, then each key's second, …) and takes the first whose models are on
the device. Each job walked past counts as passed over once, and a job passed over ``max_passed_over``
times ends the walk: it, or a job ahead of it, goes next. So a job waits at most that many jobs longer
than its turn, and a key whose job was passed over keeps its turn (the key that went first goes to the
end of the turn order, as after any job). With ``max_passed_over`` 0 the turn order is strict.

Out of memory: a call that runs out of device memory fails no worker. Its tasks run again in calls of half
as many images (and that model's calls stay at most that large: ``batch_limits``), until one image alone does
not fit, which fails that task with an error saying so. What ran out may not last (another model was loaded
beside it, a neighbour held memory), so a capped model's calls grow back, one doubling at a time:
``BATCH_REGROWTH_SECONDS`` after the cap, and as long again after each doubling. Each new out-of-memory error of
that model halves again and doubles the wait, so a model that truly does not fit stops trying before long.

A job can be cancelled: a waiting one leaves the queue, a running one is marked, and the engine's
runner stops a call at its next step once every job in it is cancelled (its batch-mates carry on).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from imagewire.tasks.errors import InferenceError, ServiceUnavailable, TaskError
from imagewire.tasks.jobs import (
    Device,
    DeviceEvent,
    Emit,
    Failed,
    Finished,
    Job,
    JobEvent,
    ModelPlacement,
    Queued,
    Results,
    Step,
)

if TYPE_CHECKING:
    from imagewire.air_registry import ModelEntry

log = logging.getLogger("imagewire.device")


class Engine(Protocol):
    """What runs jobs on one device: the seam below the device queue. The diffusers engine (``server/engine``) is
    one; tests pass small fakes. The device queue builds the engine in its one worker thread and calls every
    member there, one at a time, but ``device_memory``."""

    @property
    def unavailable_samplers(self) -> Mapping[str, str]:
        """Sampler names this engine cannot run, each with why; read once, after it is built. The task layer
        refuses them before queueing."""

    @property
    def loaded_models(self) -> Mapping[str, str]:
        """Where each model in memory is, by AIR: ``"device"`` (ready to run) or ``"ram"`` (host memory). Read
        after each job and load; the device queue prefers jobs whose models are all on the device. An engine may
        also have ``memory_plans`` (AIR → ``ModelPlacement``), read at the same times."""

    def load(self, model: ModelEntry) -> None:
        """Bring ``model`` onto the device before a job needs it (``--preload``, the default model). A failure is
        logged and left for the first job that needs the model to report."""

    def run(self, jobs: Sequence[Job], emit: Emit) -> None:
        """Run jobs of one type and ``batch_key``; several are given only when their images fit one call.

        Each job's results go to ``emit(index, results)`` as they are made, its steps to ``emit.progress``.
        A job ``emit.cancelled`` wants no more results; once every job is, the runner raises ``Cancelled``.
        Any other exception fails the call. The jobs of a failed shared call that had no results yet run again
        one by one; a lone job's answer is the exception if it is a TaskError, else an ``inferenceError``."""

    def before_call(self) -> None:
        """Called before each ``run`` (a CPU engine sets its thread count here)."""

    def recover(self) -> None:
        """Called after a job failed: free what the failure may have left behind."""

    def device_memory(self) -> Mapping[str, int]:
        """Bytes held on the device by kind; empty where there is nothing to say (a CPU). Read from the event
        loop (metrics), so it must not wait for a call to end."""
        ...


class DeviceService(Device, Protocol):
    """A device as the server runs it: the task side's ``Device`` (submit, and what tasks read), plus its
    lifecycle and hooks. The ``DeviceQueue`` of this process (``--engine local``) and ``server/cluster.py``'s
    ``RayDevice`` in front of Ray Serve replicas, each running a ``DeviceQueue`` (``--engine ray``), implement it;
    ``tests/server/test_device_contract.py`` holds both to one behaviour."""

    # Hooks the server sets: after each call (metrics) and each API key's share of device time (its budget).
    on_call: Callable[[int, float, float], None] | None
    on_use: Callable[[str, float], None] | None

    @property
    def pending(self) -> int:
        """Jobs waiting for a device."""
        ...

    @property
    def ready(self) -> bool:
        """Taking jobs, with a live worker behind."""
        ...

    @property
    def busy(self) -> bool:
        """Whether work of this process is still on a device (after ``stop``: a job it could not finish)."""
        ...

    def start(self) -> None:
        """Blocking (call it from a thread): ready to take jobs when it returns; raises why not."""

    def preload(self, model: ModelEntry) -> Future[None]:
        """Have ``model`` on the device before the first request needs it; the future is done when it is, and
        holds why it could not be."""
        ...

    def device_memory(self) -> Mapping[str, int]:
        """Bytes held on the device(s) by kind (``Engine.device_memory``, summed over replicas)."""
        ...

    def close_intake(self) -> None:
        """Refuse new jobs from now on (``serviceUnavailable``); queued and running ones go on."""

    def stop(self, timeout: float | None = None) -> None:
        """Blocking: let queued jobs finish (for up to ``timeout`` seconds), then let go of the device."""


class Cancelled(Exception):
    """Raised by a runner when every job of its call was cancelled: the call stops, nobody is answered."""


class JobStream:
    """What the handles of both devices share (``RunningJob``): a job's events in the order they happened, from
    ``Queued`` to the first ``Finished`` or ``Failed``, handed over on the event loop (``_deliver``).

    ``on_event`` hears of ``Queued`` and ``Step`` as they come, whether or not anyone iterates; ``events``
    yields all of them, to pass on (a replica streams them to its gateway); iterating the handle yields the
    chunks of results. Nothing is delivered after the end, nor after ``cancel``.
    """

    job: Job
    on_event: Callable[[JobEvent], None] | None
    _events: asyncio.Queue[DeviceEvent]
    _ended = False

    @property
    def queue_seconds(self) -> float:
        raise NotImplementedError

    @property
    def compute_seconds(self) -> float:
        raise NotImplementedError

    @property
    def device_seconds(self) -> float:
        """Its share of the device time of the calls it was in."""
        raise NotImplementedError

    def finished(self) -> Finished:
        """The end of the job as it stands now."""
        return Finished(self.queue_seconds, self.compute_seconds, self.device_seconds)

    def _deliver(self, event: DeviceEvent) -> None:
        """On the event loop."""
        if self._ended:
            return
        if isinstance(event, (Finished, Failed)):
            self._ended = True
        elif isinstance(event, (Queued, Step)) and self.on_event is not None:
            self.on_event(event)
        self._events.put_nowait(event)

    async def events(self) -> AsyncIterator[DeviceEvent]:
        """Every event of the job, in order; the last is a ``Finished`` or a ``Failed``."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    async def batches(self, step_interval: float = 0.0, *, steps: bool = True) -> AsyncIterator[list[DeviceEvent]]:
        """The events of ``events``, in lists of those that had come by the time the last was taken, and of the
        steps no more than one per ``step_interval`` seconds, or none without ``steps`` (a replica streams these:
        each list is one message to its gateway, and a fast call's steps need not cross one by one)."""
        last_step = -step_interval
        while True:
            batch = [await self._events.get()]
            while not self._events.empty():
                batch.append(self._events.get_nowait())
            now = time.monotonic()
            kept = []
            for event in batch:
                if isinstance(event, Step):
                    if not steps or now - last_step < step_interval:
                        continue
                    last_step = now
                kept.append(event)
            if kept:
                yield kept
            if isinstance(batch[-1], (Finished, Failed)):
                return

    async def _chunks(self) -> AsyncIterator[list[Any]]:
        async for event in self.events():
            if isinstance(event, Results):
                yield event.chunk
            elif isinstance(event, Failed):
                raise event.error

    def __aiter__(self) -> AsyncIterator[list[Any]]:
        return self._chunks()


@dataclass(eq=False)  # a handle is itself: the queue finds and removes handles by identity
class JobHandle(JobStream):
    """The event-loop side of a job in this process's device queue: iterate it for chunks of results."""

    job: Job
    _loop: asyncio.AbstractEventLoop
    on_event: Callable[[JobEvent], None] | None = None  # queue positions and steps, on the event loop
    _events: asyncio.Queue[DeviceEvent] = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False      # read by the worker thread between steps
    passed_over: int = 0         # times a job behind it in turn order went first because its model was loaded
    device_seconds: float = 0.0  # its share of the device time of the calls it was in (split by images)
    _queue: WorkQueue[Any] | None = None

    @property
    def queue_seconds(self) -> float:
        return (self.started_at or self.submitted_at) - self.submitted_at

    @property
    def compute_seconds(self) -> float:
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return self.finished_at - self.started_at

    def cancel(self) -> None:
        if self._ended or self.cancelled:
            return
        self.cancelled = True
        if self._queue is not None and self._queue.remove(self):
            log.info("taskUUID=%s left the queue (cancelled)", self.job.task_uuid)
        self._deliver(self.finished())

    def _post(self, event: DeviceEvent) -> None:
        """Called from the worker thread."""
        self._loop.call_soon_threadsafe(self._deliver, event)


class _Outlet:
    """What a runner emits to, for the handles of one group of jobs. ``max_images``: the most images one
    call of theirs may make (lowered for a model after it ran out of memory)."""

    def __init__(self, handles: list[JobHandle], before_results: Callable[[], None] | None = None,
                 max_images: int | None = None) -> None:
        self.handles = handles
        self.max_images = max_images
        self.answered: set[int] = set()
        self.before_results = before_results

    def __call__(self, index: int, results: list[Any]) -> None:
        if not self.handles[index].cancelled:
            self.answered.add(index)
            if self.before_results is not None:
                self.before_results()
            self.handles[index]._post(Results(results))

    def progress(self, index: int, step: Step) -> None:
        self.handles[index]._post(step)

    def cancelled(self, index: int) -> bool:
        return self.handles[index].cancelled


# How long a model's calls stay capped after running out of memory before they may make twice as many images;
# doubled with each out-of-memory error of that model, up to BATCH_REGROWTH_MAX_SECONDS.
BATCH_REGROWTH_SECONDS = 600.0
BATCH_REGROWTH_MAX_SECONDS = 24 * 3600.0


class DeviceQueue:
    def __init__(self, engine_factory: Callable[[], Engine], *, queue_size: int, max_batch_size: int,
                 max_passed_over: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self._engine_factory = engine_factory
        self._queue: WorkQueue[JobHandle] = WorkQueue(queue_size)
        self._queue_size = queue_size
        self._max_batch_size = max_batch_size
        self._max_passed_over = max_passed_over
        # Images per call by model, for models whose larger calls ran out of device memory; written and read
        # by the worker, read by tests.
        self.batch_limits: dict[str, int] = {}
        # By model: when its cap may next double, and the wait after that (read and written by the worker).
        self._regrowth: dict[str, tuple[float, float]] = {}
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.unavailable_samplers: Mapping[str, str] = {}
        self._engine: Engine | None = None
        # on_call(results, started, ended): after each call, from the worker thread (metrics).
        self.on_call: Callable[[int, float, float], None] | None = None
        # on_use(owner, seconds): each API key's share of a call's device time (split by images).
        self.on_use: Callable[[str, float], None] | None = None
        # What the worker last saw in the engine's memory (modelSearch, metrics): replaced whole, never
        # changed in place, so the event loop reads a consistent snapshot.
        self.loaded_models: Mapping[str, str] = {}
        self.memory_plans: Mapping[str, ModelPlacement] = {}

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

    def preload(self, model: ModelEntry) -> Future[None]:
        """Load a model in the worker before the first request needs it; the future holds why it could not be."""
        done: Future[None] = Future()
        self._queue.put_control((model, done))
        return done

    @property
    def pending(self) -> int:
        return self._queue.jobs

    @property
    def ready(self) -> bool:
        """Taking jobs, with a live worker."""
        return self._accepting and self.busy

    def device_memory(self) -> Mapping[str, int]:
        return self._engine.device_memory() if self._engine is not None else {}

    def submit(self, job: Job, on_event: Callable[[JobEvent], None] | None = None) -> JobHandle:
        if not self._accepting:
            raise ServiceUnavailable("The server is shutting down and takes no new inference tasks.")
        handle = JobHandle(job, asyncio.get_running_loop(), on_event=on_event)
        position = self._queue.put_job(handle)
        if position is None:
            raise ServiceUnavailable(
                f"The server is busy: {self._queue_size} inference tasks are already waiting. "
                "Retry in a moment.")
        handle._deliver(Queued(position))
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
            engine = self._engine = self._engine_factory()
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
                group = [item, *self._queue.take_joining(item, self._limit(item.job))]
                self._queue.announce_positions()
                self._run(engine, group)
            else:
                self._load(engine, *item)
                continue  # published before its future is done
            self._publish(engine)

    def _publish(self, engine: Engine) -> None:
        try:
            self.loaded_models = dict(engine.loaded_models)
            self.memory_plans = dict(getattr(engine, "memory_plans", {}))
        except Exception:
            log.exception("reading which models are loaded failed")

    def _load(self, engine: Engine, model: ModelEntry, done: Future[None]) -> None:
        """Load ``model``; what the engine holds is published before the future is done, so that whoever waits
        on it finds the model in ``loaded_models``."""
        try:
            engine.load(model)
        except Exception as exc:
            # The caller decides what a failed preload means (the server's start stops, or goes on without it).
            log.debug("preloading %s failed", model.air, exc_info=exc)
            self._publish(engine)
            done.set_exception(exc)
        else:
            self._publish(engine)
            done.set_result(None)

    def _run(self, engine: Engine, handles: list[JobHandle]) -> None:
        if len(handles) > 1:
            image_count = sum(handle.job.images for handle in handles)
            log.info("%d tasks (%d images) share a pipeline call: %s", len(handles), image_count,
                     " ".join(f"taskUUID={handle.job.task_uuid}" for handle in handles))
        started = time.perf_counter()
        for handle in handles:
            handle.started_at = started
            log.debug("taskUUID=%s on the device", handle.job.task_uuid)
        self._regrow(_model_of(handles[0].job))
        # Published before the results go out, so that a client that has them sees their model loaded.
        emit = _Outlet(handles, before_results=lambda: self._publish(engine), max_images=self._limit(handles[0].job))
        answered, called = emit.answered, handles
        try:
            self._call(engine, handles, emit)
        except Cancelled as stopped:
            # Every job of the call was cancelled and has been answered so.
            log.info("%s: cancelled, %s", " ".join(f"taskUUID={handle.job.task_uuid}" for handle in handles), stopped)
        except Exception as exc:
            if _out_of_memory(exc):
                handles = self._after_out_of_memory(engine, handles, answered, exc)
            elif len(handles) == 1:
                self._fail(engine, handles[0], exc)
            else:
                # Whatever failed (one job's input, memory for the larger batch), each job still
                # waiting gets its own answer: run those one by one.
                log.warning("a shared pipeline call failed (%s); running its tasks one by one", type(exc).__name__)
                self._recover(engine)
                for index, handle in enumerate(handles):
                    if index not in answered and not handle.cancelled:
                        self._run(engine, [handle])
                handles = [handle for index, handle in enumerate(handles) if index in answered]
        finished = time.perf_counter()
        for handle in handles:
            handle.finished_at = finished
            handle._post(handle.finished())
        if self.on_call is not None and answered:
            self.on_call(sum(called[index].job.images for index in answered), started, finished)

    def _limit(self, job: Job) -> int:
        """The most images one call of ``job``'s model may make."""
        return min(self._max_batch_size, self.batch_limits.get(_model_of(job), self._max_batch_size))

    def _regrow(self, model: str) -> None:
        """Before a call: double ``model``'s cap if its wait is over (``BATCH_REGROWTH_SECONDS``)."""
        limit = self.batch_limits.get(model)
        if limit is None:
            return
        due, wait = self._regrowth[model]
        now = self._clock()
        if now < due:
            return
        limit = min(self._max_batch_size, limit * 2)
        self._regrowth[model] = (now + wait, wait)
        if limit >= self._max_batch_size:
            del self.batch_limits[model]
        else:
            self.batch_limits[model] = limit
        log.info("%s: its calls may make %d images again, %.0f s after its last cap", model, limit, wait)

    def _after_out_of_memory(self, engine: Engine, handles: list[JobHandle], answered: set[int],
                             exc: Exception) -> list[JobHandle]:
        """A call of ``handles`` ran out of device memory: give back what it held, halve its model's calls and run
        the jobs not yet answered again in calls that size; at one image, fail them. Returns the handles this call
        still has to finish (the others are run again, or failed)."""
        job = handles[0].job
        model = _model_of(job)
        tried = min(sum(handle.job.images for handle in handles), self._limit(job))
        # The traceback's frames hold the call's tensors: let go of them before memory is given back.
        traceback.clear_frames(exc.__traceback__)
        self._recover(engine)
        waiting = [handle for index, handle in enumerate(handles) if index not in answered and not handle.cancelled]
        if tried > 1:
            limit = self.batch_limits[model] = max(1, tried // 2)
            self._capped(model)
            log.warning("out of device memory making %d images of %s in one call (%s); its calls now make at most %d",
                        tried, model, type(exc).__name__, limit)
            for group in _groups(waiting, limit):
                self._run(engine, group)
        else:
            self.batch_limits[model] = 1
            self._capped(model)
            log.error("out of device memory for %s even at one image per call (%s)", model, type(exc).__name__)
            for handle in waiting:
                handle._post(Failed(InferenceError(_out_of_memory_message(handle.job))))
        if len(handles) == 1 and 0 in answered:
            # A lone job with some of its images made: the others did not fit, and are not made twice.
            handles[0]._post(Failed(InferenceError(
                f"The device ran out of memory after some of this task's images; {_out_of_memory_message(job)}")))
            return []
        return [handle for index, handle in enumerate(handles) if index in answered]

    def _capped(self, model: str) -> None:
        """``model``'s calls were just capped: the first regrowth after a wait twice the last one's."""
        last = self._regrowth.get(model, (0.0, BATCH_REGROWTH_SECONDS / 2))[1]
        wait = min(BATCH_REGROWTH_MAX_SECONDS, last * 2)
        self._regrowth[model] = (self._clock() + wait, wait)

    def _call(self, engine: Engine, handles: list[JobHandle], emit: _Outlet) -> None:
        """One engine call; its device time is charged to the jobs' owners however it ends (each
        pays in proportion to the images its job asked for)."""
        engine.before_call()
        started = time.perf_counter()
        try:
            engine.run([handle.job for handle in handles], emit)
        finally:
            seconds = time.perf_counter() - started
            images = sum(max(1, handle.job.images) for handle in handles)
            for handle in handles:
                share = seconds * max(1, handle.job.images) / images
                handle.device_seconds += share
                if self.on_use is not None:
                    self.on_use(handle.job.owner, share)

    def _fail(self, engine: Engine, handle: JobHandle, exc: Exception) -> None:
        if isinstance(exc, TaskError):
            handle._post(Failed(exc))
            return
        # The pipeline failed (out of memory, a bug in a model): only this task.
        log.error("taskUUID=%s inference failed", handle.job.task_uuid, exc_info=exc)
        handle._post(Failed(InferenceError(_describe_failure(exc))))
        self._recover(engine)

    @staticmethod
    def _recover(engine: Engine) -> None:
        try:
            engine.recover()
        except Exception:
            log.exception("recovering the engine failed")


class Waiting(Protocol):
    """What waits in a ``WorkQueue``: a job's handle, here (``JobHandle``) or at a cluster's gateway
    (``server/cluster.py`` ``RemoteJob``)."""

    job: Job
    passed_over: int  # times a job behind it in turn order went first because its model was loaded
    _queue: WorkQueue[Any] | None

    def _post(self, event: DeviceEvent) -> None: ...


W = TypeVar("W", bound=Waiting)


class WorkQueue(Generic[W]):
    """Waiting jobs (bounded), one line per API key taken in turn, and control items (preloads, the
    stop sentinel; never refused).

    Unlike ``queue.Queue`` it lets the worker take the waiting jobs that can join the one it is about
    to run, wherever they are, and lets a cancelled job leave. Control items come before jobs, except
    the stop sentinel, which waits until no job is left. A cluster's gateway keeps its own jobs in one
    too, and takes them without blocking (``take``) whenever a replica has room.
    """

    def __init__(self, max_jobs: int) -> None:
        self._lines: dict[str, deque[W]] = {}  # owner → its jobs, oldest first; in turn order
        self._controls: deque[Any] = deque()
        self._jobs = 0
        self._max_jobs = max_jobs
        self._changed = threading.Condition()

    @property
    def jobs(self) -> int:
        return self._jobs

    def put_job(self, handle: W) -> int | None:
        """Queue a job and return how many jobs will run before it; None when ``max_jobs`` already wait."""
        with self._changed:
            if self._jobs >= self._max_jobs:
                return None
            self._lines.setdefault(handle.job.owner, deque()).append(handle)
            handle._queue = self
            self._jobs += 1
            self._changed.notify()
            return self._position(handle)

    def put_control(self, item: Any) -> None:
        with self._changed:
            self._controls.append(item)
            self._changed.notify()

    def get(self, ready: Callable[[Job], bool] | None = None, max_passed_over: int = 0) -> Any:
        """The next item: a control item, else the first job in turn order, or the first one after it that
        is ``ready`` when it is not, as long as no job ahead of that one has been passed over
        ``max_passed_over`` times already."""
        with self._changed:
            while True:
                if self._controls and (self._controls[0] is not None or not self._jobs):
                    return self._controls.popleft()
                if self._jobs:
                    return self._take_next(ready, max_passed_over)
                self._changed.wait()

    def take(self, ready: Callable[[Job], bool] | None = None, max_passed_over: int = 0,
             held: Collection[str] = ()) -> W | None:
        """``get``'s choice of job, without waiting, among the jobs of owners not in ``held``: None when none
        waits."""
        with self._changed:
            if not any(owner not in held for owner in self._lines):
                return None
            return self._take_next(ready, max_passed_over, held)

    def _take_next(self, ready: Callable[[Job], bool] | None, max_passed_over: int,
                   held: Collection[str] = ()) -> W:
        order = [handle for handle in self._in_turn_order() if handle.job.owner not in held]
        chosen = 0
        if ready is not None and max_passed_over > 0:
            for index, handle in enumerate(order):
                if ready(handle.job):
                    chosen = index
                    break
                if handle.passed_over >= max_passed_over:
                    break  # it has waited long enough: nobody behind it goes first
        for skipped in order[:chosen]:
            skipped.passed_over += 1
        handle = order[chosen]
        owner = handle.job.owner
        line = self._lines[owner]
        line.remove(handle)
        # Its owner goes to the end of the turn order (and leaves it when it has nothing waiting); owners
        # passed over keep their places.
        del self._lines[owner]
        if line:
            self._lines[owner] = line
        self._taken(handle)
        if chosen:
            log.debug("taskUUID=%s goes first: its model is loaded", handle.job.task_uuid)
        return handle

    def _taken(self, handle: W) -> None:
        handle._queue = None
        self._jobs -= 1

    def remove(self, handle: W) -> bool:
        """Take a waiting job out of the queue; False when it is no longer waiting."""
        with self._changed:
            line = self._lines.get(handle.job.owner)
            if handle._queue is not self or line is None:
                return False
            line.remove(handle)
            if not line:
                del self._lines[handle.job.owner]
            self._taken(handle)
            return True

    def drain_where(self, chosen: Callable[[W], bool]) -> list[W]:
        """Remove and return the waiting jobs ``chosen`` picks, in turn order."""
        with self._changed:
            taken = [handle for handle in self._in_turn_order() if chosen(handle)]
            for handle in taken:
                self._lines[handle.job.owner].remove(handle)
                self._taken(handle)
            self._lines = {owner: line for owner, line in self._lines.items() if line}
        return taken

    def take_joining(self, first: W, max_images: int) -> list[W]:
        """Remove and return waiting jobs of ``first``'s type and batch key, in turn order, while the
        images of all of them and ``first`` stay within ``max_images``."""
        kind, key, images = type(first.job), first.job.batch_key(), first.job.images
        taken: list[W] = []
        with self._changed:
            for handle in self._in_turn_order():
                if images >= max_images:
                    break
                if images + handle.job.images <= max_images and type(handle.job) is kind \
                        and handle.job.batch_key() == key:
                    self._lines[handle.job.owner].remove(handle)
                    self._taken(handle)
                    taken.append(handle)
                    images += handle.job.images
            self._lines = {owner: line for owner, line in self._lines.items() if line}
        return taken

    def announce_positions(self) -> None:
        """Tell each waiting job how many jobs will run before it now."""
        with self._changed:
            order = self._in_turn_order()
        for position, handle in enumerate(order):
            handle._post(Queued(position))

    def _in_turn_order(self) -> list[W]:
        """Waiting jobs in the order the worker would take them: one of each owner per round."""
        lines = [list(line) for line in self._lines.values()]
        depth = max((len(line) for line in lines), default=0)
        return [line[round_] for round_ in range(depth) for line in lines if round_ < len(line)]

    def _position(self, handle: W) -> int:
        return self._in_turn_order().index(handle)


def _model_of(job: Job) -> str:
    """What a job's calls are limited by after running out of memory: its (first) model, else its kind."""
    return job.models[0] if job.models else type(job).__name__


def _groups(handles: list[JobHandle], max_images: int) -> list[list[JobHandle]]:
    """``handles`` in order, in groups of at most ``max_images`` images (a larger job alone: the engine splits
    its images into calls that size)."""
    groups: list[list[JobHandle]] = []
    images = max_images
    for handle in handles:
        if images + handle.job.images > max_images:
            groups.append([])
            images = 0
        groups[-1].append(handle)
        images += handle.job.images
    return groups


def _out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError by name: this module imports no torch.
    return "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower()


def _out_of_memory_message(job: Job) -> str:
    width, height = getattr(job, "width", None), getattr(job, "height", None)
    size = f" of {width}x{height}" if width and height else ""
    return (f"The device ran out of memory for one image{size} of {_model_of(job)}, even alone in its call: "
            "this server's device does not fit it. A smaller width and height needs less memory. Other tasks "
            "are unaffected.")


def _on_device(loaded: Mapping[str, str], job: Job) -> bool:
    return all(loaded.get(air) == "device" for air in job.models)


def _describe_failure(exc: BaseException) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name or "out of memory" in str(exc).lower():
        return ("The device ran out of memory for this task; try fewer numberResults or a smaller "
                "width and height. Other tasks are unaffected.")
    return f"Inference failed ({name}). Other tasks are unaffected; the server log has details."
