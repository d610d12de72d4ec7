"""The server process: builds the services, listens, and stops gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import importlib.util
import logging
import socket
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from imagewire.air_registry import ARCHITECTURES, Catalog, ModelEntry, RegistryError, UnknownModel, parse_air
from imagewire.air_registry.civitai import Civitai, DownloadLimits
from imagewire.air_registry.models_dir import RESCAN_SECONDS as MODELS_RESCAN_SECONDS
from imagewire.air_registry.models_dir import ModelsFolders
from imagewire.air_registry.uploads import ModelUploads
from imagewire.server.admission import Admission, DeviceTime
from imagewire.server.answer_budget import AnswerBudget
from imagewire.server.auth import ApiKeys, load_or_create_key
from imagewire.server.config import Config, shown_url
from imagewire.server.connection import GOING_AWAY, Connection, WaitingRoom
from imagewire.server.device import DeviceQueue, DeviceService, Engine
from imagewire.server.fake_engine import FakeEngine
from imagewire.server.handshakes import HandshakeGuard, bind, client_address, networks, request_arrived_middleware
from imagewire.server.http import HostCheck, HttpRoutes
from imagewire.server.inbound_budget import FrameCounter, InboundBudget
from imagewire.server.logs import install as install_log_limits
from imagewire.server.metrics import Metrics, State, placed_bytes
from imagewire.server.rest import RestEndpoint
from imagewire.server.sessions import SessionRegistry, Sessions, TaskRegistry, Tasks
from imagewire.server.task_runner import TaskRunner
from imagewire.server.webhooks import WebhookSender
from imagewire.storage import ImageStorage, ImageStore, UrlFetcher, is_forbidden_address
from imagewire.storage.s3 import S3Location, S3Store
from imagewire.storage.store import Limits as StoreLimits
from imagewire.tasks.context import PixelBudget, Services, Settings
from imagewire.tasks.downloads import Downloads
from imagewire.tasks.image_inference import check_model_defaults

if TYPE_CHECKING:
    from imagewire.server.state import RedisState

log = logging.getLogger("imagewire.server")

# Connections the kernel holds for us while the loop is busy; a burst beyond it waits in SYN retries.
LISTEN_BACKLOG = 1024
SWEEP_INTERVAL = 30.0             # sessions and task records
STORE_SWEEP_INTERVAL = 3600.0     # stored images: a walk over the disk, so less often
MAX_OUTBOX_BYTES = 256 * 1024 * 1024
MAX_KEPT_BYTES = 256 * 1024 * 1024   # results kept for getResponse, oldest finished let go first


def diffusers_engine_factory(config: Config) -> Callable[[], Engine]:
    def build() -> Engine:
        # Imported here so that torch loads in the device worker, not when the CLI parses flags.
        from imagewire.air_registry.loader import resolve_device
        from imagewire.server.engine import DiffusersEngine

        return DiffusersEngine(device=resolve_device(config.device), data_dir=config.data_dir,
                               allow_downloads=config.allow_downloads, max_batch_size=config.max_batch_size,
                               max_loaded_models=config.max_loaded_models, ram_models=config.ram_models,
                               device_memory_bytes=config.device_memory_bytes, quantize=config.quantize,
                               compile_denoisers=config.compile_denoisers)

    return build


def _require_preloadable(flag: str, name: str, entry: ModelEntry) -> None:
    """The device preloads models as imageInference pipelines: ControlNets, checkers, add-ons and tools are not
    one. Raises ValueError naming the flag: the operator's mistake, found at start."""
    if entry.category != "checkpoint" or ARCHITECTURES[entry.architecture].task != "imageInference":
        article = "an" if entry.category[:1] in ("a", "e", "i", "o", "u") else "a"
        raise ValueError(f"{flag} {name!r} is {article} {entry.category} model; name an imageInference checkpoint "
                         "(modelSearch with category checkpoint lists them)")


