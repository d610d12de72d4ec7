"""Configuration: command-line flags, each with an ``IMAGEWIRE_*`` environment fallback."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagewire.storage.s3 import S3Location

MIB = 1024 * 1024


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("imagewire-data")
    api_keys: tuple[str, ...] = ()
    public_url: str | None = None
    device: str = "auto"
    allow_private_urls: bool = False
    allow_downloads: bool = False
    catalog_files: tuple[Path, ...] = ()
    default_model: str = "imagewire:tiny@1"
    # Bounds: past each one a client gets a clear error, never unbounded growth.
    max_frame_bytes: int = 64 * MIB
    max_inbound_bytes: int = 256 * MIB     # large inbound messages being received or handled, all sockets together
    max_tasks_per_message: int = 64
    max_tasks_in_flight: int = 64          # per connection
    max_tasks_per_key: int = 256           # unfinished tasks of one API key, all its connections together
    device_seconds_per_key_hour: float | None = None  # device time one API key may use an hour; None: no bound
    max_unauthenticated_per_ip: int = 16   # sockets from one address that have not authenticated yet
    auth_timeout: float = 30.0             # seconds a new socket has to authenticate
    queue_size: int = 256                  # inference jobs waiting for the GPU, all connections together
    max_batch_size: int = 4                # images per pipeline call; numberResults above it runs in chunks
    max_image_pixels: int = 4096 * 4096    # decoded input images (decompression bombs)
    max_image_bytes: int = 32 * MIB        # encoded input images, inline or fetched
    url_fetch_timeout: float = 15.0
    resume_window: float = 120.0           # undelivered results wait this long for the client to come back
    result_retention: float = 3600.0       # async results (and used taskUUIDs) are kept this long
    image_ttl: float = 30 * 24 * 3600.0    # stored images are deleted this long after their last use
    shutdown_grace: float = 30.0           # on SIGTERM, running tasks get this long to finish
    webhook_attempts: int = 4
    price_per_gpu_second: float = 0.0      # for includeCost
    max_output_pixels: int = 4096 * 4096   # results of upscaling
    max_storage_bytes: int | None = None   # the image store as a whole; None: no bound
    max_storage_bytes_per_key: int | None = None
    min_free_disk_bytes: int = 512 * MIB   # below this much free disk, writes stop (reads go on)
    store: str | None = None         # s3://BUCKET/PREFIX keeps images in an S3-compatible store; None: data_dir
    s3_endpoint: str | None = None   # the S3 API's URL (MinIO and the like); None: AWS's
    state: str | None = None         # redis://HOST:PORT/DB keeps sessions and task records in Redis; None: memory
    max_waiting_pixels: int = 256_000_000  # decoded input pixels held by unfinished tasks, all together
    handshake_timeout: float = 10.0        # seconds a new TCP connection has to send its HTTP request
    max_handshakes_per_ip: int = 16        # connections from one address still sending their request
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-For names the client
    max_outbox_bytes: int = 64 * MIB       # answers a socket has not yet taken, per connection
    send_timeout: float = 30.0             # seconds a client may leave answers untaken before it is closed
    upscale_tile_size: int = 512           # upscalers see tiles of at most this many input pixels a side
    log_level: str = "INFO"
    civitai_url: str = "https://civitai.com"   # Civitai's API, for civitai:MODEL@VERSION ids
    civitai_token: str | None = None            # for models Civitai lets only signed-in users download
    safety_checker: str = "imagewire:sd-safety-checker@1"   # the catalog model checkNSFW and safety run
    # Model memory: pipelines kept on the device, then in host RAM; models loaded at start.
    max_loaded_models: int = 1
    ram_models: int = 0
    preload: tuple[str, ...] = ()
    max_passed_over: int = 4               # times a queued job may be passed over for one whose model is loaded
    # The compute plane: the device in this process ("local"), or Ray Serve replicas ("ray", docs/cluster.md);
    # "fake": the device runs server/fake_engine.py, which answers every job at once without a model.
    engine: str = "local"
    ray_address: str | None = None   # HOST:PORT of a running Ray cluster's GCS; None: start one on 127.0.0.1
    replicas: int = 1                # fixed replica count, unless min_replicas/max_replicas autoscale
    min_replicas: int | None = None
    max_replicas: int | None = None

    @property
    def base_url(self) -> str:
        """Where clients reach this server over HTTP; the prefix of every imageURL."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def _env(name: str, default: str | None = None) -> str | None:
    """IMAGEWIRE_<name>; set but empty counts as unset."""
    return os.environ.get(f"IMAGEWIRE_{name}") or default


