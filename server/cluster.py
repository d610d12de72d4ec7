"""The gateway's compute plane on Ray Serve (``--engine ray``): ``RayDevice`` stands where ``DeviceQueue`` stands
in a one-process server (``server/device.py`` ``DeviceService``), and sends each job to a replica
(``server/replica.py``) through a Serve deployment handle, streaming its events back. Nothing above the device
changes: the task modules still submit a job and iterate its results.

Imported only with ``--engine ray``; it imports Ray inside its functions, after deciding how Ray must bind.

Where Ray listens. Ray resolves a node address of 127.0.0.1 to the machine's outward address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (then it keeps loopback, as it does on a laptop), and that variable is read
when Ray is imported. So for a cluster of this machine alone (no ``--ray-address``, or a loopback one) the
gateway sets it before importing Ray; the processes of a cluster it starts inherit it. Replicas bind Serve's
gRPC server to loopback too (``replica.keep_serve_on_loopback``); the dashboard and Serve's HTTP proxy are off.

What the replicas hold and do, and the models gateways want them to load, is on the board (``server/board.py``): the
gateway reads it every ``BOARD_READ_INTERVAL`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imagewire.server.config import Config
from imagewire.server.device import Engine, JobStream, WorkQueue
from imagewire.tasks.errors import InferenceError, ServiceUnavailable
from imagewire.tasks.jobs import DeviceEvent, Failed, Finished, Job, JobEvent, ModelPlacement, Queued, Results, Step

if TYPE_CHECKING:
    from ray.actor import ActorHandle
    from ray.serve.handle import DeploymentHandle

    from imagewire.air_registry import ModelEntry

log = logging.getLogger("imagewire.cluster")

LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
NAMESPACE = "imagewire"
CONNECT_TIMEOUT = 5.0        # seconds to reach --ray-address before saying that nothing answers there
JOIN_TIMEOUT = 30.0          # seconds for Ray to join the cluster there
DEPLOY_TIMEOUT = 900.0       # seconds the replicas get to start (imports, the default model's load)
BOARD_READ_INTERVAL = 1.0
READER_JOIN_TIMEOUT = 15.0   # seconds to wait at stop for a board read in flight (its own bound is board.CALL_TIMEOUT)
BOARD_STALENESS = 10.0       # seconds a job that ended may still show on the board as read (a replica writes on change)
ATTEMPTS = 2                 # a job whose replica died before sending any image goes once more elsewhere


def is_loopback(address: str | None) -> bool:
    if address is None:
        return True
    host = address.rpartition(":")[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _check_reachable(address: str) -> None:
    """One clear line when nothing listens at ``--ray-address`` (Ray itself would retry for a minute)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__.replace("Error", " error").lower()
        raise ValueError(f"--ray-address {address}: no Ray cluster answers there ({reason}); start one with "
                         "`ray start --head` or leave --ray-address out to start one on this machine") from None


def _use_token_if_any() -> None:
    """Present this machine's Ray token when joining by address, as Ray itself does only for a cluster it finds
    without one: a cluster started by ``ray.init`` or ``ray start`` asks for the token it wrote to
    ``~/.ray/auth_token``. An explicit ``RAY_AUTH_MODE`` wins."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") \
            or os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        os.environ["RAY_AUTH_MODE"] = "token"


def _join(ray: Any, address: str) -> None:
    """``ray.init`` at ``address``, within ``JOIN_TIMEOUT``: Ray itself retries without end when what answers
    there is not a Ray GCS, or refuses this machine's token."""
    failure: list[BaseException] = []

    def join() -> None:
        try:
            ray.init(address=address, namespace=NAMESPACE, configure_logging=False)
        except BaseException as exc:  # handed to the caller
            failure.append(exc)

    joining = threading.Thread(target=join, name="imagewire-ray-join", daemon=True)
    joining.start()
    joining.join(JOIN_TIMEOUT)
    if joining.is_alive():
        raise ValueError(f"--ray-address {address}: no Ray cluster answered there within {JOIN_TIMEOUT:.0f} s; is it "
                         "the head's GCS port, and does this machine have the cluster's token (RAY_AUTH_TOKEN)?")
    if failure:
        why = str(failure[0]).strip()
        raise ValueError(f"--ray-address {address}: joining the Ray cluster failed: "
                         + (why.splitlines()[0] if why else type(failure[0]).__name__))


