"""Checkpoints named ``civitai:MODEL@VERSION``, fetched through Civitai's public API.

Civitai's AIR ids name a model and one of its versions. ``Civitai.fetch`` asks the API for the
version (``GET {base}/api/v1/model-versions/{VERSION}``: its model, its type, its files with their
SHA-256), downloads the version's primary safetensors file with a progress bar, checks its size and
hash, reads its architecture from its tensor names (``checkpoints.py``) and keeps it under
``models/civitai-MODEL-VERSION/`` in the data dir, with a one-entry catalog file beside it that the
server reads at its next start. The checkpoint is written under a temporary name and renamed once
checked, and the catalog file last, so a folder is complete exactly when its catalog file exists;
whatever fails on the way (the network, the size, the hash, the architecture) leaves nothing behind.

Only safetensors files are fetched: a pickled ``.ckpt`` can run code when it is loaded.

Blocking (``urllib``): callers run ``fetch`` in a thread (the server's download threads,
``tasks/downloads.py``). Two fetches of one version wait for each other, so it is downloaded once.

A download is bounded (``DownloadLimits``): its size, announced or not (a file served without a length is
counted as it comes), the free disk it leaves while it is written, and its total time. Past any of them it
stops and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagewire.air_registry.air import AIR
from imagewire.air_registry.catalog import ModelEntry, read_catalog_file
from imagewire.air_registry.checkpoints import detect_architecture, tensor_shapes
from imagewire.air_registry.errors import RegistryError, UnknownModel, WeightsMissing, shown

log = logging.getLogger("imagewire.downloads")

SOURCE = "civitai"
DEFAULT_URL = "https://civitai.com"
CATALOG_FILE = "catalog.json"
_CHECKPOINT_FILE = "model.safetensors"
_CHUNK = 1024 * 1024
_TIMEOUT = 60.0  # seconds without a byte before a request is given up


class NotACheckpoint(RegistryError):
    """A Civitai version that exists but is not a checkpoint this server can run."""


class DownloadFailed(WeightsMissing):
    """The weights could not be fetched or did not check out; nothing of them was kept."""


@dataclass(frozen=True)
class DownloadLimits:
    """Bounds of one download; None: no bound."""

    max_bytes: int | None = None        # the file's size (--max-download-gib)
    min_free_bytes: int | None = None   # free disk left while writing (--min-free-disk-gib)
    seconds: float | None = None        # the whole download, first byte to last (--download-timeout)


class Civitai:
    """Fetches Civitai checkpoints into ``models_dir`` (the data dir's ``models``)."""

    def __init__(self, *, base_url: str = DEFAULT_URL, token: str | None = None, models_dir: Path,
                 limits: DownloadLimits = DownloadLimits()) -> None:
        self.limits = limits
        self.base_url = base_url.rstrip("/")
        self.token = token or None
        self.models_dir = Path(models_dir)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    @staticmethod
    def names(air: AIR) -> bool:
        """Whether ``air`` is a Civitai id: MODEL and VERSION are numbers."""
        return air.source == SOURCE and air.id.isdigit() and air.version.isdigit()

    def version_url(self, air: AIR) -> str:
        return f"{self.base_url}/api/v1/model-versions/{air.version}"

    def describe_download(self, air: AIR) -> str:
        """The download ``fetch`` would make, for a server that may not make it."""
        return (f"with --allow-downloads this server fetches it from Civitai: the version's details from "
                f"{self.version_url(air)}, then its primary safetensors file into "
                f"{self.folder(air)}")

    def folder(self, air: AIR) -> Path:
        return self.models_dir / f"{SOURCE}-{air.id}-{air.version}"

    @staticmethod
    def downloaded_catalogs(models_dir: Path) -> list[Path]:
        """The catalog files of every complete download under ``models_dir``, for ``Catalog.load``."""
        return sorted(Path(models_dir).glob(f"{SOURCE}-*-*/{CATALOG_FILE}"))

    # ---------------------------------------------------------------- fetching

    def fetch(self, air: AIR) -> ModelEntry:
        """The catalog entry of ``air``'s checkpoint, downloaded first unless it is here already."""
        with self._lock_for(str(air)):
            folder = self.folder(air)
            if (folder / CATALOG_FILE).is_file():
                return self._entry(folder)
            version = self._version(air)
            file = self._primary_safetensors(air, version)
            folder.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(folder)
            try:
                with _temporary_file(folder) as partial:
                    self._download(air, file, partial)
                    try:
                        architecture = detect_architecture(tensor_shapes(partial))
                    except RegistryError as exc:
                        raise NotACheckpoint(
                            f"{shown(str(air))} was downloaded but its file {shown(file.get('name'))} "
                            f"{exc.problem}; it was not kept") from exc
                    os.replace(partial, folder / _CHECKPOINT_FILE)
            except BaseException:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if nothing else is in it
                raise
            model = _object(version.get("model"))
            name = " ".join(str(part) for part in (model.get("name"), version.get("name")) if part)
            base_model = version.get("baseModel")
            entry = {
                "air": str(air), "name": name or str(air), "architecture": architecture, "category": "checkpoint",
                "tags": ["civitai", *([str(base_model)] if base_model else [])],
                "source": "single_file", "location": _CHECKPOINT_FILE,
            }
            _write_atomically(folder / CATALOG_FILE, json.dumps([entry], indent=2).encode("utf-8"))
            log.info("downloaded %s (%s, architecture %s) into %s", air, file.get("name"), architecture, folder)
            return self._entry(folder)

    def _entry(self, folder: Path) -> ModelEntry:
        ((entry, _),) = read_catalog_file(folder / CATALOG_FILE)
        return entry

    def _lock_for(self, key: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    def _request(self, url: str) -> Any:
        request = urllib.request.Request(url, headers={"User-Agent": "imagewire"})
        if self.token:
            # Not sent on to where Civitai redirects downloads (a storage host with signed URLs).
            request.add_unredirected_header("Authorization", f"Bearer {self.token}")
        return urllib.request.urlopen(request, timeout=_TIMEOUT)

    def _version(self, air: AIR) -> dict[str, Any]:
        url = self.version_url(air)
        try:
            with self._request(url) as response:
                version = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            exc.close()  # an HTTP error holds its response open
            if exc.code == 404:
                raise UnknownModel(f"{shown(str(air))} is not on Civitai: {url} answered 404") from exc
            raise DownloadFailed(self._failed(air, f"{url} answered HTTP {exc.code}")) from exc
        except (OSError, ValueError) as exc:
            raise DownloadFailed(self._failed(air, f"{url} could not be read ({_reason(exc)})")) from exc
        if not isinstance(version, dict):
            raise DownloadFailed(self._failed(air, f"{url} did not answer with a model version"))
        if str(version.get("modelId")) != air.id:
            raise UnknownModel(
                f"{shown(str(air))} does not exist: Civitai's version {air.version} belongs to model "
                f"{version.get('modelId')}, not {air.id}")
        kind = _object(version.get("model")).get("type")
        if kind is not None and str(kind).lower() != "checkpoint":
            raise NotACheckpoint(f"{shown(str(air))} is a {kind} on Civitai, not a checkpoint")
        return version

    def _primary_safetensors(self, air: AIR, version: dict[str, Any]) -> dict[str, Any]:
        files = [file for file in version.get("files") or [] if isinstance(file, dict)]
        weights = [file for file in files if file.get("type", "Model") == "Model"]
        safetensors = [file for file in weights if str(file.get("name", "")).lower().endswith(".safetensors")
                       or _object(file.get("metadata")).get("format") == "SafeTensor"]
        if not safetensors:
            raise NotACheckpoint(
                f"{shown(str(air))} has no safetensors file on Civitai; only safetensors checkpoints are "
                "downloaded, as a pickled one can run code when it is loaded")
        primary = [file for file in safetensors if file.get("primary")]
        return (primary or safetensors)[0]

    def _download(self, air: AIR, file: dict[str, Any], partial: Path) -> None:
        url = file.get("downloadUrl") or f"{self.base_url}/api/download/models/{air.version}"
        expected_hash = str(_object(file.get("hashes")).get("SHA256", "")).lower() or None
        size_kb = file.get("sizeKB")
        log.info("downloading %s: %s (%s) from %s", air, file.get("name"),
                 f"{size_kb / 1024:.0f} MiB" if isinstance(size_kb, (int, float)) else "size unknown", url)
        listed = int(size_kb * 1024) if isinstance(size_kb, (int, float)) else None
        self._check_size(air, listed, "Civitai lists it at")
        digest = hashlib.sha256()
        received = 0
        deadline = None if self.limits.seconds is None else time.monotonic() + self.limits.seconds
        try:
            with self._request(url) as response, open(partial, "wb") as out:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                self._check_size(air, total, f"{url} announces")
                with _progress(total or listed, f"downloading {air}") as progress:
                    while chunk := response.read(_CHUNK):
                        received += len(chunk)
                        self._check_size(air, received, "it passed")
                        self._check_room(air, partial, len(chunk))
                        if deadline is not None and time.monotonic() > deadline:
                            raise DownloadFailed(self._failed(
                                air, f"it took longer than {self.limits.seconds:.0f} s (--download-timeout)"))
                        out.write(chunk)
                        digest.update(chunk)
                        progress(len(chunk))
        except urllib.error.HTTPError as exc:
            exc.close()
            what = "404: the file is not there" if exc.code == 404 else f"HTTP {exc.code}"
            raise DownloadFailed(self._failed(air, f"{url} answered {what}")) from exc
        except (OSError, ValueError) as exc:
            raise DownloadFailed(self._failed(air, f"the download from {url} broke off ({_reason(exc)})")) from exc
        if total is not None and received != total:
            raise DownloadFailed(self._failed(air, f"the download from {url} ended after {received} of {total} bytes"))
        if expected_hash is not None and digest.hexdigest() != expected_hash:
            raise DownloadFailed(self._failed(
                air, f"the file from {url} has SHA-256 {digest.hexdigest()}, not {expected_hash} as Civitai lists"))

    def _check_size(self, air: AIR, size: int | None, what: str) -> None:
        bound = self.limits.max_bytes
        if size is not None and bound is not None and size > bound:
            raise DownloadFailed(self._failed(
                air, f"{what} {_gib(size)}, more than the {_gib(bound)} a download may be (--max-download-gib)"))

    def _check_room(self, air: AIR, partial: Path, coming: int) -> None:
        """Stop before a write would leave less free disk than the reserve."""
        reserve = self.limits.min_free_bytes
        if reserve is None:
            return
        free = shutil.disk_usage(partial.parent).free
        if free - coming < reserve:
            raise DownloadFailed(self._failed(
                air, f"the disk would have less than the {_gib(reserve)} free it keeps (--min-free-disk-gib)"))

    def _failed(self, air: AIR, why: str) -> str:
        return f"the weights of {air} could not be downloaded: {why}; nothing was kept (send the task again to retry)"


def _gib(size: int) -> str:
    return f"{size / 1024 ** 3:.3g} GiB"


def _object(value: Any) -> dict[str, Any]:
    """A JSON object of the API's answer, or an empty one where it has something else."""
    return value if isinstance(value, dict) else {}


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


@contextmanager
def _temporary_file(folder: Path) -> Iterator[Path]:
    """A temporary name in ``folder``, gone afterwards unless the caller renamed it."""
    handle, name = tempfile.mkstemp(prefix=".download-", suffix=".part", dir=folder)
    os.close(handle)
    path = Path(name)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _remove_leftovers(folder: Path) -> None:
    # What a process killed in the middle of a download left.
    for leftover in folder.glob(".download-*.part"):
        leftover.unlink(missing_ok=True)


def _write_atomically(path: Path, data: bytes) -> None:
    with _temporary_file(path.parent) as partial:
        partial.write_bytes(data)
        os.replace(partial, path)


@contextmanager
def _progress(total: int | None, description: str) -> Iterator[Any]:
    """A progress bar for a long download (bytes, with rate and time left), on standard error."""
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, leave=True) as bar:
        yield bar.update