def _env_flag(name: str) -> bool:
    return (_env(name) or "").strip().lower() in ("1", "true", "yes", "on")


def _whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f"{minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value
    return convert


def _number(*, positive: bool) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"must be {'greater than 0' if positive else 'at least 0'}, got {text}")
        return value
    return convert


def _http_url(text: str) -> str:
    parsed = urllib.parse.urlsplit(text.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text.strip().rstrip("/")


def _host_port(text: str) -> str:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (the Ray head's GCS address), got {text!r}")
    return f"{host}:{int(port)}"


def _store(text: str) -> str:
    try:
        return str(S3Location.parse(text.strip()))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _state(text: str) -> str:
    parsed = urllib.parse.urlsplit(text.strip())
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname or not parsed.path.strip("/").isdigit() \
            and parsed.path.strip("/"):
        raise argparse.ArgumentTypeError(f"expected redis://HOST:PORT/DB (or rediss:// for TLS), got {text!r}")
    return text.strip()


def shown_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an address or a CIDR such as 10.0.0.0/8, got {text!r}") from None


# Defaults are the environment's strings, so argparse checks them with the same type as a flag would be.
COUNT = _whole_number(1)
AMOUNT = _whole_number(0)
PORT = _whole_number(0, 65535)
POSITIVE = _number(positive=True)
NON_NEGATIVE = _number(positive=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagewire-server",
        description=(
            "Self-hosted image inference server speaking Runware's WebSocket API. "
            "Clients connect to ws://HOST:PORT/v1; generated and uploaded images are served at "
            "http://HOST:PORT/image/<uuid>.<ext>. Every flag has an IMAGEWIRE_<NAME> environment fallback."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--host", default=_env("HOST", "127.0.0.1"), help="interface to listen on [IMAGEWIRE_HOST]")
    add("--port", type=PORT, default=_env("PORT", "8080"),
        help="port for WebSocket and HTTP; 0 picks a free one [IMAGEWIRE_PORT]")
    add("--data-dir", type=Path, default=Path(_env("DATA_DIR", "imagewire-data") or "imagewire-data"),
        help="where images, models and the generated API key live [IMAGEWIRE_DATA_DIR]")
    add("--api-key", dest="api_keys", action="append", default=None, metavar="KEY",
        help="accepted API key, repeatable [IMAGEWIRE_API_KEYS, comma-separated]; with none, one is "
             "generated at first start and kept in DATA_DIR/api-key")
    add("--public-url", default=_env("PUBLIC_URL"),
        help="base of the imageURLs handed out (default http://HOST:PORT) [IMAGEWIRE_PUBLIC_URL]")
    add("--device", default=_env("DEVICE", "auto"),
        help="auto, cpu, cuda or cuda:N [IMAGEWIRE_DEVICE]")
    add("--allow-private-urls", action="store_true", default=_env_flag("ALLOW_PRIVATE_URLS"),
        help="let URL inputs reach loopback, private and link-local addresses [IMAGEWIRE_ALLOW_PRIVATE_URLS]")
    add("--allow-downloads", action="store_true", default=_env_flag("ALLOW_DOWNLOADS"),
        help="download models this server does not have: catalog models missing from the Hugging Face cache, "
             "and civitai:MODEL@VERSION checkpoints from Civitai [IMAGEWIRE_ALLOW_DOWNLOADS]")
    add("--catalog", dest="catalog_files", action="append", type=Path, default=None, metavar="FILE",
        help="extra model catalog JSON file, repeatable [IMAGEWIRE_CATALOG, comma-separated]")
    add("--max-frame-mib", type=COUNT, default=_env("MAX_FRAME_MIB", "64"),
        help="largest inbound WebSocket message, MiB [IMAGEWIRE_MAX_FRAME_MIB]")
    add("--max-inbound-mib", type=COUNT, default=_env("MAX_INBOUND_MIB", "256"),
        help="large inbound messages (64 KiB and up) being received or handled, all sockets and REST requests "
             "together, MiB; past it sockets are read again as room comes back [IMAGEWIRE_MAX_INBOUND_MIB]")
    add("--queue-size", type=COUNT, default=_env("QUEUE_SIZE", "256"),
        help="inference jobs that may wait for the device [IMAGEWIRE_QUEUE_SIZE]")
    add("--max-batch-size", type=COUNT, default=_env("MAX_BATCH_SIZE", "4"),
        help="images per pipeline call: larger numberResults run in several calls, and waiting tasks with "
             "the same model and settings share calls up to this many images; 1 turns batching off "
             "[IMAGEWIRE_MAX_BATCH_SIZE]")
    add("--max-tasks-in-flight", type=COUNT, default=_env("MAX_TASKS_IN_FLIGHT", "64"),
        help="unfinished tasks per connection [IMAGEWIRE_MAX_TASKS_IN_FLIGHT]")
    add("--max-tasks-per-key", type=COUNT, default=_env("MAX_TASKS_PER_KEY", "256"),
        help="unfinished tasks per API key over all its connections [IMAGEWIRE_MAX_TASKS_PER_KEY]")
    add("--device-seconds-per-key-hour", type=NON_NEGATIVE, default=_env("DEVICE_SECONDS_PER_KEY_HOUR", "0"),
        help="device seconds one API key may use over any hour; past it its new tasks answer tooManyTasks "
             "until time comes back; 0: no bound [IMAGEWIRE_DEVICE_SECONDS_PER_KEY_HOUR]")
    add("--max-unauthenticated-per-ip", type=COUNT, default=_env("MAX_UNAUTHENTICATED_PER_IP", "16"),
        help="sockets from one address not yet authenticated [IMAGEWIRE_MAX_UNAUTHENTICATED_PER_IP]")
    add("--auth-timeout", type=POSITIVE, default=_env("AUTH_TIMEOUT", "30"),
        help="seconds a new socket has to authenticate [IMAGEWIRE_AUTH_TIMEOUT]")
    add("--max-image-mib", type=COUNT, default=_env("MAX_IMAGE_MIB", "32"),
        help="largest encoded input image, inline or fetched, MiB [IMAGEWIRE_MAX_IMAGE_MIB]")
    add("--max-image-megapixels", type=POSITIVE, default=_env("MAX_IMAGE_MEGAPIXELS", "16.7"),
        help="largest decoded input image [IMAGEWIRE_MAX_IMAGE_MEGAPIXELS]")
    add("--resume-window", type=NON_NEGATIVE, default=_env("RESUME_WINDOW", "120"),
        help="seconds undelivered results wait for a client to resume its session [IMAGEWIRE_RESUME_WINDOW]")
    add("--result-retention", type=POSITIVE, default=_env("RESULT_RETENTION", "3600"),
        help="seconds finished tasks' results stay available to getResponse [IMAGEWIRE_RESULT_RETENTION]")
    add("--image-ttl-days", type=POSITIVE, default=_env("IMAGE_TTL_DAYS", "30"),
        help="days after their last use that stored images are deleted [IMAGEWIRE_IMAGE_TTL_DAYS]")
    add("--shutdown-grace", type=NON_NEGATIVE, default=_env("SHUTDOWN_GRACE", "30"),
        help="seconds running tasks get to finish on SIGTERM/SIGINT [IMAGEWIRE_SHUTDOWN_GRACE]")
    add("--price-per-gpu-second", type=NON_NEGATIVE, default=_env("PRICE_PER_GPU_SECOND", "0"),
        help="cost reported with includeCost, per second of device time [IMAGEWIRE_PRICE_PER_GPU_SECOND]")
    add("--max-output-megapixels", type=POSITIVE, default=_env("MAX_OUTPUT_MEGAPIXELS", "16.78"),
        help="largest upscale result; larger ones are refused before any work [IMAGEWIRE_MAX_OUTPUT_MEGAPIXELS]")
    add("--upscale-tile", type=_whole_number(32), default=_env("UPSCALE_TILE", "512"),
        help="upscalers work on tiles of at most this many input pixels a side, so memory stays bounded for "
             "large images; larger tiles are faster where memory allows [IMAGEWIRE_UPSCALE_TILE]")
    add("--max-storage-gib", type=NON_NEGATIVE, default=_env("MAX_STORAGE_GIB", "0"),
        help="most the image store may hold, GiB; 0: no bound [IMAGEWIRE_MAX_STORAGE_GIB]")
    add("--max-storage-gib-per-key", type=NON_NEGATIVE, default=_env("MAX_STORAGE_GIB_PER_KEY", "0"),
        help="most one API key's images may take, GiB; 0: no bound [IMAGEWIRE_MAX_STORAGE_GIB_PER_KEY]")
    add("--min-free-disk-gib", type=NON_NEGATIVE, default=_env("MIN_FREE_DISK_GIB", "0.5"),
        help="free disk below which new images are refused and stored ones still served "
             "[IMAGEWIRE_MIN_FREE_DISK_GIB]")
    add("--store", type=_store, default=_env("STORE"), metavar="s3://BUCKET/PREFIX",
        help="keep uploaded and generated images in an S3-compatible bucket instead of DATA_DIR/images; "
             "credentials and region come from the standard AWS environment variables (AWS_ACCESS_KEY_ID, "
             "AWS_SECRET_ACCESS_KEY, AWS_REGION); needs pip install 'imagewire[s3]' [IMAGEWIRE_STORE]")
    add("--s3-endpoint", type=_http_url, default=_env("S3_ENDPOINT"), metavar="URL",
        help="URL of the S3 API for --store, for MinIO and other S3-compatible stores (default: AWS's) "
             "[IMAGEWIRE_S3_ENDPOINT]")
    add("--state", type=_state, default=_env("STATE"), metavar="redis://HOST:PORT/DB",
        help="keep sessions, task records and results in Redis, shared by every server using it, so a client may "
             "use any of them (default: this process's memory); a password goes in the URL "
             "(redis://:PASSWORD@HOST:PORT/DB), rediss:// is TLS; needs pip install 'imagewire[redis]' "
             "[IMAGEWIRE_STATE]")
    add("--max-waiting-megapixels", type=POSITIVE, default=_env("MAX_WAITING_MEGAPIXELS", "256"),
        help="decoded input images that unfinished tasks may hold, all together; past it a task's input image "
             "is refused with serviceUnavailable [IMAGEWIRE_MAX_WAITING_MEGAPIXELS]")
    add("--handshake-timeout", type=POSITIVE, default=_env("HANDSHAKE_TIMEOUT", "10"),
        help="seconds a new connection has to send its HTTP request [IMAGEWIRE_HANDSHAKE_TIMEOUT]")
    add("--max-handshakes-per-ip", type=COUNT, default=_env("MAX_HANDSHAKES_PER_IP", "16"),
        help="connections from one address still sending their request; past it the oldest is dropped "
             "[IMAGEWIRE_MAX_HANDSHAKES_PER_IP]")
    add("--trusted-proxy", dest="trusted_proxies", action="append", type=_network, default=None,
        metavar="CIDR",
        help="a reverse proxy whose X-Forwarded-For names the client, repeatable "
             "[IMAGEWIRE_TRUSTED_PROXIES, comma-separated]")
    add("--max-outbox-mib", type=COUNT, default=_env("MAX_OUTBOX_MIB", "64"),
        help="answers a connection has not taken yet, MiB; a task whose answer does not fit waits for room "
             "[IMAGEWIRE_MAX_OUTBOX_MIB]")
    add("--send-timeout", type=POSITIVE, default=_env("SEND_TIMEOUT", "30"),
        help="seconds a client may leave answers untaken before it is closed [IMAGEWIRE_SEND_TIMEOUT]")
    add("--log-level", default=_env("LOG_LEVEL", "INFO"), choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="[IMAGEWIRE_LOG_LEVEL]")
    add("--default-model", default=_env("DEFAULT_MODEL", "imagewire:tiny@1"), metavar="AIR",
        help="model loaded (and with --allow-downloads fetched) before the server listens, by AIR id or alias "
             "[IMAGEWIRE_DEFAULT_MODEL]")
    add("--civitai-url", default=_env("CIVITAI_URL", "https://civitai.com"), type=_http_url, metavar="URL",
        help="base URL of Civitai's API, which civitai:MODEL@VERSION checkpoints come from [IMAGEWIRE_CIVITAI_URL]")
    add("--civitai-token", default=_env("CIVITAI_TOKEN"), metavar="TOKEN",
        help="Civitai API token, for checkpoints only signed-in users may download [IMAGEWIRE_CIVITAI_TOKEN]")
    add("--safety-checker", default=_env("SAFETY_CHECKER", Config.safety_checker), metavar="AIR",
        help="catalog model (category safety) that checkNSFW and safety.checkContent/checkInputs run "
             "(default %(default)s) [IMAGEWIRE_SAFETY_CHECKER]")
    memory = parser.add_argument_group("model memory")
    memory.add_argument(
        "--max-loaded-models", type=COUNT, default=_env("MAX_LOADED_MODELS", "1"), metavar="N",
        help="models kept on the device, most recently used first; a request for another loads it and moves the "
             "least recently used out [IMAGEWIRE_MAX_LOADED_MODELS]")
    memory.add_argument(
        "--ram-models", type=AMOUNT, default=_env("RAM_MODELS", "0"), metavar="M",
        help="models moved out of the device are kept in host RAM, up to this many, so that switching back is a "
             "copy to the device rather than a load from disk; 0 frees them [IMAGEWIRE_RAM_MODELS]")
    memory.add_argument(
        "--preload", action="append", default=None, metavar="AIR",
        help="load this model at start, after the default model; repeatable, in order (the last ones stay on the "
             "device) [IMAGEWIRE_PRELOAD, comma-separated]")
    memory.add_argument(
        "--max-passed-over", type=AMOUNT, default=_env("MAX_PASSED_OVER", "4"), metavar="K",
        help="API keys take turns; within them the device takes a queued job whose model is loaded before ones "
             "whose model is not, but passes over no job more than this many times; 0 keeps strict turns "
             "[IMAGEWIRE_MAX_PASSED_OVER]")
    cluster = parser.add_argument_group("compute plane (docs/cluster.md)")
    cluster.add_argument(
        "--engine", choices=["local", "ray", "fake"], default=_env("ENGINE", "local"),
        help="local: this process runs the device; ray: Ray Serve replicas do, each with its own device queue "
             "and engine, and this server is a gateway to them; needs pip install 'imagewire[cluster]'; "
             "fake: no model runs, every task is answered at once with deterministic results (for testing "
             "client code; no torch, no weights) [IMAGEWIRE_ENGINE]")
    cluster.add_argument(
        "--ray-address", type=_host_port, default=_env("RAY_ADDRESS"), metavar="HOST:PORT",
        help="with --engine ray: join the running Ray cluster whose head is there (several gateways may join one "
             "and share its replicas); without it a cluster of this machine alone is started on 127.0.0.1 "
             "[IMAGEWIRE_RAY_ADDRESS]")
    cluster.add_argument(
        "--replicas", type=COUNT, default=_env("REPLICAS", "1"), metavar="N",
        help="with --engine ray: replicas, one device each (a GPU each where the cluster has GPUs, else CPU) "
             "[IMAGEWIRE_REPLICAS]")
    cluster.add_argument(
        "--min-replicas", type=AMOUNT, default=_env("MIN_REPLICAS"), metavar="N",
        help="with --engine ray and --max-replicas: autoscale between these bounds on queue depth instead of "
             "a fixed --replicas [IMAGEWIRE_MIN_REPLICAS]")
    cluster.add_argument(
        "--max-replicas", type=COUNT, default=_env("MAX_REPLICAS"), metavar="N",
        help="with --engine ray: the most replicas autoscaling starts [IMAGEWIRE_MAX_REPLICAS]")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    api_keys = args.api_keys
    if api_keys is None:
        api_keys = [k.strip() for k in (_env("API_KEYS") or "").split(",") if k.strip()]
    catalog_files = args.catalog_files
    if catalog_files is None:
        catalog_files = [Path(p.strip()) for p in (_env("CATALOG") or "").split(",") if p.strip()]
    preload = args.preload
    if preload is None:
        preload = [air.strip() for air in (_env("PRELOAD") or "").split(",") if air.strip()]
    trusted_proxies = args.trusted_proxies
    if trusted_proxies is None:
        try:
            trusted_proxies = [_network(p.strip()) for p in (_env("TRUSTED_PROXIES") or "").split(",") if p.strip()]
        except argparse.ArgumentTypeError as exc:
            parser.error(f"IMAGEWIRE_TRUSTED_PROXIES: {exc}")
    return Config(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        api_keys=tuple(api_keys),
        public_url=args.public_url,
        device=args.device,
        allow_private_urls=args.allow_private_urls,
        allow_downloads=args.allow_downloads,
        catalog_files=tuple(catalog_files),
        max_frame_bytes=args.max_frame_mib * 1024 * 1024,
        max_inbound_bytes=args.max_inbound_mib * MIB,
        queue_size=args.queue_size,
        max_batch_size=args.max_batch_size,
        max_tasks_in_flight=args.max_tasks_in_flight,
        max_tasks_per_key=args.max_tasks_per_key,
        device_seconds_per_key_hour=args.device_seconds_per_key_hour or None,
        max_unauthenticated_per_ip=args.max_unauthenticated_per_ip,
        auth_timeout=args.auth_timeout,
        max_image_bytes=args.max_image_mib * MIB,
        max_image_pixels=int(args.max_image_megapixels * 1_000_000),
        resume_window=args.resume_window,
        result_retention=args.result_retention,
        image_ttl=args.image_ttl_days * 24 * 3600,
        shutdown_grace=args.shutdown_grace,
        price_per_gpu_second=args.price_per_gpu_second,
        max_output_pixels=int(args.max_output_megapixels * 1_000_000),
        upscale_tile_size=args.upscale_tile,
        max_storage_bytes=_gib(args.max_storage_gib),
        max_storage_bytes_per_key=_gib(args.max_storage_gib_per_key),
        min_free_disk_bytes=_gib(args.min_free_disk_gib) or 0,
        store=args.store,
        s3_endpoint=args.s3_endpoint,
        state=args.state,
        max_waiting_pixels=int(args.max_waiting_megapixels * 1_000_000),
        handshake_timeout=args.handshake_timeout,
        max_handshakes_per_ip=args.max_handshakes_per_ip,
        trusted_proxies=tuple(trusted_proxies),
        max_outbox_bytes=args.max_outbox_mib * MIB,
        send_timeout=args.send_timeout,
        log_level=args.log_level,
        max_loaded_models=args.max_loaded_models,
        ram_models=args.ram_models,
        preload=tuple(preload),
        max_passed_over=args.max_passed_over,
        default_model=args.default_model,
        civitai_url=args.civitai_url,
        civitai_token=args.civitai_token,
        safety_checker=args.safety_checker,
        **_compute_plane(parser, args),
    )


def _compute_plane(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The --engine flags, checked together: one line names what does not fit."""
    if args.engine != "ray" and args.ray_address is not None:
        parser.error("--ray-address needs --engine ray")
    if (args.min_replicas is None) != (args.max_replicas is None):
        parser.error("--min-replicas and --max-replicas go together (autoscaling between them)")
    if args.min_replicas is not None and args.min_replicas > args.max_replicas:
        parser.error(f"--min-replicas {args.min_replicas} is more than --max-replicas {args.max_replicas}")
    return {"engine": args.engine, "ray_address": args.ray_address, "replicas": args.replicas,
            "min_replicas": args.min_replicas, "max_replicas": args.max_replicas}


def _gib(value: float) -> int | None:
    """GiB as bytes; 0 means no bound."""
    return int(value * 1024 ** 3) or None