class ReplicaError(Exception):
    """What a replica reported as failing (a wanted model it could not load), in its own words."""


@dataclass(frozen=True)
class ClusterOptions:
    """How many replicas, on what: from the flags and what the cluster has."""

    num_replicas: int | None
    autoscaling: Mapping[str, Any] | None
    actor_options: Mapping[str, Any]
    device: str   # the device as the replica's engine names it (a replica sees its one GPU as "cuda")

    @classmethod
    def of(cls, config: Config, cluster_gpus: float) -> ClusterOptions:
        wants_gpu = config.device.startswith("cuda") or (config.device == "auto" and cluster_gpus > 0)
        actor_options = {"num_gpus": 1} if wants_gpu else {"num_cpus": 1}
        autoscaling = None
        if config.max_replicas is not None:
            # Serve scales on each replica's ongoing requests: its device queue's waiting and running jobs.
            # A replica with a full batch waiting is as busy as one device should be.
            autoscaling = {"min_replicas": config.min_replicas or 0, "max_replicas": config.max_replicas,
                           "initial_replicas": max(1, config.min_replicas or 0),
                           "target_ongoing_requests": max(1, config.max_batch_size)}
        return cls(num_replicas=None if autoscaling else config.replicas, autoscaling=autoscaling,
                   actor_options=actor_options, device="cuda" if wants_gpu else "cpu")


def given_engine(factory: Callable[[], Engine], _config: Config) -> Callable[[], Engine]:
    """An engine factory that ignores the replica's settings (tests hand replicas an engine of their own)."""
    return factory


@dataclass(eq=False)  # a job is itself: the gateway's queue finds and removes jobs by identity
class RemoteJob(JobStream):
    """A job of this gateway, as its handler sees it (``RunningJob``): waiting in the gateway's queue, then on a
    replica, whose events it passes on as they stream in."""

    job: Job
    on_event: Callable[[JobEvent], None] | None = None
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    device_seconds: float = 0.0
    submitted_at: float = field(default_factory=time.monotonic)
    started: bool = False         # a step or a result came: it is on a device now
    landed: bool = False          # a replica answered for it: it is in that replica's queue
    cancelled: bool = False
    passed_over: int = 0          # in the gateway's queue (``WorkQueue``)
    _queue: WorkQueue[Any] | None = None
    _events: asyncio.Queue[DeviceEvent] = field(default_factory=asyncio.Queue)
    _driver: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        """Stop the job: one in the gateway's queue leaves it; for one handed to a replica, Serve cancels the
        replica's call, so the job leaves that queue or stops at its next step. Nothing after it arrives."""
        if self.cancelled or self._ended:
            return
        self.cancelled = True
        if self._queue is not None and self._queue.remove(self):
            log.info("taskUUID=%s left the gateway's queue (cancelled)", self.job.task_uuid)
        if self._driver is not None:
            self._driver.cancel()
        self._deliver(self.finished())

    def _post(self, event: DeviceEvent) -> None:
        """A queue position from the gateway's queue (on the event loop, as every event of a gateway's job)."""
        self._deliver(event)


