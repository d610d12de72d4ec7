"""Configuration: one definition of each setting, from which its flag, its ``IMAGEWIRE_*`` environment
fallback, its key in a ``--config`` TOML file, its default and its help all come.

Each :class:`Config` field an operator may set carries an :class:`Option` in its metadata. A value is
taken from the first of the flag, the environment and the config file that has one; with none of them
the field's own default stands, so ``parse_args([])`` and ``Config()`` agree by construction. Whatever
its source, a value goes through the option's one parser (and range check), then, for a flag counted
in MiB, GiB, megapixels or days, through its one :class:`Unit`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import ipaddress
import json
import math
import os
import sys
import tomllib
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from imagewire.air_registry.quantized import QUANTIZE_MODES
from imagewire.storage.s3 import S3Location

PROG = "imagewire-server"
MIB = 1024 * 1024


# Parsers: text from a flag or the environment to a value, or ArgumentTypeError saying what is wrong.
# ``allowed`` says what they take, for a config file's value of the wrong kind; ``toml`` is the kinds
# of TOML value they read.

@dataclass(frozen=True)
class WholeNumber:
    minimum: int
    maximum: int | None = None
    toml: tuple[type, ...] = (int,)

    @property
    def allowed(self) -> str:
        if self.maximum is None:
            return f"a whole number, at least {self.minimum}"
        return f"a whole number from {self.minimum} to {self.maximum}"

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            allowed = f"{self.minimum} to {self.maximum}" if self.maximum is not None else f"at least {self.minimum}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value


@dataclass(frozen=True)
class Number:
    positive: bool
    toml: tuple[type, ...] = (int, float)

    @property
    def allowed(self) -> str:
        return "a number greater than 0" if self.positive else "a number, at least 0"

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (self.positive and value == 0):
            raise argparse.ArgumentTypeError(
                f"must be {'greater than 0' if self.positive else 'at least 0'}, got {text}")
        return value


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]
    toml: tuple[type, ...] = (str,)

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(self.values)

    @property
    def metavar(self) -> str:
        return "{" + ",".join(self.values) + "}"

    def __call__(self, text: str) -> str:
        if text not in self.values:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r} (choose from {', '.join(repr(v) for v in self.values)})")
        return text


@dataclass(frozen=True)
class Text:
    """A string, checked and normalised by ``convert`` when given; its messages name what it expects."""

    allowed: str = "a string"
    convert: Callable[[str], Any] | None = None
    toml: tuple[type, ...] = (str,)

    def __call__(self, text: str) -> Any:
        return text if self.convert is None else self.convert(text)


Parser = WholeNumber | Number | Choice | Text

COUNT = WholeNumber(1)
AMOUNT = WholeNumber(0)
PORT = WholeNumber(0, 65535)
POSITIVE = Number(positive=True)
NON_NEGATIVE = Number(positive=False)
TEXT = Text()


@dataclass(frozen=True)
class Unit:
    """What one unit of a flag is in its field: the flag says MiB, the field counts bytes."""

    name: str
    size: float
    whole: bool   # the field counts whole things (bytes, pixels): a flag's 0.5 GiB is rounded to a byte

    def to_field(self, value: float) -> int | float:
        return round(value * self.size) if self.whole else value * self.size

    def to_flag(self, value: float) -> float:
        return value / self.size


MEBIBYTES = Unit("MiB", MIB, whole=True)
GIBIBYTES = Unit("GiB", 1024 ** 3, whole=True)
MEGAPIXELS = Unit("megapixels", 1_000_000, whole=True)
DAYS = Unit("days", 24 * 3600, whole=False)


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




@dataclass(frozen=True)
class Option:
    """How an operator sets one :class:`Config` field."""

    flag: str
    group: str
    help: str                          # what it does, true to the code; the default and env name are added
    parse: Parser = TEXT
    metavar: str | None = None
    unit: Unit | None = None
    zero_is_no_bound: bool = False     # 0, from any source, becomes None in the field
    switch: bool = False               # a flag without a value; true/false in a file
    repeatable: bool = False           # a list in a file, comma-separated in the environment
    env: str | None = None             # when not IMAGEWIRE_ and the flag's name
    shown_default: str | None = None   # for help, where the field's default (None, empty) stands for something

    @property
    def key(self) -> str:
        """Its key in a config file: the flag without its dashes."""
        return self.flag.removeprefix("--")

    @property
    def env_name(self) -> str:
        return self.env or "IMAGEWIRE_" + self.key.upper().replace("-", "_")

    def to_field(self, value: Any) -> Any:
        """A parsed flag value as the field holds it."""
        if self.repeatable:
            return tuple(value)
        if self.unit is not None:
            value = self.unit.to_field(value)
        if self.zero_is_no_bound and value == 0:
            return None
        return value


def setting(default: Any, flag: str, group: str, help: str, **option: Any) -> Any:
    """A Config field an operator sets, with its one default."""
    return field(default=default, metadata={"option": Option(flag, group, help, **option)})


# --help shows the options in these groups, in this order.
NETWORK = "network and auth"
LIMITS = "limits"
SESSIONS = "sessions and results"
MODELS = "models and device"
STORAGE = "storage"
CLUSTER = "cluster (docs/cluster.md)"
LOGGING = "logging"
GROUPS = (NETWORK, LIMITS, SESSIONS, MODELS, STORAGE, CLUSTER, LOGGING)


@dataclass(frozen=True)
class Config:
    host: str = setting("127.0.0.1", "--host", NETWORK, "interface to listen on")
    port: int = setting(8080, "--port", NETWORK, "port for WebSocket and HTTP; 0 picks a free one", parse=PORT)
    data_dir: Path = setting(
        Path("imagewire-data"), "--data-dir", STORAGE, "where images, models and the generated API key live",
        parse=Text("a path", Path), metavar="DIR")
    api_keys: tuple[str, ...] = setting(
        (), "--api-key", NETWORK, "accepted API key, repeatable", metavar="KEY", repeatable=True,
        env="IMAGEWIRE_API_KEYS", shown_default="one generated at first start and kept in DATA_DIR/api-key")
    public_url: str | None = setting(
        None, "--public-url", NETWORK, "base of each imageURL handed out; set it behind a reverse proxy",
        metavar="URL", shown_default="http://HOST:PORT")
    device: str = setting("auto", "--device", MODELS, "auto, cpu, cuda or cuda:N (auto: cuda where there is one)")
    allow_private_urls: bool = setting(
        False, "--allow-private-urls", NETWORK,
        "let URL inputs and webhooks reach loopback, private and link-local addresses", switch=True)
    allow_downloads: bool = setting(
        False, "--allow-downloads", MODELS,
        "download models this server does not have: catalog models missing from the Hugging Face cache, "
        "and civitai:MODEL@VERSION checkpoints from Civitai", switch=True)
    catalog_files: tuple[Path, ...] = setting(
        (), "--catalog", MODELS, "extra model catalog JSON file, repeatable", parse=Text("a path", Path),
        metavar="FILE", repeatable=True)
    models_dirs: tuple[Path, ...] = setting(
        (), "--models-dir", MODELS,
        "a ComfyUI or AUTOMATIC1111 models folder whose files become catalog models (local:NAME@HASH, the file "
        "name as alias), looked at again every few seconds; repeatable (docs/models.md)",
        parse=Text("a path", Path), metavar="DIR", repeatable=True)
    default_model: str = setting(
        "imagewire:tiny@1", "--default-model", MODELS,
        "model loaded (and with --allow-downloads fetched) before the server listens, by AIR id or alias",
        metavar="AIR")
    # Bounds: past each one a client gets a clear error, never unbounded growth.
    max_frame_bytes: int = setting(
        64 * MIB, "--max-frame-mib", LIMITS, "largest inbound WebSocket message, MiB", parse=COUNT, unit=MEBIBYTES)
    max_inbound_bytes: int = setting(
        256 * MIB, "--max-inbound-mib", LIMITS,
        "large inbound messages (64 KiB and up) being received or handled, all sockets and REST requests "
        "together, MiB; past it sockets are read again as room comes back", parse=COUNT, unit=MEBIBYTES)
    max_tasks_per_message: int = 64        # no flag: set only by whoever builds a Config
    max_tasks_in_flight: int = setting(
        64, "--max-tasks-in-flight", LIMITS,
        "unfinished tasks per connection; past it a new task answers serviceUnavailable", parse=COUNT)
    max_tasks_per_key: int = setting(
        256, "--max-tasks-per-key", LIMITS,
        "unfinished tasks per API key over all its connections; past it a new task answers serviceUnavailable",
        parse=COUNT)
    device_seconds_per_key_hour: float | None = setting(
        None, "--device-seconds-per-key-hour", LIMITS,
        "device seconds one API key may use over any hour; past it its new tasks answer serviceUnavailable "
        "until time comes back; 0: no bound", parse=NON_NEGATIVE, metavar="S", zero_is_no_bound=True)
    max_unauthenticated_per_ip: int = setting(
        16, "--max-unauthenticated-per-ip", NETWORK, "sockets from one address not yet authenticated",
        parse=COUNT)
    auth_timeout: float = setting(
        30.0, "--auth-timeout", NETWORK, "seconds a new socket has to authenticate", parse=POSITIVE)
    queue_size: int = setting(
        256, "--queue-size", LIMITS,
        "device jobs that may wait for the device, all connections together; past it a task answers "
        "serviceUnavailable", parse=COUNT)
    max_batch_size: int = setting(
        4, "--max-batch-size", MODELS,
        "images per pipeline call: larger numberResults run in several calls, and waiting tasks with the same "
        "model and settings share calls up to this many images; 1 turns batching off", parse=COUNT)
    max_image_pixels: int = setting(
        4096 * 4096, "--max-image-megapixels", LIMITS,
        "largest decoded input image, megapixels (4096x4096 is 16.777216)", parse=POSITIVE, unit=MEGAPIXELS)
    max_image_bytes: int = setting(
        32 * MIB, "--max-image-mib", LIMITS, "largest encoded input image, inline or fetched, MiB", parse=COUNT,
        unit=MEBIBYTES)
    url_fetch_timeout: float = 15.0        # no flag
    resume_window: float = setting(
        120.0, "--resume-window", SESSIONS, "seconds undelivered results wait for a client to resume its session",
        parse=NON_NEGATIVE)
    result_retention: float = setting(
        3600.0, "--result-retention", SESSIONS,
        "seconds finished tasks' results stay available to getResponse", parse=POSITIVE)
    image_ttl: float = setting(
        30 * 24 * 3600.0, "--image-ttl-days", STORAGE, "days after their last use that stored images are deleted",
        parse=POSITIVE, unit=DAYS)
    shutdown_grace: float = setting(
        30.0, "--shutdown-grace", SESSIONS, "seconds running tasks get to finish on SIGTERM/SIGINT",
        parse=NON_NEGATIVE)
    webhook_attempts: int = 4              # no flag
    price_per_gpu_second: float = setting(
        0.0, "--price-per-gpu-second", SESSIONS, "cost reported with includeCost, per second of device time",
        parse=NON_NEGATIVE)
    max_output_pixels: int = setting(
        4096 * 4096, "--max-output-megapixels", LIMITS,
        "largest upscale result, megapixels; larger ones are refused before any work", parse=POSITIVE,
        unit=MEGAPIXELS)
    max_storage_bytes: int | None = setting(
        None, "--max-storage-gib", STORAGE, "most the image store may hold, GiB; 0: no bound", parse=NON_NEGATIVE,
        unit=GIBIBYTES, zero_is_no_bound=True)
    max_storage_bytes_per_key: int | None = setting(
        None, "--max-storage-gib-per-key", STORAGE, "most one API key's images may take, GiB; 0: no bound",
        parse=NON_NEGATIVE, unit=GIBIBYTES, zero_is_no_bound=True)
    min_free_disk_bytes: int = setting(
        512 * MIB, "--min-free-disk-gib", STORAGE,
        "free disk, GiB, below which new images are refused and stored ones still served", parse=NON_NEGATIVE,
        unit=GIBIBYTES)
    store: str | None = setting(
        None, "--store", STORAGE,
        "keep uploaded and generated images in an S3-compatible bucket instead of DATA_DIR/images; credentials "
        "and region come from the standard AWS environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_REGION); needs pip install 'imagewire[s3]'", parse=Text("s3://BUCKET/PREFIX", _store),
        metavar="s3://BUCKET/PREFIX", shown_default="DATA_DIR/images")
    s3_endpoint: str | None = setting(
        None, "--s3-endpoint", STORAGE, "URL of the S3 API for --store, for MinIO and other S3-compatible stores",
        parse=Text("an http:// or https:// URL", _http_url), metavar="URL", shown_default="AWS's")
    state: str | None = setting(
        None, "--state", CLUSTER,
        "keep sessions, task records and results in Redis, shared by every server using it, so a client may use "
        "any of them; a password goes in the URL (redis://:PASSWORD@HOST:PORT/DB), rediss:// is TLS; needs pip "
        "install 'imagewire[redis]'", parse=Text("redis://HOST:PORT/DB", _state),
        metavar="redis://HOST:PORT/DB", shown_default="this process's memory")
    max_waiting_pixels: int = setting(
        256_000_000, "--max-waiting-megapixels", LIMITS,
        "decoded input images that unfinished tasks may hold, all together; past it a task's input image is "
        "refused with serviceUnavailable", parse=POSITIVE, unit=MEGAPIXELS)
    handshake_timeout: float = setting(
        10.0, "--handshake-timeout", NETWORK, "seconds a new connection has to send its HTTP request",
        parse=POSITIVE)
    max_handshakes_per_ip: int = setting(
        16, "--max-handshakes-per-ip", NETWORK,
        "connections from one address still sending their request; past it the oldest is dropped", parse=COUNT)
    trusted_proxies: tuple[str, ...] = setting(
        (), "--trusted-proxy", NETWORK, "a reverse proxy whose X-Forwarded-For names the client, repeatable",
        parse=Text("an address or a CIDR such as 10.0.0.0/8", _network), metavar="CIDR",
        repeatable=True, env="IMAGEWIRE_TRUSTED_PROXIES")
    allowed_hosts: tuple[str, ...] = setting(
        (), "--allowed-host", NETWORK,
        "a host name /status and /metrics answer to without an API key, repeatable; addresses, localhost and "
        "--public-url's host always are, * allows any (other requests need Authorization: Bearer KEY, so that no "
        "web page can read them through a name it points here)",
        parse=Text("a host name, or *", str.strip), metavar="NAME", repeatable=True, env="IMAGEWIRE_ALLOWED_HOSTS")
    max_outbox_bytes: int = setting(
        64 * MIB, "--max-outbox-mib", LIMITS,
        "answers a connection has not taken yet, MiB; a task whose answer does not fit waits for room",
        parse=COUNT, unit=MEBIBYTES)
    answer_bytes_per_second: int = setting(
        32 * MIB, "--answer-mib-per-second", LIMITS,
        "answer bytes one API key may be sent per second over all its connections (and a socket its own pongs), "
        "MiB, each frame counted as at least 64 KiB; answers past it wait, so a storm of cheap tasks is slowed "
        "while other keys are not; a burst of --max-outbox-mib goes at once", parse=COUNT, unit=MEBIBYTES)
    send_timeout: float = setting(
        30.0, "--send-timeout", SESSIONS, "seconds a client may leave answers untaken before it is closed",
        parse=POSITIVE)
    upscale_tile_size: int = setting(
        512, "--upscale-tile", MODELS,
        "upscalers work on tiles of at most this many input pixels a side, so memory stays bounded for large "
        "images; larger tiles are faster where memory allows", parse=WholeNumber(32))
    log_level: str = setting(
        "INFO", "--log-level", LOGGING,
        "the least severe log records written to standard error",
        parse=Choice(("DEBUG", "INFO", "WARNING", "ERROR")))
    civitai_url: str = setting(
        "https://civitai.com", "--civitai-url", MODELS,
        "base URL of Civitai's API, which civitai:MODEL@VERSION checkpoints come from",
        parse=Text("an http:// or https:// URL", _http_url), metavar="URL")
    civitai_token: str | None = setting(
        None, "--civitai-token", MODELS, "Civitai API token, for checkpoints only signed-in users may download",
        metavar="TOKEN")
    max_downloads: int = setting(
        2, "--max-downloads", MODELS,
        "model downloads at once, server-wide, each on a thread of its own (never the threads that serve tasks)",
        parse=COUNT)
    max_downloads_per_key: int = setting(
        1, "--max-downloads-per-key", MODELS,
        "model downloads one API key may have at once; its others wait for them", parse=COUNT)
    max_download_bytes: int | None = setting(
        64 * 1024 ** 3, "--max-download-gib", MODELS,
        "largest model file downloaded, GiB, announced or counted as it arrives; 0: no bound",
        parse=NON_NEGATIVE, unit=GIBIBYTES, zero_is_no_bound=True)
    download_timeout: float = setting(
        3600.0, "--download-timeout", MODELS, "seconds one model download may take, first byte to last",
        parse=POSITIVE)
    safety_checker: str = setting(
        "imagewire:sd-safety-checker@1", "--safety-checker", MODELS,
        "catalog model (category safety) that checkNSFW and safety.checkContent/checkInputs run", metavar="AIR")
    # Model memory: pipelines kept on the device, then in host RAM; models loaded at start.
    max_loaded_models: int = setting(
        1, "--max-loaded-models", MODELS,
        "models kept on the device, most recently used first; a request for another loads it and moves the "
        "least recently used out", parse=COUNT, metavar="N")
    ram_models: int = setting(
        0, "--ram-models", MODELS,
        "models moved out of the device are kept in host RAM, up to this many, so that switching back is a copy "
        "to the device rather than a load from disk; 0 frees them", parse=AMOUNT, metavar="M")
    device_memory_bytes: int | None = setting(
        None, "--device-memory-gib", MODELS,
        "device memory the models and their calls may use, GiB; each model is placed to fit it before it loads "
        "(all on the device, text encoders in host RAM, model offload, sequential offload) or refused; on a CUDA "
        "device it is capped by what the device has free at start", parse=POSITIVE, unit=GIBIBYTES,
        shown_default="what the device has free")
    quantize: str = setting(
        "none", "--quantize", MODELS,
        "quantize the transformer and T5 of FLUX.1 and SD 3 models as they load, weight-only (torchao; needs "
        "pip install 'imagewire[quantize]'): int8 or float8 weights take about half the memory of bfloat16 ones; "
        "a catalog entry's \"quantize\" wins; UNet models and GGUF files are left as they are",
        parse=Choice(QUANTIZE_MODES))
    compile_denoisers: bool = setting(
        False, "--compile", MODELS,
        "compile the repeated blocks of each model's UNet or transformer as it loads (torch.compile, dynamic "
        "shapes) and warm them up before the model is ready, so no request waits on the compiler; faster on "
        "GPUs, not on CPUs (BENCHMARKS.md); a catalog entry's \"compile\" wins", switch=True)
    preload: tuple[str, ...] = setting(
        (), "--preload", MODELS,
        "load this model at start, after the default model; repeatable, in order (the last ones stay on the "
        "device)", metavar="AIR", repeatable=True)
    on_preload_failure: str = setting(
        "stop", "--on-preload-failure", MODELS,
        "what a model loaded at start (--default-model, --preload) that cannot be loaded or downloaded does: stop "
        "the start with one line naming it and why, or continue without it (with a warning; its requests then say "
        "why)",
        parse=Choice(("stop", "continue")))
    max_passed_over: int = setting(
        4, "--max-passed-over", MODELS,
        "API keys take turns; within them the device takes a queued job whose model is loaded before ones whose "
        "model is not, but passes over no job more than this many times; 0 keeps strict turns", parse=AMOUNT,
        metavar="K")
    # The compute plane: the device in this process ("local"), or Ray Serve replicas ("ray", docs/cluster.md).
    engine: str = setting(
        "local", "--engine", CLUSTER,
        "local: this process runs the device; ray: Ray Serve replicas do, each with its own device queue and "
        "engine, and this server is a gateway to them, needs pip install 'imagewire[cluster]'; fake: an engine "
        "that imports no torch and returns deterministic pattern images at once, for testing client code",
        parse=Choice(("local", "ray", "fake")))
    ray_address: str | None = setting(
        None, "--ray-address", CLUSTER,
        "with --engine ray: join the running Ray cluster whose head is there (several gateways may join one and "
        "share its replicas); without it a cluster of this machine alone is started on 127.0.0.1",
        parse=Text("HOST:PORT", _host_port), metavar="HOST:PORT")
    replicas: int = setting(
        1, "--replicas", CLUSTER,
        "with --engine ray: replicas, one device each (a GPU each where the cluster has GPUs, else CPU)",
        parse=COUNT, metavar="N")
    min_replicas: int | None = setting(
        None, "--min-replicas", CLUSTER,
        "with --engine ray and --max-replicas: autoscale between these bounds on queue depth instead of a fixed "
        "--replicas", parse=AMOUNT, metavar="N")
    max_replicas: int | None = setting(
        None, "--max-replicas", CLUSTER, "with --engine ray: the most replicas autoscaling starts", parse=COUNT,
        metavar="N")
    replica_wait: float = setting(
        300.0, "--replica-wait", CLUSTER,
        "with --engine ray: seconds a task may wait while the cluster has no replica running (none started yet, "
        "or all stopped) before it answers serviceUnavailable; a task queued behind others waits as long as "
        "its turn takes", parse=POSITIVE, metavar="SECONDS")

    @property
    def needs_weights(self) -> bool:
        """Whether the engine reads model weights: every engine but the fake, which serves models without files."""
        return self.engine != "fake"

    @property
    def weights_on_device(self) -> bool:
        """Whether the device finds model weights itself: each Ray replica on its own machine, not the gateway."""
        return self.engine == "ray"

    @property
    def base_url(self) -> str:
        """Where clients reach this server over HTTP; the prefix of every imageURL."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


