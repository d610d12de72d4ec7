"""One Ray Serve replica (``--engine ray``): a device queue and its engine, exactly as ``--engine local`` builds
them in one server, behind a deployment handle. The gateway side is ``server/cluster.py``.

Ray imports this module in each replica's own process. A job arrives whole (a plain dataclass with PIL images),
with its models' catalog entries but not where their weights are: the replica looks for them on its own machine
(``inputs.located_weights``). It goes into this replica's ``DeviceQueue`` (so jobs that wait together on this
replica share pipeline calls, as in one server), and its events stream back (``tasks/jobs.py`` ``DeviceEvent``):
queue positions, steps (only for a task that reports progress, at most one per ``STEP_INTERVAL``), each chunk
of results (its images encoded here when the task only stores them: the job's ``encoding``), then one last
``Finished`` or ``Failed``, in lists of the events that came together, each list one message; the list with the
job's last image waits for its end and goes with it (a ``Failed`` pickles its TaskError as class,
message and attributes, so subclasses with constructors of their own travel too). When the caller lets go (the
task was cancelled, the gateway went away), Serve cancels ``run``, and the job leaves the queue or stops at its
next step.

Models are multiplexed: a request carries its model's AIR as the multiplexed model id, ``_hold`` records it in
Serve's per-replica LRU, and Serve's router sends a model's jobs to the replicas that hold it.

Each replica writes what it holds to the board (Ray's key-value store in the cluster's GCS, ``BOARD_NAMESPACE``)
every ``BOARD_INTERVAL`` seconds and after each job: loaded models, device memory, samplers it cannot run, the
jobs it has, how many jobs per model it ran. Gateways read the board to answer modelSearch, /metrics and
prepare's sampler check; an entry not rewritten for ``BOARD_EXPIRY`` seconds is a replica that is gone.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import ray
from ray import serve
from ray.experimental import internal_kv

from imagewire.air_registry import ModelEntry
from imagewire.server.config import Config
from imagewire.server.device import DeviceQueue, Engine, JobStream
from imagewire.server.logs import configure as configure_logging
from imagewire.tasks.errors import TaskError
from imagewire.tasks.inputs import located_weights
from imagewire.tasks.jobs import DeviceEvent, Failed, Finished, Job, Results, encoded_results

log = logging.getLogger("imagewire.replica")

APP_NAME = "imagewire"                 # the Serve application every gateway of a cluster shares
DEPLOYMENT_NAME = "imagewire-replica"
BOARD_NAMESPACE = "imagewire"
BOARD_PREFIX = "replica/"
BOARD_INTERVAL = 2.0
BOARD_EXPIRY = 10.0
# The fewest seconds between two steps a replica passes on: progress to a person, at a few updates a second,
# not a Ray message per step of a fast model.
STEP_INTERVAL = 0.2

def routing_model(job: Job) -> str:
    """The multiplexed model id a job travels with: its model's AIR. Jobs without a model of their own (the
    content safety checks that follow a task's images) carry none and go to whichever replica is least busy."""
    model = getattr(job, "model", None)
    return model.air if isinstance(model, ModelEntry) else ""