class ImagewireServer:
    device: DeviceService

    def __init__(self, config: Config, *, engine_factory: Callable[[], Engine] | None = None,
                 preload: bool = True, freeze_at_start: bool = False) -> None:
        """``freeze_at_start``: for a process that is this server and nothing else (``__main__``), see ``_start``."""
        self.config = config
        self.given_engine_factory = engine_factory
        self.engine_factory = engine_factory or (FakeEngine if config.engine == "fake"
                                                 else diffusers_engine_factory(config))
        self.preload = preload
        self.freeze_at_start = freeze_at_start
        self.generated_key: str | None = None
        self.connections: set[Connection] = set()  # open WebSockets, closed with 1001 at shutdown
        self._web: web.AppRunner | None = None
        self._sockets: list[socket.socket] = []        # bound at the start of start(), listening at its end
        self._listeners: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.models_folders: ModelsFolders | None = None
        self._models_watch: asyncio.Task[None] | None = None
        self.state: RedisState | None = None  # the link to Redis, with --state

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}/v1"

    async def start(self) -> None:
        # The port first: a taken one is said at once, not after the models have loaded.
        self._sockets = await asyncio.to_thread(bind, self.config.host, self.config.port)
        if self.config.port == 0:
            self.config = dataclasses.replace(self.config, port=self._sockets[0].getsockname()[1])
        try:
            await self._start()
        except BaseException:
            for listening in self._sockets:
                listening.close()
            raise

    async def _start(self) -> None:
        config = self.config
        keys = list(config.api_keys)
        if not keys:
            key, created = await asyncio.to_thread(load_or_create_key, config.data_dir)
            keys = [key]
            self.generated_key = key if created else None
            if not created:
                log.info("using the API key kept in %s", config.data_dir / "api-key")
        self.api_keys = ApiKeys(keys)
        # Checkpoints fetched from Civitai before are part of the catalog; the operator's files come after,
        # so that they can rename or replace them.
        civitai = Civitai(base_url=config.civitai_url, token=config.civitai_token,
                          models_dir=config.data_dir / "models", limits=DownloadLimits(
                              max_bytes=config.max_download_bytes, min_free_bytes=config.min_free_disk_bytes,
                              seconds=config.download_timeout))
        self.downloads = Downloads(workers=config.max_downloads, per_key=config.max_downloads_per_key)
        uploads = ModelUploads(models_dir=config.data_dir / "models", is_forbidden_address=is_forbidden_address,
                               limits=civitai.limits, allow_private=config.allow_private_urls)
        downloaded = [*await asyncio.to_thread(Civitai.downloaded_catalogs, civitai.models_dir),
                      *await asyncio.to_thread(ModelUploads.uploaded_catalogs, uploads.models_dir)]
        catalog = await asyncio.to_thread(Catalog.load, [*downloaded, *config.catalog_files],
                                          check_defaults=check_model_defaults)
        if config.models_dirs:
            # Read before the default model is looked for, so that it may be a file of these folders.
            self.models_folders = ModelsFolders(config.models_dirs, config.data_dir)
            await self._rescan_models(catalog)
        default_model = await self._default_model(catalog, civitai) if self.preload else None
        preloads = self._preloads(catalog, default_model)
        if config.engine == "ray":
            self.device = self._ray_device(preloads)
        else:
            self.device = DeviceQueue(self.engine_factory, queue_size=config.queue_size,
                                      max_batch_size=config.max_batch_size, max_passed_over=config.max_passed_over)
        fetcher = UrlFetcher(allow_private=config.allow_private_urls, max_bytes=config.max_image_bytes,
                             timeout=config.url_fetch_timeout)
        self.store = await asyncio.to_thread(open_store, config)
        self.sessions: Sessions
        self.registry: Tasks
        if config.state is not None:
            self.state = state = await open_state(config)
            self.sessions = state.session_registry(resume_window=config.resume_window,
                                                        max_outbox_bytes=MAX_OUTBOX_BYTES)
            self.registry = state.task_registry(retention=config.result_retention, max_kept_bytes=MAX_KEPT_BYTES)
            await state.start()
        else:
            self.sessions = SessionRegistry(resume_window=config.resume_window, max_outbox_bytes=MAX_OUTBOX_BYTES)
            self.registry = TaskRegistry(retention=config.result_retention, max_kept_bytes=MAX_KEPT_BYTES)
        self.services = Services(
            settings=Settings(data_dir=config.data_dir, allow_downloads=config.allow_downloads,
                              max_image_pixels=config.max_image_pixels, max_image_bytes=config.max_image_bytes,
                              price_per_gpu_second=config.price_per_gpu_second,
                              max_output_pixels=config.max_output_pixels,
                              upscale_tile_size=config.upscale_tile_size,
                              safety_checker=config.safety_checker,
                              needs_weights=config.needs_weights, weights_on_device=config.weights_on_device,
                              image_ttl=config.image_ttl),
            catalog=catalog, store=self.store, fetcher=fetcher, device=self.device, results=self.registry,
            pixels=PixelBudget(config.max_waiting_pixels), civitai=civitai, downloads=self.downloads,
            uploads=uploads)
        self.inbound = InboundBudget(config.max_inbound_bytes)
        self.metrics = Metrics(State(
            queue_depth=lambda: self.device.pending,
            loaded_models=lambda: [air for air, where in self.device.loaded_models.items() if where == "device"],
            device_memory=self.device.device_memory, connections=lambda: len(self.connections),
            sessions=lambda: len(self.sessions), ready=lambda: self.device.ready and self._web is not None,
            held_input_pixels=lambda: self.services.pixels.held,
            inbound_bytes=lambda: self.inbound.held, inbound_waiting=lambda: self.inbound.waiting,
            model_bytes=lambda: placed_bytes(self.device.memory_plans, self.device.loaded_models),
            replicas=(lambda: getattr(self.device, "replicas", [])) if config.engine == "ray" else None,
        ), max_batch_size=config.max_batch_size)
        self.device.on_call = self.metrics.device_call
        device_time = DeviceTime(config.device_seconds_per_key_hour) if config.device_seconds_per_key_hour else None
        if device_time is not None:
            self.device.on_use = device_time.use
        self.runner = TaskRunner(
            self.services, registry=self.registry, webhooks=WebhookSender(fetcher, attempts=config.webhook_attempts),
            admission=Admission(per_connection=config.max_tasks_in_flight, per_key=config.max_tasks_per_key,
                                device_time=device_time, per_connection_placeless=config.max_tasks_per_message),
            on_finished=self.metrics.task_finished)
        self.waiting_room = WaitingRoom(config.max_unauthenticated_per_ip)
        # Answer bytes per key and per socket; a full outbox may go at once.
        self.answers = AnswerBudget(config.answer_bytes_per_second, burst=config.max_outbox_bytes)
        self.trusted_proxies = networks(config.trusted_proxies)
        # Listen only once the engine exists and the default model is loaded: imports and loading
        # hold the GIL in long stretches, and clients should not see slow pongs meanwhile.
        await asyncio.to_thread(self.device.start)
        if self.freeze_at_start:
            # What exists now lives as long as the process: the modules imported (with torch, diffusers and
            # transformers, half a million objects), the catalog, the settings. Each full pass of the garbage
            # collector would walk them all, about 0.3 s with every socket waiting; frozen, they are left out.
            # Before any model loads, so that an evicted model's objects can still be collected.
            gc.collect()
            gc.freeze()
        if self.preload:
            for entry in preloads:
                await self._load_at_start(entry, flag="--default-model" if entry is default_model else "--preload")
        routes = HttpRoutes(store=self.store, device=self.device, metrics=self.metrics,
                            max_message_bytes=config.max_frame_bytes, inbound=self.inbound,
                            serve_socket=self._serve_socket, rest=self._rest,
                            reports=HostCheck(report_hosts(config), self.api_keys))
        install_log_limits(asyncio.get_running_loop())
        self.handshakes = HandshakeGuard(lambda: self._web_server(), timeout=config.handshake_timeout,
                                         per_address=config.max_handshakes_per_ip, trusted=self.trusted_proxies)
        application = routes.application()
        application.middlewares.append(request_arrived_middleware(self.handshakes))
        # Our own log line per task tells each task's story; per-request access lines would drown it.
        self._web = web.AppRunner(application, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await self._web.setup()
        loop = asyncio.get_running_loop()
        self._listeners = [await loop.create_server(self.handshakes, sock=listening, backlog=LISTEN_BACKLOG)
                           for listening in self._sockets]
        self.services.base_url = config.base_url
        self._sweeper = asyncio.create_task(self._sweep_forever())
        if self.models_folders is not None:
            self._models_watch = asyncio.create_task(self._watch_models(catalog))
        log.info("imagewire listening on %s (images at %s/image/)", self.url, config.base_url)

    async def _load_at_start(self, entry: ModelEntry, *, flag: str) -> None:
        """Load a model before listening. One that fails stops the start with one line naming it and why, or with
        --on-preload-failure continue, is left out with a warning (requests for it then say why)."""
        try:
            await asyncio.wrap_future(self.device.preload(entry))
        except Exception as exc:
            why = exc.describe(entry.air) if isinstance(exc, RegistryError) else _first_line(exc)
            if self.config.on_preload_failure == "stop":
                raise ValueError(f"{flag} {entry.air} could not be loaded: {why} (--on-preload-failure continue "
                                 "starts without it)") from None
            log.warning("%s %s could not be loaded, starting without it: %s", flag, entry.air, why)

    async def _default_model(self, catalog: Catalog, civitai: Civitai) -> ModelEntry:
        """The entry of ``--default-model``; a Civitai checkpoint is fetched first when downloads are on.

        Raises ValueError: a default model that does not exist is the operator's mistake.
        """
        name = self.config.default_model
        try:
            try:
                entry = catalog.resolve(name)
            except UnknownModel:
                air = parse_air(name)
                if not (self.config.allow_downloads and Civitai.names(air)):
                    raise
                entry = await self.downloads.run("", civitai.fetch, air)  # the operator's, before any key
                catalog.add(entry)
        except RegistryError as exc:
            raise ValueError(exc.describe("--default-model")) from exc
        _require_preloadable("--default-model", name, entry)
        return entry

    def _preloads(self, catalog: Catalog, default_model: ModelEntry | None) -> list[ModelEntry]:
        """The default model, then each --preload model, in order and once each; a name the catalog does not hold
        as an imageInference checkpoint stops the start (ValueError), naming the flag."""
        entries: dict[str, ModelEntry] = {}
        if default_model is not None:
            entries[default_model.air] = default_model
        for name in self.config.preload:
            try:
                entry = catalog.resolve(name)
            except RegistryError as exc:
                raise ValueError(exc.describe(f"--preload {name!r}:")) from exc
            _require_preloadable("--preload", name, entry)
            entries.setdefault(entry.air, entry)
        return list(entries.values())

    def _ray_device(self, preloads: list[ModelEntry]) -> DeviceService:
        """Ray Serve replicas as the device (``--engine ray``); Ray is imported only here."""
        import functools

        from imagewire.server.cluster import RayDevice, given_engine

        # What each replica builds its engine with, from its own settings (its device): sent to the replicas,
        # so a module-level function, or the factory this server was given.
        engine_for = (diffusers_engine_factory if self.given_engine_factory is None
                      else functools.partial(given_engine, self.given_engine_factory))
        return RayDevice(self.config, preloads, engine_for=engine_for)

    def _web_server(self) -> asyncio.Protocol:
        """aiohttp's protocol for one new connection."""
        assert self._web is not None and self._web.server is not None
        protocol: asyncio.Protocol = self._web.server()
        return protocol

    async def _rest(self, request: web.Request) -> web.Response:
        # Built per request from the current config: the port is only known once the server listens.
        return await RestEndpoint(config=self.config, api_keys=self.api_keys, runner=self.runner,
                                  inbound=self.inbound, answers=self.answers)(request)

    async def _serve_socket(self, websocket: web.WebSocketResponse, request: web.Request,
                            frames: FrameCounter | None) -> None:
        connection = Connection(websocket, request, peer_ip=client_address(request, self.trusted_proxies),
                                config=self.config, api_keys=self.api_keys, sessions=self.sessions,
                                runner=self.runner, waiting_room=self.waiting_room, answers=self.answers,
                                frames=frames)
        self.connections.add(connection)
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)

    async def _rescan_models(self, catalog: Catalog) -> None:
        """Bring the catalog in line with the models folders' files (read and hashed in a thread)."""
        assert self.models_folders is not None
        added, removed = await asyncio.to_thread(self.models_folders.rescan)
        for air in removed:
            catalog.remove(air)
            log.info("models folder: %s is gone", air)
        for entry in added:
            catalog.add(entry)
            if not entry.problem:
                log.info("models folder: %s (%s, %s) from %s", entry.air, entry.category, entry.architecture,
                         entry.location)

    async def _watch_models(self, catalog: Catalog) -> None:
        # A polling rescan: one stat per file every few seconds, where file-system events differ by platform.
        while True:
            await asyncio.sleep(MODELS_RESCAN_SECONDS)
            try:
                await self._rescan_models(catalog)
            except Exception:  # a folder that vanished, a full disk for the hash cache: try again next time
                log.exception("rescanning the models folders failed")

    async def _sweep_forever(self) -> None:
        last_store_sweep: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            sweep_store = last_store_sweep is None or loop.time() - last_store_sweep >= STORE_SWEEP_INTERVAL
            if sweep_store:
                last_store_sweep = loop.time()
            await self.sweep(store=sweep_store)
            await asyncio.sleep(SWEEP_INTERVAL)

    async def sweep(self, *, store: bool) -> None:
        """Forget expired sessions and task records, delete images past a task's ``ttl``; with ``store``, also
        images unused for the image TTL."""
        await self.sessions.sweep()
        await self.registry.sweep()
        try:
            # Every round (30 s): a ttl is as short as a minute, and this reads only the images that are due.
            expired = await self.store.expire()
            if expired:
                log.info("deleted %d images past their ttl", expired)
        except Exception:
            log.exception("deleting images past their ttl failed; serving goes on")
        if not store:
            return
        try:
            deleted = await self.store.sweep(max_age_seconds=self.config.image_ttl)
            if deleted:
                log.info("deleted %d images unused for %.1f days", deleted, self.config.image_ttl / 86400)
        except Exception:
            log.exception("sweeping the image store failed; serving goes on")

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening, let running tasks finish for up to ``grace`` seconds, close sockets with 1001."""
        if self._web is None or not self._listeners:
            return
        web_runner, self._web = self._web, None
        # Stop accepting new connections; the open sockets stay so running tasks can still deliver.
        for listener in self._listeners:
            listener.close()
        self.device.close_intake()
        grace = self.config.shutdown_grace if grace is None else grace
        running = self.runner.running
        if running:
            log.info("waiting up to %.0f s for %d running tasks", grace, len(running))
            _, unfinished = await asyncio.wait(set(running), timeout=grace)
            for task in unfinished:
                task.cancel()
            if unfinished:
                # Each cut-off task tells its client so before the sockets close.
                await asyncio.wait(unfinished, timeout=5.0)
        await self.runner.webhooks.close(timeout=min(grace, 5.0))
        await asyncio.gather(*(connection.close(GOING_AWAY) for connection in list(self.connections)))
        await web_runner.cleanup()
        if self._models_watch is not None:
            self._models_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._models_watch
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.state is not None:
            await self.state.close()
        self.downloads.close()
        await asyncio.to_thread(self.device.stop, grace)
        log.info("stopped")

    async def __aenter__(self) -> ImagewireServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()


def _first_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (a library's may run to pages)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def report_hosts(config: Config) -> tuple[str, ...]:
    """The host names /status and /metrics answer to without a key: the operator's, and --public-url's."""
    public = urllib.parse.urlsplit(config.public_url).hostname if config.public_url else None
    return (*config.allowed_hosts, *([public] if public else []))


async def open_state(config: Config) -> RedisState:
    """The link to the Redis ``--state`` names, answering; ValueError naming ``--state`` when Redis cannot be
    used (redis-py not installed, Redis unreachable or refusing the credentials): the server must not start then."""
    assert config.state is not None
    if importlib.util.find_spec("redis") is None:
        raise ValueError(f"--state {shown_url(config.state)}: redis-py is not installed; "
                         "pip install 'imagewire[redis]'")
    # Imported here: redis-py is an optional extra, needed only with --state.
    from imagewire.server.state import RedisState

    return await RedisState.connect(config.state)


def open_store(config: Config) -> ImageStorage:
    """The image store the config names: an S3-compatible bucket with ``--store``, else DATA_DIR/images.

    Raises ValueError naming ``--store`` when the bucket cannot be used: the server must not start then.
    """
    if config.store is not None:
        store = S3Store(S3Location.parse(config.store), endpoint_url=config.s3_endpoint, limits=StoreLimits(
            max_bytes=config.max_storage_bytes, max_bytes_per_owner=config.max_storage_bytes_per_key))
        log.info("images kept in %s", store.location)
        return store
    # Opening the store also removes what interrupted writes left behind.
    return ImageStore(config.data_dir / "images", StoreLimits(
        max_bytes=config.max_storage_bytes, max_bytes_per_owner=config.max_storage_bytes_per_key,
        min_free_bytes=config.min_free_disk_bytes))