# The options by field name, in the order of Config's fields.
OPTIONS: dict[str, Option] = {
    each.name: each.metadata["option"] for each in fields(Config) if "option" in each.metadata}
DEFAULTS: dict[str, Any] = {each.name: each.default for each in fields(Config)}


def version() -> str:
    try:
        return importlib.metadata.version("imagewire")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "(version unknown: not installed)"


def _plain(value: Any) -> str:
    """A default as one would type it: 30, not 30.0."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def shown_default(name: str, option: Option) -> str | None:
    """The default as --help shows it, in the flag's unit; None where there is nothing to show."""
    if option.shown_default is not None:
        return option.shown_default
    default = DEFAULTS[name]
    if default is None:
        return "0" if option.zero_is_no_bound else None
    if option.switch or option.repeatable:  # off, and none: nothing to show
        return None
    if option.unit is not None:
        default = option.unit.to_flag(default)
    return _plain(default)


def _help(name: str, option: Option) -> str:
    env = f"{option.env_name}, comma-separated" if option.repeatable else option.env_name
    text = f"{option.help} [{env}]"
    default = shown_default(name, option)
    if default is not None:
        text += f" (default: {default})"
    return text.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage="%(prog)s [options]",
        description=(
            "Self-hosted image inference server speaking Runware's WebSocket API. "
            "Clients connect to ws://HOST:PORT/v1; generated and uploaded images are served at "
            "http://HOST:PORT/image/<uuid>.<ext>. Every flag has an IMAGEWIRE_<NAME> environment fallback and a "
            "key in a --config file; a flag wins over the environment, which wins over the file."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS,
        help="read settings from this TOML file, keyed by flag name without its dashes (port = 8080, "
             "api-key = [\"...\"], allow-downloads = true); paths in it are taken as on the command line "
             "[IMAGEWIRE_CONFIG]")
    groups = {title: parser.add_argument_group(title) for title in GROUPS}
    for name, option in OPTIONS.items():
        group = groups[option.group]
        if option.switch:
            group.add_argument(option.flag, dest=name, action="store_true", default=argparse.SUPPRESS,
                               help=_help(name, option))
            continue
        metavar = option.metavar or (option.parse.metavar if isinstance(option.parse, Choice)
                                     else option.key.upper().replace("-", "_"))
        group.add_argument(option.flag, dest=name, action="append" if option.repeatable else "store",
                           type=option.parse, default=argparse.SUPPRESS, metavar=metavar, help=_help(name, option))
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """The Config from flags, then the environment, then a --config file, then the defaults: the first
    source that has a value for a setting gives it. A wrong value stops the start with one line (exit 2)."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    path = given.pop("config", None) or _environment("IMAGEWIRE_CONFIG")
    from_file = _read_file(path) if path else {}
    values: dict[str, Any] = {}
    for name, option in OPTIONS.items():
        if name in given:
            value = given[name]
        elif (text := _environment(option.env_name)) is not None:
            value = _from_environment(option, text)
        elif option.key in from_file:
            value = from_file[option.key]
        else:
            continue
        values[name] = option.to_field(value)
    config = Config(**values)
    _check_compute_plane(config)
    return config


def stop(message: str) -> NoReturn:
    """End the start with one line, as argparse ends it for a bad flag (exit status 2), less the usage:
    the command line is not what is wrong."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _environment(name: str) -> str | None:
    """An environment variable; set but empty counts as unset."""
    return os.environ.get(name) or None


