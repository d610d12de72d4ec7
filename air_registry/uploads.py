"""Models a client adds by URL (``modelUpload``): the file fetched with the bounds of every download, checked,
and kept under ``models/upload-SOURCE-ID-VERSION/`` in the data dir with a one-entry catalog file beside it.

The URL is the client's, so it is fetched as an image URL is (``storage/fetch.py``): http or https only, the
host resolved once and every address it has checked (no loopback, private, link-local or otherwise
non-public address unless ``--allow-private-urls``), the connection made to the checked address (the host
name kept for TLS and the Host header), and each redirect checked the same way. The download is bounded as a
Civitai one is (``DownloadLimits``: its size announced or not, the free disk it leaves while it is written,
its total time), on the server's download threads (``tasks/downloads.py``).

The file is written under a temporary name in its folder. It is kept only once it checks out: a complete
safetensors file (its header, and every byte the header promises), the SHA-256 the client named as its
``uniqueIdentifier`` where that is a SHA-256, and tensors of the architecture the client stated. Then it is
renamed, and the catalog file written last, so a folder is complete exactly when its catalog file exists;
whatever fails on the way leaves nothing behind. An upload of an AIR that was uploaded before with the same
``uniqueIdentifier`` keeps its file and rewrites only the catalog file (the public API's rule for updates).

Blocking (``http.client``): callers run ``download`` and ``store`` in threads.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from imagewire.air_registry.air import AIR
from imagewire.air_registry.architectures import ARCHITECTURES
from imagewire.air_registry.catalog import ModelEntry, read_catalog_file
from imagewire.air_registry.checkpoints import detect_architecture, matches, tensor_shapes
from imagewire.air_registry.civitai import DownloadLimits
from imagewire.air_registry.errors import RegistryError, shown
from imagewire.air_registry.models_dir import NotOfCategory, UnloadableLoraFormat, add_on_architecture

log = logging.getLogger("imagewire.downloads")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PREFIX = "upload"
CATALOG_FILE = "catalog.json"
MODEL_FILE = "model.safetensors"
_UPLOAD_RECORD = "upload.json"   # the uniqueIdentifier the kept file came with
_CHUNK = 1024 * 1024
_TIMEOUT = 60.0          # seconds without a byte before a request is given up
_MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_SAFE_TARGET = "/?=&%:@!$'()*+,;-._~[]"
_LATENT_CHANNELS = 4  # of the SD 1.x/2.x and SDXL VAEs, the only ones a request can swap in
_LABELS = {"checkpoint": "a checkpoint", "lora": "a LoRA", "vae": "a VAE", "controlnet": "a ControlNet",
           "embeddings": "an embedding"}  # each catalog category in messages


class UploadFailed(RegistryError):
    """The upload cannot be made; ``parameter`` names the request field it is about, ``server_side`` says the
    server (its disk), not the request, is why."""

    def __init__(self, problem: str, *, parameter: str, server_side: bool = False,
                 allowed_values: list[str] | None = None) -> None:
        super().__init__(problem, allowed_values=allowed_values)
        self.parameter = parameter
        self.server_side = server_side

    def describe(self, name: str) -> str:
        return self.problem


@dataclass(frozen=True)
class Upload:
    """What a modelUpload asks for, checked: the catalog entry it becomes lacks only the file's checks."""

    air: AIR
    url: str
    url_parameter: str               # downloadURL or downloadUrl, as the client spelled it
    category: str                    # the catalog's: checkpoint, lora, vae, controlnet, embeddings
    architectures: tuple[str, ...]   # what the stated architecture may be here
    stated: str                      # the architecture as the client wrote it
    unique_identifier: str
    entry: dict[str, Any] = field(default_factory=dict)   # the catalog entry, but its architecture
    type: str | None = None          # a checkpoint's: base, inpainting, refiner
    format: str = "safetensors"      # the file format stated (the only one taken)
    stated_category: str = ""        # the category as the client wrote it (lycoris is kept as a LoRA)


def checkpoint_type(architecture: str) -> str:
    """base, inpainting or refiner: what modelSearch says of a checkpoint of this architecture."""
    if architecture.endswith("-inpaint") or architecture == "flux1-fill":
        return "inpainting"
    if architecture.endswith("-refiner"):
        return "refiner"
    return "base"