def keep_serve_on_loopback() -> None:
    """On a node whose address is loopback, bind the replica's inter-deployment gRPC server to 127.0.0.1.

    Serve binds it to ``[::]`` whatever the node's address (ray 2.60); this cluster calls replicas through Ray's
    actor calls only, never that server, but a port open on every interface is one too many. Called from the
    replica's constructor, which runs before Serve starts that server.
    """
    if not ray.util.get_node_ip_address().startswith("127."):
        return
    try:
        from ray.serve._private import replica as serve_replica
    except ImportError:
        return
    bind = getattr(serve_replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "imagewire_loopback", False):
        return

    def bind_loopback(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.removeprefix("[::]:")
        return bind(server, address)

    bind_loopback.imagewire_loopback = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = bind_loopback


class Replica:
    """The Serve deployment's class: one device queue, one engine (``server/cluster.py`` deploys it)."""

    def __init__(self, config: Config, engine_for: Callable[[Config], Callable[[], Engine]],
                 preloads: list[ModelEntry]) -> None:
        configure_logging(config.log_level)
        keep_serve_on_loopback()
        context = serve.get_replica_context()
        self.name = f"{context.replica_id.unique_id}"
        self.config = config
        self.device = DeviceQueue(engine_for(config), queue_size=config.queue_size,
                                  max_batch_size=config.max_batch_size, max_passed_over=config.max_passed_over)
        self.device.start()
        for entry in preloads:
            self.device.preload(entry).result()
        self.runs: collections.Counter[str] = collections.Counter()  # jobs run, by routing model
        self.jobs: dict[str, str] = {}    # task UUIDs of the jobs it holds → their routing model
        # Serve's per-replica LRU of multiplexed ids follows the engine's: the models it keeps on the device.
        self._hold = serve.multiplexed(max_num_models_per_replica=max(1, config.max_loaded_models))(self._held)
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._board = threading.Thread(target=self._publish_forever, name="imagewire-board", daemon=True)
        self._board.start()
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

    @staticmethod
    async def _messages(job: Job, handle: JobStream) -> AsyncIterator[list[DeviceEvent]]:
        """The job's events as the messages to its gateway: steps only when its task reports them, images encoded
        when its task only stores them, and the list that brings its last image held back until its end comes, so
        that the end travels with it (a job without steps is two messages: its queue position, then the rest)."""
        made = 0
        held: list[DeviceEvent] = []
        async for batch in handle.batches(STEP_INTERVAL, steps=job.report_steps):
            if job.encoding is not None:
                batch = [Results(await asyncio.to_thread(encoded_results, event.chunk, job.encoding))
                         if isinstance(event, Results) else event for event in batch]
            made += sum(len(event.chunk) for event in batch if isinstance(event, Results))
            batch, held = held + batch, []
            if made >= job.images and isinstance(batch[-1], Results):
                held = batch  # its end follows at once
                continue
            yield batch

    def state(self) -> dict[str, Any]:
        """What the board says of this replica."""
        return {"name": self.name, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "at": time.time(),
                "loaded_models": dict(self.device.loaded_models),
                "memory_plans": {air: dataclasses.asdict(plan) for air, plan in self.device.memory_plans.items()},
                "device_memory": dict(self.device.device_memory()),
                "unavailable_samplers": dict(self.device.unavailable_samplers), "pending": self.device.pending,
                "jobs": dict(self.jobs), "runs": dict(self.runs)}

    def _publish_forever(self) -> None:
        key = (BOARD_PREFIX + self.name).encode()
        while not self._stopping.is_set():
            self._changed.wait(BOARD_INTERVAL)
            self._changed.clear()
            try:
                internal_kv._internal_kv_put(key, json.dumps(self.state()).encode(), namespace=BOARD_NAMESPACE)
            except Exception:
                log.warning("writing this replica's state to the board failed; trying again", exc_info=True)
        try:
            internal_kv._internal_kv_del(key, namespace=BOARD_NAMESPACE)
        except Exception:
            log.debug("removing this replica from the board failed", exc_info=True)

    def __del__(self) -> None:
        # Serve calls it when it stops the replica gracefully: queued jobs finish, then the entry goes.
        self.device.stop(timeout=30.0)
        self._stopping.set()
        self._changed.set()
        self._board.join(timeout=5.0)


def read_board() -> list[Mapping[str, Any]]:
    """The replicas that wrote to the board within ``BOARD_EXPIRY`` seconds (from a process connected to Ray)."""
    now = time.time()
    states = []
    for key in internal_kv._internal_kv_list(BOARD_PREFIX.encode(), namespace=BOARD_NAMESPACE):
        value = internal_kv._internal_kv_get(key, namespace=BOARD_NAMESPACE)
        if value is None:
            continue
        state = json.loads(value)
        if now - state["at"] <= BOARD_EXPIRY:
            states.append(state)
    return sorted(states, key=lambda state: state["name"])
