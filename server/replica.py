"""One Ray Serve replica (``--engine ray``): a device queue and its engine, exactly as ``--engine local`` builds
them in one server, behind a deployment handle. The gateway side is ``server/cluster.py``.

Ray imports this module in each replica's own process. A job arrives whole (a plain dataclass with PIL images),
with its models' catalog entries but not where their weights are: the replica looks for them on its own machine
(``inputs.located_weights``). It goes into this replica's ``DeviceQueue`` (so jobs that wait together on this
replica share pipeline calls, as in one server), and its events stream back (``tasks/jobs.py`` ``DeviceEvent``):
queue positions, steps (only for a task that reports progress, at most one per ``STEP_INTERVAL``), each chunk
of results (its images encoded here when the task only stores them: the job's ``encoding``; and stored here too,
sending only their records, when the job's ``store_on_device`` names the bucket this replica opened), then one last
``Finished`` or ``Failed``, in lists of the events that came together, each list one message; the list with the
job's last image waits for its end and goes with it (a ``Failed`` pickles its TaskError as class,
message and attributes, so subclasses with constructors of their own travel too). When the caller lets go (the
task was cancelled, the gateway went away), Serve cancels ``run``, and the job leaves the queue or stops at its
next step.

Models are multiplexed: a request carries its model's AIR as the multiplexed model id, ``_hold`` records it in
Serve's per-replica LRU, and Serve's router sends a model's jobs to the replicas that hold it.

Each replica posts what it holds to the board (``server/board.py``, an actor of the cluster) every
``BOARD_INTERVAL`` seconds and after each change: loaded models, device memory, samplers it cannot run, the jobs it
has, how many jobs per model it ran, the wanted models it loaded. Gateways read the board to answer modelSearch,
/metrics and prepare's sampler check, and to know when a preload is done. The board answers each post with the
models gateways want on every replica (the default model, ``--preload``): a replica loads those it has not yet
loaded, in its device queue; a starting replica loads them all before it takes jobs.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

import ray
from ray import serve

from imagewire.air_registry import ModelEntry, RegistryError
from imagewire.server.board import BOARD_INTERVAL, CALL_TIMEOUT, POST_GAP, board_actor
from imagewire.server.config import Config
from imagewire.server.device import DeviceQueue, Engine, JobStream
from imagewire.server.logs import configure as configure_logging
from imagewire.server.metrics import BusyClock
from imagewire.storage.s3 import S3Location, S3Store
from imagewire.tasks.errors import TaskError
from imagewire.tasks.inputs import located_weights
from imagewire.tasks.jobs import DeviceEvent, Failed, Finished, Job, Results, StoreOnDevice, encoded_results
from imagewire.tasks.outputs import stored_results

log = logging.getLogger("imagewire.replica")

APP_NAME = "imagewire"                 # the Serve application every gateway of a cluster shares
DEPLOYMENT_NAME = "imagewire-replica"
# The fewest seconds between two steps a replica passes on: progress to a person, at a few updates a second,
# not a Ray message per step of a fast model.
STEP_INTERVAL = 0.2


def routing_model(job: Job) -> str:
    """The multiplexed model id a job travels with: its model's AIR. Jobs without a model of their own (the
    content safety checks that follow a task's images) carry none and go to whichever replica is least busy."""
    model = getattr(job, "model", None)
    return model.air if isinstance(model, ModelEntry) else ""


# Where Serve keeps the function its replicas bind their inter-deployment gRPC server with (a private module: see
# ``keep_serve_on_loopback``). tests/cluster/test_serve_api.py fails when Ray moves it.
SERVE_REPLICA_MODULE = "ray.serve._private.replica"
SERVE_GRPC_BIND = "add_port_to_grpc_server"