def _from_environment(option: Option, text: str) -> Any:
    if option.switch:
        return text.strip().lower() in ("1", "true", "yes", "on")
    try:
        if option.repeatable:
            return [option.parse(each.strip()) for each in text.split(",") if each.strip()]
        return option.parse(text)
    except argparse.ArgumentTypeError as exc:
        stop(f"argument {option.flag}: {exc} (from {option.env_name})")


def _read_file(path: str) -> dict[str, Any]:
    """The file's values by key, parsed and checked as the same flags' would be."""
    where = f"--config {path}"
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        stop(f"{where}: cannot read it: {exc.strerror or exc}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # TOML is UTF-8
        stop(f"{where}: not valid TOML: {exc}")
    options = {option.key: option for option in OPTIONS.values()}
    values: dict[str, Any] = {}
    for key, value in table.items():
        option = options.get(key)
        if option is None:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            stop(f'{where}: unknown key "{key}"{hint}; known keys: {", ".join(options)}')
        values[key] = _from_file(where, option, value)
    return values


def _from_file(where: str, option: Option, value: Any) -> Any:
    def wrong(allowed: str) -> NoReturn:
        stop(f'{where}: key "{option.key}" must be {allowed}, got {_toml(value)}')

    if option.switch:
        if not isinstance(value, bool):
            wrong("true or false")
        return value
    parse = option.parse
    if option.repeatable and not isinstance(value, list):
        wrong(f"a list, each {parse.allowed}")
    parsed = []
    for each in value if option.repeatable else [value]:
        if isinstance(each, bool) or not isinstance(each, parse.toml):  # TOML's true is no number
            wrong(f"a list, each {parse.allowed}" if option.repeatable else parse.allowed)
        try:
            parsed.append(parse(each if isinstance(each, str) else repr(each)))
        except argparse.ArgumentTypeError as exc:
            if not isinstance(parse, Text):
                wrong(parse.allowed)
            stop(f'{where}: key "{option.key}": {exc}')
    return parsed if option.repeatable else parsed[0]


def _toml(value: Any) -> str:
    """A value as the file spells it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, default=str, ensure_ascii=False)


def _check_compute_plane(config: Config) -> None:
    """The --engine settings, checked together: one line names what does not fit."""
    if config.engine != "ray" and config.ray_address is not None:
        stop("--ray-address needs --engine ray")
    if (config.min_replicas is None) != (config.max_replicas is None):
        stop("--min-replicas and --max-replicas go together (autoscaling between them)")
    low, high = config.min_replicas, config.max_replicas
    if low is not None and high is not None and low > high:
        stop(f"--min-replicas {low} is more than --max-replicas {high}")