class ModelUploads:
    """Fetches uploaded models into ``models_dir`` (the data dir's ``models``)."""

    def __init__(self, *, models_dir: Path, is_forbidden_address: Callable[[IPAddress], bool],
                 limits: DownloadLimits | None = None, allow_private: bool = False) -> None:
        # The outbound address rule is the URL fetcher's (storage/fetch.py), handed in: one rule for every
        # request this server makes on a client's behalf.
        self.models_dir = Path(models_dir)
        self.is_forbidden_address = is_forbidden_address
        self.limits = limits or DownloadLimits()
        self.allow_private = allow_private

    def folder(self, air: AIR) -> Path:
        return self.models_dir / f"{PREFIX}-{air.source}-{air.id}-{air.version}"

    @staticmethod
    def uploaded_catalogs(models_dir: Path) -> list[Path]:
        """The catalog files of every complete upload under ``models_dir``, for ``Catalog.load``."""
        return sorted(Path(models_dir).glob(f"{PREFIX}-*-*-*/{CATALOG_FILE}"))

    def kept(self, upload: Upload) -> bool:
        """Whether this AIR's file is here already from an upload with the same uniqueIdentifier."""
        folder = self.folder(upload.air)
        try:
            record = json.loads((folder / _UPLOAD_RECORD).read_text())
        except (OSError, ValueError):
            return False
        return (folder / MODEL_FILE).is_file() and record.get("uniqueIdentifier") == upload.unique_identifier

    # ---------------------------------------------------------------- download

    def partial(self, upload: Upload) -> Path:
        """Where ``download`` writes: a temporary name in the upload's folder."""
        return self.folder(upload.air) / f".upload-{os.getpid()}-{time.monotonic_ns()}.part"

    def download(self, upload: Upload, partial: Path, stop: threading.Event | None = None) -> Path:
        """The file at the upload's URL, bounded and hashed, written to ``partial`` (the caller passes it to
        ``store``, or removes it); ``stop`` set ends the download (its task was cancelled)."""
        folder = partial.parent
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(".upload-*.part"):  # what a process killed mid-download left
            if leftover != partial:
                leftover.unlink(missing_ok=True)
        try:
            digest = self._copy(upload, partial, stop)
            expected = upload.unique_identifier
            if _SHA256.fullmatch(expected) and digest != expected.lower():
                raise UploadFailed(
                    f"uniqueIdentifier {expected} is a SHA-256, and the file from {self._origin(upload.url)} has "
                    f"SHA-256 {digest}: it is not the file named; nothing was kept", parameter="uniqueIdentifier")
        except BaseException:
            partial.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if nothing else is in it
            raise
        return partial

    def _copy(self, upload: Upload, partial: Path, stop: threading.Event | None) -> str:
        limits, parameter = self.limits, upload.url_parameter
        digest = hashlib.sha256()
        received = 0
        deadline = None if limits.seconds is None else time.monotonic() + limits.seconds
        with self._open(upload.url, parameter) as (response, origin), open(partial, "wb") as out:
            length = response.getheader("Content-Length")
            total = int(length) if length and length.isdigit() else None
            self._check_size(total, f"{origin} announces", parameter)
            try:
                while chunk := response.read(_CHUNK):
                    if stop is not None and stop.is_set():
                        raise UploadFailed(f"{parameter}: the upload was cancelled; nothing was kept",
                                           parameter=parameter)
                    received += len(chunk)
                    self._check_size(received, "the file passed", parameter)
                    self._check_room(partial, len(chunk), parameter)
                    if deadline is not None and time.monotonic() > deadline:
                        raise UploadFailed(
                            f"{parameter}: the download from {origin} took longer than {limits.seconds:.0f} s "
                            "(--download-timeout); nothing was kept", parameter=parameter)
                    out.write(chunk)
                    digest.update(chunk)
            except (OSError, http.client.HTTPException) as exc:
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    raise UploadFailed(f"{parameter}: the server's disk is full; nothing was kept",
                                       parameter=parameter, server_side=True) from exc
                raise UploadFailed(f"{parameter}: the download from {origin} broke off ({type(exc).__name__}); "
                                   "nothing was kept", parameter=parameter) from exc
        if total is not None and received != total:
            raise UploadFailed(f"{parameter}: the download from {origin} ended after {received} of {total} bytes; "
                               "nothing was kept", parameter=parameter)
        return digest.hexdigest()

    def _check_size(self, size: int | None, what: str, parameter: str) -> None:
        bound = self.limits.max_bytes
        if size is not None and bound is not None and size > bound:
            raise UploadFailed(f"{parameter}: {what} {_gib(size)}, more than the {_gib(bound)} a download may be "
                               "(--max-download-gib); nothing was kept", parameter=parameter)

    def _check_room(self, partial: Path, coming: int, parameter: str) -> None:
        reserve = self.limits.min_free_bytes
        if reserve is not None and shutil.disk_usage(partial.parent).free - coming < reserve:
            raise UploadFailed(f"{parameter}: the server's disk would have less than the {_gib(reserve)} free it "
                               "keeps (--min-free-disk-gib); nothing was kept", parameter=parameter, server_side=True)

    @contextmanager
    def _open(self, url: str, parameter: str) -> Iterator[tuple[http.client.HTTPResponse, str]]:
        """A 2xx answer to GET ``url``, redirects followed, every address checked."""
        for _ in range(_MAX_REDIRECTS + 1):
            scheme, host, port, target = self.parse_url(url, parameter)
            origin = self._origin(url)
            address = self._address(host, port, origin, parameter)
            kind = _PinnedTLS if scheme == "https" else _Pinned
            connection = kind(host, port, address=address, timeout=_TIMEOUT)
            try:
                connection.request("GET", target, headers={"User-Agent": "imagewire", "Accept-Encoding": "identity"})
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                raise UploadFailed(f"{parameter} {origin} could not be reached ({type(exc).__name__}); nothing was "
                                   "kept", parameter=parameter) from exc
            try:
                if response.status in _REDIRECTS and response.getheader("Location"):
                    url = urljoin(url, response.getheader("Location") or "")
                    continue
                if not 200 <= response.status < 300:
                    raise UploadFailed(f"{parameter} {origin} answered HTTP {response.status}; nothing was kept",
                                       parameter=parameter)
                yield response, origin
                return
            finally:
                response.close()
                connection.close()
        raise UploadFailed(f"{parameter} was redirected more than {_MAX_REDIRECTS} times", parameter=parameter)

    @staticmethod
    def parse_url(url: str, parameter: str) -> tuple[str, str, int, str]:
        """(scheme, host, port, request target) of an http(s) URL; UploadFailed for anything else."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise UploadFailed(f"{parameter} is not a valid URL; received {shown(url)}", parameter=parameter) from exc
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise UploadFailed(f"{parameter} must be an http or https URL; received {shown(url)}",
                               parameter=parameter, allowed_values=["http", "https"])
        try:
            host = (parts.hostname or "").encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise UploadFailed(f"{parameter} has an invalid host name", parameter=parameter) from exc
        if not host:
            raise UploadFailed(f"{parameter} must name a host; received {shown(url)}", parameter=parameter)
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        return scheme, host, port or (443 if scheme == "https" else 80), quote(path, safe=_SAFE_TARGET)

    def _address(self, host: str, port: int, origin: str, parameter: str) -> str:
        """The address to connect to: the host resolved once, every address it has checked."""
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise UploadFailed(f"{parameter} {origin}: its host name could not be resolved", parameter=parameter) \
                from exc
        addresses = [str(info[4][0]) for info in found]
        if not self.allow_private and any(
                self.is_forbidden_address(ipaddress.ip_address(address.split("%")[0])) for address in addresses):
            raise UploadFailed(f"{parameter} {origin} points to a loopback, private or otherwise non-public address; "
                               "this server only downloads from public addresses", parameter=parameter)
        return addresses[0]

    @staticmethod
    def _origin(url: str) -> str:
        """scheme://host[:port] of ``url``: what messages show (no credentials, path or query)."""
        try:
            parts = urlsplit(url)
            return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
        except ValueError:
            return "the URL"

    # ---------------------------------------------------------------- check and keep

    def check(self, upload: Upload, path: Path) -> str:
        """The architecture of the file at ``path``, which must be a complete safetensors file of the category
        and architecture the upload states."""
        origin = self._origin(upload.url)
        try:
            shapes = tensor_shapes(path)
            _check_complete(path)
        except RegistryError as exc:
            raise UploadFailed(f"{upload.url_parameter}: format is {upload.format!r}, and the file from {origin} "
                               f"{exc.problem}; nothing was kept", parameter=upload.url_parameter) from exc
        if upload.category == "vae":
            return self._vae_architecture(upload, shapes, origin)
        try:
            if upload.category == "checkpoint":
                detected = detect_architecture(shapes)
            else:
                detected = add_on_architecture(upload.category, shapes)
        except NotOfCategory as exc:
            raise UploadFailed(f"category is {upload.stated_category!r}, and the file from {origin} {exc.problem}; "
                               "nothing was kept", parameter="category") from exc
        except UnloadableLoraFormat as exc:
            raise UploadFailed(f"category is {upload.stated_category!r}, and the file from {origin} {exc.problem} "
                               "(LoRAs load in the kohya, LyCORIS LoCon and diffusers/peft formats, and for FLUX "
                               "XLabs' and ai-toolkit's); nothing was kept", parameter="category") from exc
        except RegistryError as exc:
            raise UploadFailed(f"architecture: the file from {origin} {exc.problem}, so it is not "
                               f"{_LABELS[upload.category]} of {upload.stated}; nothing was kept",
                               parameter="architecture", allowed_values=list(upload.architectures)) from exc
        fitting = _fitting(detected, upload.architectures, upload.category)
        if fitting is None:
            raise UploadFailed(
                f"architecture is {upload.stated!r}, and the file from {origin} is {_LABELS[upload.category]} of "
                f"{detected} ({', '.join(upload.architectures)} would fit {upload.stated!r}); nothing was kept",
                parameter="architecture", allowed_values=list(upload.architectures))
        if upload.type is not None and checkpoint_type(fitting) != upload.type:
            raise UploadFailed(
                f"type is {upload.type!r}, and the file from {origin} is a {checkpoint_type(fitting)} checkpoint "
                f"({fitting}); nothing was kept", parameter="type", allowed_values=[checkpoint_type(fitting)])
        return fitting

    @staticmethod
    def _vae_architecture(upload: Upload, shapes: dict[str, list[int]], origin: str) -> str:
        """A VAE fits models whose latents have its channels: its shapes cannot tell SD 1.x's from SDXL's, so
        the stated architecture is taken where the channels agree."""
        channels = next((shape[1] for name, shape in shapes.items()
                         if name.endswith("decoder.conv_in.weight") and len(shape) == 4), None)
        target = ARCHITECTURES[upload.architectures[0]].compatible
        if channels != _LATENT_CHANNELS:
            what = "not a VAE (no decoder.conv_in)" if channels is None else f"a VAE of {channels}-channel latents"
            raise UploadFailed(
                f"architecture is {upload.stated!r}, whose models have {_LATENT_CHANNELS}-channel latents, and the "
                f"file from {origin} is {what}; nothing was kept", parameter="architecture")
        return target

    def store(self, upload: Upload, partial: Path | None) -> ModelEntry:
        """Keep the checked file (``partial``; None: the one kept from an upload with the same uniqueIdentifier)
        and write the catalog file; the model's entry."""
        folder = self.folder(upload.air)
        try:
            architecture = self.check(upload, partial if partial is not None else folder / MODEL_FILE)
            if partial is not None:
                os.replace(partial, folder / MODEL_FILE)
                _write_atomically(folder / _UPLOAD_RECORD,
                                  json.dumps({"uniqueIdentifier": upload.unique_identifier}).encode())
        except BaseException:
            if partial is not None:
                partial.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        entry = {**upload.entry, "architecture": architecture, "source": "single_file", "location": MODEL_FILE}
        _write_atomically(folder / CATALOG_FILE, json.dumps([entry], indent=2).encode("utf-8"))
        ((made, _),) = read_catalog_file(folder / CATALOG_FILE)
        log.info("uploaded %s (%s %s) into %s", upload.air, architecture, upload.category, folder)
        return made


def _fitting(detected: str, stated: tuple[str, ...], category: str) -> str | None:
    """The architecture the catalog entry gets: the stated one the file's tensors fit (a checkpoint), or the one
    whose add-ons the file is (a LoRA); None if none."""
    for name in stated:
        if category == "checkpoint":
            if matches(name, detected):
                return name
            continue
        # The architecture whose add-ons fit the stated one's models: [dev]'s for every FLUX.1 variant.
        target = ARCHITECTURES[name].compatible
        if target == detected:
            return target
    return None


def _check_complete(path: Path) -> None:
    """A safetensors file holds every byte its header promises: a cut-off download is refused here."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    size = path.stat().st_size - 8 - length
    if not ends or max(ends) != size:
        raise RegistryError(f"is not a complete safetensors file: its header promises {max(ends, default=0)} bytes "
                            f"of tensors and it holds {size}")


class _Pinned(http.client.HTTPConnection):
    """A connection to a checked address, with the URL's host name in the Host header."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedTLS(http.client.HTTPSConnection):
    """The same over TLS, the certificate checked against the URL's host name."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def _gib(size: int) -> str:
    return f"{size / 1024 ** 3:.3g} GiB"


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