def keep_serve_on_loopback() -> None:
    """On a node whose address is loopback, bind the replica's inter-deployment gRPC server to that address.

    Each Serve replica starts that server when it starts, whether or not any handle uses gRPC transport (ray 2.60,
    ``Replica._on_initialized`` in Serve's replica module), and binds it to ``[::]``, whatever the node's address.
    Ray offers no setting for that address: ``RAY_SERVE_USE_GRPC_BY_DEFAULT`` and the handles' ``_by_reference``
    choose how calls travel, not whether the server listens, and the node's address is not used for it. This
    cluster calls replicas through Ray's actor calls only, never that server, but a port open on every interface
    breaks the rule that a cluster of one machine listens on loopback only. So the replica replaces the module's
    binding function with one that turns ``[::]`` into the node's address (127.0.0.1, or another loopback address
    when several nodes share a machine) and changes nothing else (a TLS cluster still gets its credentials).
    Called from the replica's constructor, which runs before Serve starts that server.
    """
    node = ray.util.get_node_ip_address()
    if not node.startswith("127."):
        return
    import importlib

    try:
        serve_replica = importlib.import_module(SERVE_REPLICA_MODULE)
        bind = getattr(serve_replica, SERVE_GRPC_BIND)
    except (ImportError, AttributeError):
        log.error("this Ray's Serve has no %s.%s: the replica's inter-deployment gRPC server may listen on every "
                  "interface, not only loopback", SERVE_REPLICA_MODULE, SERVE_GRPC_BIND)
        return
    if getattr(bind, "imagewire_loopback", False):
        return

    def bind_loopback(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = f"{node}:" + address.removeprefix("[::]:")
        return bind(server, address)

    bind_loopback.imagewire_loopback = True  # type: ignore[attr-defined]
    setattr(serve_replica, SERVE_GRPC_BIND, bind_loopback)


class Replica:
    """The Serve deployment's class: one device queue, one engine (``server/cluster.py`` deploys it)."""

    _publisher: threading.Thread

    def __init__(self, config: Config, engine_for: Callable[[Config], Callable[[], Engine]]) -> None:
        configure_logging(config.log_level)
        keep_serve_on_loopback()
        context = serve.get_replica_context()
        self.name = f"{context.replica_id.unique_id}"
        self.config = config
        self.device = DeviceQueue(engine_for(config), queue_size=config.queue_size,
                                  max_batch_size=config.max_batch_size, max_passed_over=config.max_passed_over)
        self.busy = BusyClock()
        self.device.on_call = lambda _results, started, ended: self.busy.add(started, ended)
        self.device.start()
        self.store = _shared_store(config)
        self.runs: collections.Counter[str] = collections.Counter()  # jobs run, by routing model
        self.jobs: dict[str, str] = {}    # task UUIDs of the jobs it holds → their routing model
        # The wanted models (``server/board.py``) this replica loaded, or failed to load and why; those being loaded.
        self.preloaded: set[str] = set()
        self.preload_errors: dict[str, str] = {}
        self._loading: set[str] = set()
        # Serve's per-replica LRU of multiplexed ids follows the engine's: the models it keeps on the device.
        self._hold = serve.multiplexed(max_num_models_per_replica=max(1, config.max_loaded_models))(self._held)
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self.board = board_actor()
        # The models gateways want, loaded before this replica takes jobs (and before it is on the board: a
        # replica that is not there yet is not waited for, and gets no share of the gateways' jobs).
        wanted: list[ModelEntry] = ray.get(self.board.wanted.remote(), timeout=CALL_TIMEOUT)
        for entry in wanted:
            self._preload(entry)
        while self._loading:
            time.sleep(0.05)
        self._publisher = threading.Thread(target=self._publish_forever, name="imagewire-board", daemon=True)
        self._publisher.start()
        log.info("replica %s ready (pid %d, device %s)", self.name, os.getpid(), config.device)

    @staticmethod
    async def _held(air: str) -> str:
        """The multiplexed "model": the engine loads and evicts the pipelines itself, so Serve keeps the id."""
        return air

    async def run(self, job: Job) -> AsyncIterator[list[DeviceEvent]]:
        air = serve.get_multiplexed_model_id()
        if air:
            await self._hold(air)
        try:
            if self.config.needs_weights:
                # The gateway hands the catalog entries over unchecked: the weights are on this machine.
                job = await asyncio.to_thread(located_weights, job, data_dir=self.config.data_dir,
                                              allow_downloads=self.config.allow_downloads)
            handle = self.device.submit(job)
        except TaskError as exc:  # weights missing here, the queue is full, the replica is stopping
            yield [Failed(exc)]
            return
        log.info("taskUUID=%s on replica %s (model %s)", job.task_uuid, self.name, air or "-")
        self.jobs[job.task_uuid] = air
        self._changed.set()
        try:
            async for batch in self._messages(job, handle):
                if isinstance(batch[-1], (Finished, Failed)):
                    self.runs[air] += 1
                yield batch
        finally:
            # Cancelled by the caller, or over: a job still queued leaves, one running stops at its next step.
            handle.cancel()
            self.jobs.pop(job.task_uuid, None)
            self._changed.set()

    async def _messages(self, job: Job, handle: JobStream) -> AsyncIterator[list[DeviceEvent]]:
        """The job's events as the messages to its gateway: steps only when its task reports them, images encoded
        when its task only stores them (and stored, when it says where and this replica reaches that store), and the
        list that brings its last image held back until its end comes, so that the end travels with it (a job
        without steps is two messages: its queue position, then the rest). An image the store refuses ends the job
        with the task's storageError."""
        made = 0
        held: list[DeviceEvent] = []
        store_on_device = self._store_on_device(job)
        written = 0  # bytes of this job's images stored so far, counted against the room the job carries
        async for batch in handle.batches(STEP_INTERVAL, steps=job.report_steps):
            if job.encoding is not None:
                batch = [Results(await asyncio.to_thread(encoded_results, event.chunk, job.encoding))
                         if isinstance(event, Results) else event for event in batch]
            if store_on_device is not None:
                assert self.store is not None
                kept: list[DeviceEvent] = []
                for event in batch:
                    if not isinstance(event, Results):
                        kept.append(event)
                        continue
                    stored = await stored_results(self.store, event.chunk, job.owner, store_on_device, written)
                    written = stored.written
                    if stored.results:
                        kept.append(Results(stored.results))
                        log.info("taskUUID=%s: replica %s stored %d image(s) in %s", job.task_uuid, self.name,
                                 len(stored.results), self.store.location)
                    if stored.failure is not None:
                        # The images stored before it still reach the task; nothing after it is made for it.
                        yield [*held, *kept, Failed(stored.failure)]
                        return
                batch = kept
            made += sum(len(event.chunk) for event in batch if isinstance(event, Results))
            batch, held = held + batch, []
            if made >= job.images and isinstance(batch[-1], Results):
                held = batch  # its end follows at once
                continue
            yield batch

    def _store_on_device(self, job: Job) -> StoreOnDevice | None:
        """Where this replica stores the job's images itself: only in the store its gateway uses, when it opened that
        one too (a gateway with another ``--store`` than the one that deployed the replicas gets the bytes)."""
        where = job.store_on_device
        if where is None or job.encoding is None or self.store is None or where.shared.store != self.store.address:
            return None
        return where

    def state(self) -> dict[str, Any]:
        """What the board says of this replica (plain data: gateways and tests print it as JSON)."""
        return {"name": self.name, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "at": time.time(),
                "loaded_models": dict(self.device.loaded_models),
                "memory_plans": {air: dataclasses.asdict(plan) for air, plan in self.device.memory_plans.items()},
                "device_memory": dict(self.device.device_memory()),
                "unavailable_samplers": dict(self.device.unavailable_samplers), "pending": self.device.pending,
                "jobs": dict(self.jobs), "runs": dict(self.runs), "device_busy_ratio": self.busy.ratio(),
                "preloaded": sorted(self.preloaded), "preload_errors": dict(self.preload_errors)}

    def _preload(self, entry: ModelEntry) -> None:
        """Load a wanted model in the device queue (in turn with jobs), once; its outcome goes on the board."""
        air = entry.air
        if air in self.preloaded or air in self.preload_errors or air in self._loading:
            return
        self._loading.add(air)
        log.info("replica %s loading %s (wanted by a gateway)", self.name, air)

        def loaded(done: Future[None]) -> None:
            error = done.exception()
            if error is None:
                self.preloaded.add(air)
            else:
                self.preload_errors[air] = _describe(error, air)
                log.warning("replica %s could not load %s: %s", self.name, air, self.preload_errors[air])
            self._loading.discard(air)
            self._changed.set()

        self.device.preload(entry).add_done_callback(loaded)

    def _publish_forever(self) -> None:
        self._changed.set()  # on the board at once
        while not self._stopping.is_set():
            self._changed.wait(BOARD_INTERVAL)
            self._changed.clear()
            try:
                wanted: list[ModelEntry] = ray.get(self.board.post.remote(self.state()), timeout=CALL_TIMEOUT)
            except Exception:
                log.warning("posting this replica's state to the board failed; trying again", exc_info=True)
                continue
            for entry in wanted:
                self._preload(entry)
            self._stopping.wait(POST_GAP)  # the changes of the next moment go in one post
        try:
            ray.get(self.board.remove.remote(self.name), timeout=CALL_TIMEOUT)
        except Exception:
            log.debug("removing this replica from the board failed", exc_info=True)

    def __del__(self) -> None:
        # Serve calls it when it stops the replica gracefully: queued jobs finish, then the entry goes.
        self.device.stop(timeout=30.0)
        self._stopping.set()
        self._changed.set()
        if hasattr(self, "_publisher"):   # not when the constructor failed before it started
            self._publisher.join(timeout=5.0)


def _shared_store(config: Config) -> S3Store | None:
    """The bucket of the deploying gateway's ``--store``, opened by this replica to store the images of jobs that say
    so (``Job.store_on_device``); None without one (local disk is the gateway's machine's alone) or when this
    replica cannot open it, and the gateway then stores every image. Its bounds (``--max-storage-gib``) are the
    gateway's, carried by each job with the room left as the gateway counts it, so this store has none of its own
    and counts nothing at start."""
    if config.store is None:
        return None
    try:
        return S3Store(S3Location.parse(config.store), endpoint_url=config.s3_endpoint)
    except ValueError as exc:
        log.warning("%s; this replica sends its images to the gateway, which stores them", exc)
        return None


def _describe(error: BaseException, air: str) -> str:
    """Why a model did not load, in one line, as the server says it for a model it loads itself."""
    if isinstance(error, RegistryError):
        return error.describe(air)
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