class RayDevice:
    """The device of a gateway: Ray Serve replicas, each with its own device queue and engine.

    Jobs wait in the gateway's own queue (``WorkQueue``, as in a one-process server: bounded by --queue-size,
    API keys in turn, jobs whose model a replica with room holds on its device first) and are handed to Serve
    only while the replicas have room (``slots`` each: a batch running and a batch waiting, Serve's
    ``max_ongoing_requests``), so a job handed over starts or waits briefly on the replica Serve picked, never
    long in Serve's own queue. How long a job waits in turn is never an error; the cluster having no replica at
    all is, once it has lasted --replica-wait seconds of the job's wait.

    The room is the replicas' places less this gateway's own jobs handed over and not yet ended (always
    current) and the other gateways' jobs on the board (as of its last read, a second old at most).
    """

    def __init__(self, config: Config, preloads: Sequence[ModelEntry],
                 engine_for: Callable[[Config], Callable[[], Engine]]) -> None:
        self.config = config
        self.preloads = list(preloads)
        self.engine_for = engine_for
        self.on_call: Callable[[int, float, float], None] | None = None
        self.on_use: Callable[[str, float], None] | None = None
        self._handle: DeploymentHandle | None = None
        self._accepting = False
        self._owns_cluster = False
        self._line: WorkQueue[RemoteJob] = WorkQueue(config.queue_size)
        self._handed: set[RemoteJob] = set()     # on Serve's side and not ended
        self._arrived = False                    # jobs came since the queue's positions were last announced
        self._in_transit: set[str] = set()       # owners with a job handed over that no replica has answered yet
        self._ended_lately: dict[str, float] = {}       # task UUIDs of jobs handed over that ended, and when
        self._wake = asyncio.Event()             # a job came or ended, or the board changed: hand over what fits
        self._dispatcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replicas: list[Mapping[str, Any]] = []
        self._board: ActorHandle | None = None
        self._wanted: dict[str, ModelEntry] = {}   # models this gateway wants on every replica, sent with each read
        self._preloading: list[tuple[str, Future[None]]] = []   # preloads not yet done on every replica
        self._preloads_lock = threading.Lock()
        self._without_replicas_since: float | None = None  # monotonic time the board was first seen empty
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None
        self.address: str | None = None   # the GCS address other gateways join with

    # ------------------------------------------------------------ what the server reads

    @property
    def replicas(self) -> list[Mapping[str, Any]]:
        """The board as last read: one entry per live replica (``replica.Replica.state``)."""
        return self._replicas

    @property
    def unavailable_samplers(self) -> Mapping[str, str]:
        """Samplers some replica cannot run: a job may go to any of them."""
        merged: dict[str, str] = {}
        for state in self._replicas:
            merged.update(state["unavailable_samplers"])
        return merged

    @property
    def loaded_models(self) -> Mapping[str, str]:
        """Each model some replica holds, at the best place any holds it ("device" before "ram")."""
        merged: dict[str, str] = {}
        for state in self._replicas:
            for air, where in state["loaded_models"].items():
                if merged.get(air) != "device":
                    merged[air] = where
        return merged

    @property
    def memory_plans(self) -> Mapping[str, ModelPlacement]:
        """Each model's placement on the replicas that hold it (one of them where they differ)."""
        merged: dict[str, ModelPlacement] = {}
        for state in self._replicas:
            # The board is JSON: each placement comes as its fields.
            merged.update({air: ModelPlacement(**fields) for air, fields in state.get("memory_plans", {}).items()})
        return merged

    def device_memory(self) -> Mapping[str, int]:
        total: dict[str, int] = {}
        for state in self._replicas:
            for kind, value in state["device_memory"].items():
                total[kind] = total.get(kind, 0) + value
        return total

    @property
    def pending(self) -> int:
        """This gateway's jobs that no device has started yet: in its queue, or handed over and not started."""
        return self._line.jobs + sum(1 for remote in self._handed if not remote.started)

    @property
    def slots(self) -> int:
        """Jobs one replica takes at once (Serve's ``max_ongoing_requests``): a batch running, a batch waiting,
        so that the replica's device queue still joins jobs into calls."""
        return max(2, 2 * self.config.max_batch_size)

    @property
    def ready(self) -> bool:
        return self._accepting and bool(self._replicas)

    @property
    def busy(self) -> bool:
        """Whether work is on a device: a replica holds jobs (running or waiting, any gateway's, as the board last
        showed them), or a job this gateway handed over has not ended. After ``stop`` the board is no longer read:
        only this gateway's own jobs count then."""
        return bool(self._handed) or any(state["jobs"] for state in self._replicas)

    # ------------------------------------------------------------ start and stop

    def start(self) -> None:
        """Join (or start) the cluster, deploy the replicas unless another gateway did, wait for them to run.

        Blocking: call it from a thread. Raises ValueError with one line when the cluster cannot be used.
        """
        if is_loopback(self.config.ray_address):
            os.environ.update(LOOPBACK_ONLY)
        if self.config.ray_address is not None:
            _check_reachable(self.config.ray_address)
            _use_token_if_any()
        try:
            import ray
            from ray import serve
        except ImportError:
            raise ValueError("--engine ray needs Ray Serve: pip install 'imagewire[cluster]'") from None
        if self.config.ray_address is not None:
            _join(ray, self.config.ray_address)
        else:
            # The node's address is 127.0.0.1: LOOPBACK_ONLY, set above, makes it Ray's own choice.
            ray.init(include_dashboard=False, namespace=NAMESPACE, configure_logging=False)
            self._owns_cluster = True
        self.address = ray.get_runtime_context().gcs_address
        if self._owns_cluster:
            log.info("started a Ray cluster on %s; other gateways join it with --engine ray --ray-address %s",
                     self.address, self.address)
        else:
            log.info("joined the Ray cluster at %s", self.address)
        from imagewire.server.board import CALL_TIMEOUT, board_actor

        serve.start(proxy_location="Disabled")
        self._board = board_actor()
        # Wanted before the replicas start: each loads them before it takes jobs (``replica.Replica``).
        self._wanted.update((entry.air, entry) for entry in self.preloads)
        ray.get(self._board.want.remote(self.preloads), timeout=CALL_TIMEOUT)
        self._handle = self._deploy(serve, ray.cluster_resources().get("GPU", 0.0))
        self._read_board()
        self._reader = threading.Thread(target=self._read_board_forever, name="imagewire-board", daemon=True)
        self._reader.start()
        self._accepting = True

    def _deploy(self, serve: Any, cluster_gpus: float) -> DeploymentHandle:
        from imagewire.server.replica import APP_NAME, DEPLOYMENT_NAME, Replica

        failure: list[BaseException] = []   # what deploying them raised, when this gateway deploys them
        if _state(serve, APP_NAME) in ("RUNNING", "DEPLOYING"):
            log.info("the cluster runs imagewire replicas already: this gateway shares them (its own "
                     "--replicas and model flags do not apply to them)")
        else:
            options = ClusterOptions.of(self.config, cluster_gpus)
            replica_config = dataclasses.replace(self.config, device=options.device)
            deployment = serve.deployment(
                Replica, name=DEPLOYMENT_NAME, num_replicas=options.num_replicas,
                autoscaling_config=dict(options.autoscaling) if options.autoscaling else None,
                ray_actor_options=dict(options.actor_options),
                # A replica holds a batch running and a batch waiting (so that its device queue still joins
                # jobs into calls); the rest wait at the gateway's handle, up to --queue-size of them, then
                # serviceUnavailable, and go to whichever replica frees first. Holding more would pin a
                # backlog to the replica that has the model while another replica, or a new one that
                # autoscaling brought up, stands idle.
                max_ongoing_requests=max(2, 2 * self.config.max_batch_size),
                max_queued_requests=self.config.queue_size,
                graceful_shutdown_timeout_s=self.config.shutdown_grace)
            scale = (f"{options.autoscaling['min_replicas']}-{options.autoscaling['max_replicas']} autoscaled"
                     if options.autoscaling else str(options.num_replicas))
            log.info("deploying %s replicas on %s", scale, "a GPU each" if options.device == "cuda" else "CPU")
            failure = _run_in_background(serve, deployment.bind(replica_config, self.engine_for))
        self._wait_running(serve, APP_NAME, failure)
        handle: DeploymentHandle = serve.get_app_handle(APP_NAME)
        return handle

    @staticmethod
    def _wait_running(serve: Any, app_name: str, failure: Sequence[BaseException] = ()) -> None:
        deadline = time.monotonic() + DEPLOY_TIMEOUT
        while True:
            state = _state(serve, app_name)
            if state == "RUNNING":
                return
            if failure and state not in ("DEPLOYING", "DEPLOY_FAILED", "UNHEALTHY"):
                why = str(failure[0]).strip()
                raise ValueError("--engine ray: deploying the replicas failed: "
                                 + (why.splitlines()[0] if why else type(failure[0]).__name__))
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                message = serve.status().applications[app_name].message
                raise ValueError("--engine ray: the replicas failed to start"
                                 + (f": {message.strip().splitlines()[0]}" if message.strip() else ""))
            if time.monotonic() > deadline:
                raise ValueError(f"--engine ray: the replicas were not running after {DEPLOY_TIMEOUT:.0f} s "
                                 f"({state}); does the cluster have the CPUs or GPUs they ask for?")
            time.sleep(0.5)

    def _read_board(self) -> None:
        from imagewire.server.board import read_board

        with self._preloads_lock:
            wanted = list(self._wanted.values())
        try:
            states = read_board(self._board, wanted)
        except Exception:
            log.warning("reading the replicas' board failed; keeping what it said before", exc_info=True)
            states = self._replicas
        self._saw_board(states)
        self._settle_preloads()

    def _saw_board(self, states: list[Mapping[str, Any]]) -> None:
        """What the board says now (from the reader thread): the replicas and their jobs."""
        self._replicas = states
        if self._replicas:
            self._without_replicas_since = None
        elif self._without_replicas_since is None:
            self._without_replicas_since = time.monotonic()
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):   # closed meanwhile: the next job brings its loop
                self._loop.call_soon_threadsafe(self._wake.set)

    def _read_board_forever(self) -> None:
        while not self._stopping.wait(BOARD_READ_INTERVAL):
            try:
                self._read_board()
            except Exception:  # never leave the gateway without its reader
                log.exception("handling a read of the replicas' board failed; reading it again in a second")

    def preload(self, model: ModelEntry) -> Future[None]:
        """Have every replica load ``model``: it goes on the board with the next read, each replica loads it in turn
        with its jobs (and every replica that starts later, before it takes jobs). The future is done once every
        replica on the board says it loaded it, and fails with the first replica's reason when one could not."""
        done: Future[None] = Future()
        with self._preloads_lock:
            self._wanted.setdefault(model.air, model)
            self._preloading.append((model.air, done))
        return done

    def _settle_preloads(self) -> None:
        """End the preloads the board now answers for (after each read)."""
        with self._preloads_lock:
            waiting, self._preloading = self._preloading, []
            for air, done in waiting:
                if done.done():   # cancelled: nobody waits for it any more
                    continue
                outcome = self._preload_outcome(air)
                if outcome is False:
                    self._preloading.append((air, done))
                elif isinstance(outcome, BaseException):
                    done.set_exception(outcome)
                else:
                    done.set_result(None)

    def _preload_outcome(self, air: str) -> BaseException | bool:
        """True when every replica loaded ``air``, the first replica's failure, or False while one has yet to say."""
        if not self._replicas:
            # None to load it on: a replica that starts loads it first. Until one has run for --replica-wait
            # seconds, though, a fixed cluster's replicas are still coming.
            if self._scales_from_zero():
                return True
            if self._waited_too_long_for_replicas():
                return ServiceUnavailable(f"no replica ran for {self.config.replica_wait:g} s to load it")
            return False
        for state in self._replicas:
            if air in state.get("preload_errors", {}):
                return ReplicaError(f"{state['preload_errors'][air]} (on replica {state['name']})")
        return all(air in state.get("preloaded", ()) for state in self._replicas)

    def _waited_too_long_for_replicas(self) -> bool:
        return (self._without_replicas_since is not None
                and time.monotonic() - self._without_replicas_since >= self.config.replica_wait)

    def close_intake(self) -> None:
        self._accepting = False

    def stop(self, timeout: float | None = None) -> None:
        """Let go of the cluster: a cluster this gateway started stops with it (its replicas and board too), a
        joined one keeps serving."""
        self._accepting = False
        self._stopping.set()
        if self._dispatcher is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatcher.cancel)
        if self._reader is not None:
            self._reader.join(READER_JOIN_TIMEOUT)
        import ray

        if self._owns_cluster:
            from ray import serve

            try:
                serve.shutdown()
            except Exception:
                log.warning("stopping the replicas failed", exc_info=True)
            if self._board is not None:
                try:
                    ray.kill(self._board)
                except Exception:
                    log.warning("stopping the replicas' board failed", exc_info=True)
        self._board = None
        # What the board said is of a cluster this gateway no longer reads.
        self._replicas = []
        with self._preloads_lock:
            waiting, self._preloading = self._preloading, []
        for _, done in waiting:
            if not done.done():
                done.set_exception(ServiceUnavailable("The server stopped before every replica had loaded the model."))
        ray.shutdown()

    # ------------------------------------------------------------ jobs

    def submit(self, job: Job, on_event: Callable[[JobEvent], None] | None = None) -> RemoteJob:
        if not self._accepting or self._handle is None:
            raise ServiceUnavailable("The server is shutting down and takes no new inference tasks.")
        loop = asyncio.get_running_loop()
        if self._dispatcher is None or self._dispatcher.done() or self._loop is not loop:
            # Started with the first job, on the loop jobs come from (a test may bring a new loop: a new one).
            self._loop, self._wake = loop, asyncio.Event()
            self._dispatcher = loop.create_task(self._dispatch_forever(), name="imagewire-gateway-queue")
        remote = RemoteJob(job, on_event=on_event)
        if self._line.put_job(remote) is None:
            raise ServiceUnavailable(
                f"The server is busy: {self.config.queue_size} inference tasks are already waiting. "
                "Retry in a moment.")
        # Its first position comes from the replica when it goes over at once, else from this queue (``_dispatch``):
        # a job that heard it is queued is on a device's queue, or waits for room in this one.
        self._arrived = True
        self._wake.set()
        return remote

    def _room(self) -> int:
        """Jobs the replicas can take now: their places, less this gateway's jobs on them and the other
        gateways' jobs the board shows."""
        # This gateway's jobs that ended lately may still be on the board as read: they are not others' jobs.
        horizon = time.monotonic() - BOARD_STALENESS
        self._ended_lately = {task: at for task, at in self._ended_lately.items() if at > horizon}
        mine = {remote.job.task_uuid for remote in self._handed} | self._ended_lately.keys()
        others = sum(1 for state in self._replicas for task in state["jobs"] if task not in mine)
        return len(self._replicas) * self.slots - len(self._handed) - others

    def _scales_from_zero(self) -> bool:
        """Whether Serve starts a replica for a job handed over while none runs (autoscaling from zero)."""
        return self.config.max_replicas is not None and not self.config.min_replicas

    def _on_a_free_replica(self, job: Job) -> bool:
        """Whether a replica with room holds the job's model on its device (Serve's router sends it there)."""
        from imagewire.server.replica import routing_model

        air = routing_model(job)
        return not air or any(state["loaded_models"].get(air) == "device" and len(state["jobs"]) < self.slots
                              for state in self._replicas)

    async def _dispatch_forever(self) -> None:
        """Hand jobs over while the replicas have room; fail the ones that waited --replica-wait with none."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self._dispatch()
            except Exception:  # never leave the queue without its dispatcher
                log.exception("handing jobs to the replicas failed; trying again at the next change")

    def _dispatch(self) -> None:
        room = self._room()
        if not self._replicas and self._scales_from_zero():
            room = self.slots - len(self._handed)  # Serve starts a replica for what waits at its handle
        handed = 0
        while room > 0:
            # An owner's next job goes over once its last one reached a replica: Serve delivers calls made
            # together in any order, and an owner's jobs must run in the order they came.
            remote = self._line.take(self._on_a_free_replica, self.config.max_passed_over, self._in_transit)
            if remote is None:
                break
            self._in_transit.add(remote.job.owner)
            self._hand_over(remote)
            room -= 1
            handed += 1
        if not self._replicas:
            self._fail_unserved(self._line.drain_where(self._waited_too_long))
        if handed or self._arrived:
            self._arrived = False
            self._line.announce_positions()

    def _waited_too_long(self, remote: RemoteJob) -> bool:
        """Whether the job has waited --replica-wait seconds while the cluster had no replica."""
        if self._replicas or self._without_replicas_since is None:
            return False
        empty_since = max(self._without_replicas_since, remote.submitted_at)
        return time.monotonic() - empty_since >= self.config.replica_wait

    def _fail_unserved(self, remotes: Sequence[RemoteJob]) -> None:
        for remote in remotes:
            log.warning("taskUUID=%s: no replica ran for %g s of its wait", remote.job.task_uuid,
                        self.config.replica_wait)
            remote._deliver(Failed(ServiceUnavailable(
                f"No worker was running for {self.config.replica_wait:g} s while this task waited; the cluster "
                "may have none (they failed to start, or stopped). Retry in a moment.")))

    def _hand_over(self, remote: RemoteJob) -> None:
        assert self._loop is not None
        self._handed.add(remote)
        remote.queue_seconds = time.monotonic() - remote.submitted_at
        remote._driver = self._loop.create_task(self._drive(remote))

    async def _drive(self, remote: RemoteJob) -> None:
        """Stream the job's events from a replica; on a replica's death before any image came, once more."""
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        from imagewire.server.replica import routing_model

        assert self._handle is not None
        job, air = remote.job, routing_model(remote.job)
        results_sent = False
        try:
            for attempt in range(1, ATTEMPTS + 1):
                stream = self._handle.options(stream=True, multiplexed_model_id=air).run.remote(job)
                try:
                    async for batch in self._batches(stream, remote):
                        self._landed(remote)
                        for event in batch:
                            results_sent |= self._take(remote, event)
                    return
                except (RayActorError, ActorUnavailableError) as exc:
                    if results_sent or attempt == ATTEMPTS:
                        log.error("taskUUID=%s: its replica stopped (%s)%s", job.task_uuid, type(exc).__name__,
                                  " after sending images" if results_sent else ", twice")
                        remote._deliver(Failed(InferenceError(
                            "The worker running this task stopped before it finished"
                            + (" (some images were sent already)" if results_sent else ", and so did the one it was "
                               "retried on") + ". Other tasks are unaffected; retry it.")))
                        return
                    log.warning("taskUUID=%s: its replica stopped (%s) before any image; trying another replica",
                                job.task_uuid, type(exc).__name__)
                finally:
                    stream.cancel()
        except BackPressureError:
            remote._deliver(Failed(ServiceUnavailable(
                f"The server is busy: {self.config.queue_size} inference tasks are already waiting. "
                "Retry in a moment.")))
        except TimeoutError:
            self._fail_unserved([remote])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("taskUUID=%s: the call to its replica failed", job.task_uuid, exc_info=exc)
            remote._deliver(Failed(InferenceError(
                f"Inference failed ({type(exc).__name__}). Other tasks are unaffected; the server log has details.")))
        finally:
            self._landed(remote)
            self._handed.discard(remote)
            self._ended_lately[job.task_uuid] = time.monotonic()
            self._wake.set()
            remote._deliver(remote.finished())  # unless it ended already

    def _landed(self, remote: RemoteJob) -> None:
        """The job reached a replica (or ended): its owner's next job may go over."""
        if remote.job.owner in self._in_transit and not remote.landed:
            remote.landed = True
            self._in_transit.discard(remote.job.owner)
            self._wake.set()

    async def _batches(self, stream: Any, remote: RemoteJob) -> AsyncIterator[list[DeviceEvent]]:
        """The stream's lists of events (``replica.Replica.run``). Until the first (a replica answers ``Queued``
        as soon as it has the job), the job may wait in Serve's own queue, briefly when this gateway alone fills
        the replicas, longer when other gateways share them: that wait is an error only once the cluster has
        had no replica for --replica-wait seconds of it (``TimeoutError``)."""
        iterator = stream.__aiter__()
        first = asyncio.ensure_future(iterator.__anext__())
        try:
            while not first.done():
                await asyncio.wait({first}, timeout=BOARD_READ_INTERVAL)
                if not first.done() and self._waited_too_long(remote):
                    raise TimeoutError
            batch = first.result()
        except StopAsyncIteration:
            return
        finally:
            first.cancel()
        yield batch
        async for batch in iterator:
            yield batch

    def _take(self, remote: RemoteJob, event: DeviceEvent) -> bool:
        """Hand one event of the replica's on; True when it carried results."""
        if isinstance(event, Queued):
            if not remote.started:  # a position the replica announced before it started the job
                remote._deliver(event)
            return False
        if isinstance(event, Finished):
            # Its wait: in this gateway's queue (counted when it was handed over), then on the replica.
            remote.queue_seconds += event.queue_seconds
            remote.compute_seconds, remote.device_seconds = event.compute_seconds, event.device_seconds
            event = remote.finished()
            finished = time.perf_counter()
            if self.on_use is not None:
                self.on_use(remote.job.owner, remote.device_seconds)
            if self.on_call is not None and remote.device_seconds:
                self.on_call(remote.job.images, finished - remote.device_seconds, finished)
        elif isinstance(event, (Step, Results)):
            self._started(remote)
        elif not isinstance(event, Failed):
            raise ValueError(f"unknown event from a replica: {event!r}")
        remote._deliver(event)
        return isinstance(event, Results)

    def _started(self, remote: RemoteJob) -> None:
        remote.started = True


def _run_in_background(serve: Any, application: Any) -> list[BaseException]:
    """Deploy the replicas with ``serve.run`` in a thread of its own, and answer at once with a list that holds what
    it raised, if it does. ``serve.run`` returns only once the application runs, with no bound on the wait: the
    caller waits itself (``RayDevice._wait_running``), with its own bound and the application's own messages."""
    from imagewire.server.replica import APP_NAME

    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(application, name=APP_NAME, route_prefix=None)
        except BaseException as exc:  # read by the caller
            failure.append(exc)

    threading.Thread(target=run, name="imagewire-deploy", daemon=True).start()
    return failure


def _state(serve: Any, app_name: str) -> str:
    """The Serve application's status by name (RUNNING, DEPLOYING, DEPLOY_FAILED, …), NOT_STARTED without one."""
    status = serve.status().applications.get(app_name)
    return "NOT_STARTED" if status is None else str(getattr(status.status, "value", status.status))
