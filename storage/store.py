"""Images on disk, addressed by UUID and scoped to an owner.

Layout: ``root/<first two hex digits>/<uuid>.<ext>`` holds the bytes and ``root/<xx>/<uuid>.json``
the metadata (uuid, extension, content_type, owner, size, created, last_used, and ``expires`` for an
image stored with a time to live). Both are written
under a temporary name in the same directory, flushed to the disk and renamed into place, the
metadata after the data, and only images with metadata are served: a reader never sees a
half-written image, not even after a power cut.

Reads never depend on a write succeeding: noting when an image was last used (which decides when it
expires) is best-effort, kept in memory and written later when the disk refuses. Writes are held to
bounds: the whole store, each owner, and a floor of free disk below which writes are refused and
reads go on.

An image stored with a time to live (a task's ``ttl``) is served until ``expires`` and never after,
whether or not it has been deleted yet. So that deleting it does not wait for the walk over every
image, it is also named in ``root/expiring/<expires in ms>-<uuid>.<ext>`` (an empty file, written
before the image): ``expire`` reads that folder in name order, which is expiry order, and stops at the
first image not due.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles

from imagewire.storage.errors import ImageNotStored, InputRejected, StoreFailed, shown
from imagewire.storage.formats import STORED_BY_EXTENSION

log = logging.getLogger("imagewire.storage")

# Temporary files end with this suffix (and start with a dot), so that leftovers of an
# interrupted write can be recognised and removed at start.
TEMP_SUFFIX = ".tmp"
METADATA_SUFFIX = ".json"
_SHARD_NAME = re.compile("[0-9a-f]{2}")
EXPIRING_FOLDER = "expiring"
# An expiry entry's name: when the image expires (ms since the epoch, zero-padded so names sort by it), its UUID.
EXPIRING_NAME = re.compile(r"(?P<expires>\d{15})-(?P<uuid>[0-9a-f-]{36})\.(?P<extension>[a-z0-9]+)")

# ``get`` rewrites the metadata only when last_used is older than this: a popular image
# read many times a second must not cost a file write each time, and expiry is counted in days.
LAST_USED_RESOLUTION_SECONDS = 60.0


@dataclass(frozen=True)
class StoredImage:
    uuid: str
    extension: str
    content_type: str
    owner: str
    path: Path | None  # where the bytes lie on local disk; None in an object store
    size: int
    expires: float | None = None  # when a time to live ends (seconds since the epoch); None: kept until unused


def canonical_uuid(text: str) -> str | None:
    """The canonical lowercase form of ``text`` if it is a UUID written canonically (any case), else None."""
    try:
        parsed = uuid.UUID(text)
    except (ValueError, TypeError, AttributeError):
        return None
    canonical = str(parsed)
    # uuid.UUID also accepts braces, "urn:uuid:" and missing hyphens; only the plain form is an imageUUID.
    return canonical if text.lower() == canonical else None


def storage_error(exc: OSError, *, reading: bool = False) -> StoreFailed:
    """A client-facing error for a failed file operation; the message never contains a path."""
    if exc.errno == errno.ENOSPC:
        return StoreFailed("the server's disk is full", disk_full=True, reading=reading)
    reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return StoreFailed(f"the server's image storage failed ({reason})", reading=reading)


def _write_atomically(path: Path, data: bytes, *, sync_directory: bool = True) -> None:
    """Write ``data`` to a temporary name, flush it to the disk, rename it into place, and (unless the
    caller does it after several renames) flush the directory, so the rename itself survives a crash."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if sync_directory:
        _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class Limits:
    """What the store may hold; None: no bound."""

    max_bytes: int | None = None
    max_bytes_per_owner: int | None = None
    min_free_bytes: int = 0     # writes stop while the disk has less free space than this


GIB = 1024 ** 3


def check_bounds(limits: Limits, *, size: int, used: int, used_by_owner: int) -> None:
    """Refuse a write of ``size`` bytes that would take the store or its owner past their bounds."""
    if limits.max_bytes is not None and used + size > limits.max_bytes:
        raise StoreFailed(
            f"the server's image storage is full ({_gib(used)} of {_gib(limits.max_bytes)} "
            "GiB); images expire after their last use, so room comes back with time", disk_full=True)
    if limits.max_bytes_per_owner is not None and used_by_owner + size > limits.max_bytes_per_owner:
        raise StoreFailed(
            f"this API key's images take {_gib(used_by_owner)} GiB, and it may keep "
            f"{_gib(limits.max_bytes_per_owner)} GiB; images expire after their last use", disk_full=True)


@dataclass(frozen=True)
class SharedWrite:
    """What a writer in another process (a Ray replica) needs to store an owner's image itself in a store it can
    reach too (a bucket): which store, and the store's bounds with what it and the owner held as this process
    counted them, so that the writer refuses a write past a bound in this process's words. The record of what it
    stored comes back to this process's ``adopt``."""

    store: str           # the store's address (``S3Store.address``): a writer stores only into the same store
    limits: Limits
    used: int            # bytes the store held, as this process counted them …
    used_by_owner: int   # … and those of the owner the write is for

    def check(self, size: int, *, written: int = 0) -> None:
        """Refuse a write of ``size`` bytes past a bound, ``written`` bytes having been stored since this was made."""
        check_bounds(self.limits, size=size, used=self.used + written, used_by_owner=self.used_by_owner + written)


def require_uuid(image_uuid: object) -> str:
    """The canonical form of a client's imageUUID; InputRejected when it is not one."""
    canonical = canonical_uuid(image_uuid) if isinstance(image_uuid, str) else None
    if canonical is None:
        raise InputRejected(
            f"must be a UUID such as '123e4567-e89b-42d3-a456-426614174000', received {shown(image_uuid)}")
    return canonical


# How many of each owner's newest images ``recent`` remembers.
RECENT_PER_OWNER = 200


# Uses not yet written down because the disk refused; past this many the oldest are forgotten.
MAX_UNWRITTEN_USES = 100_000


def expired(metadata: dict[str, Any], now: float) -> bool:
    """Whether the image ``metadata`` describes was stored with a time to live that has ended by ``now``."""
    expires = metadata.get("expires")
    return isinstance(expires, (int, float)) and expires <= now


def expiring_name(image_uuid: str, extension: str, expires: float) -> str:
    return f"{int(expires * 1000):015d}-{image_uuid}.{extension}"


def servable_extension(metadata: dict[str, Any] | None, image_uuid: str, owner: str | None) -> str | None:
    """The extension of the image ``metadata`` describes, when that is ``image_uuid``, of ``owner`` (None:
    anyone's), of a format this server serves and not past its time to live; None otherwise (answered like a
    missing image)."""
    if metadata is None or metadata.get("uuid") != image_uuid:
        return None
    if owner is not None and metadata.get("owner") != owner:
        return None
    # Past its time to live an image is gone for clients at once, before a sweep has deleted it.
    if expired(metadata, time.time()):
        return None
    extension = metadata.get("extension")
    return extension if isinstance(extension, str) and extension in STORED_BY_EXTENSION else None


def stored_image(metadata: dict[str, Any], extension: str, path: Path | None) -> StoredImage:
    expires = metadata.get("expires")
    return StoredImage(uuid=str(metadata["uuid"]), extension=extension,
                       content_type=STORED_BY_EXTENSION[extension].media_type, owner=str(metadata.get("owner")),
                       path=path, size=int(metadata.get("size", 0)),
                       expires=float(expires) if isinstance(expires, (int, float)) else None)


class UnwrittenUses:
    """Uses of images a store could not note (the write was refused), kept to be written by the sweep.

    Bounded (the oldest is forgotten first); a failure is logged at most once a minute.
    """

    def __init__(self) -> None:
        self.when: dict[str, float] = {}  # image UUID → its last use not yet written
        self._last_logged = 0.0

    @staticmethod
    def due(metadata: dict[str, Any], now: float) -> bool:
        """Whether a read at ``now`` should note its use (at most once per LAST_USED_RESOLUTION_SECONDS)."""
        last_used = metadata.get("last_used")
        return not isinstance(last_used, (int, float)) or now - last_used > LAST_USED_RESOLUTION_SECONDS

    def failed(self, image_uuid: str, now: float, reason: str) -> None:
        if len(self.when) >= MAX_UNWRITTEN_USES:
            self.when.pop(next(iter(self.when)))
        self.when[image_uuid] = now
        if now - self._last_logged > 60:
            self._last_logged = now
            log.warning("noting image uses failed (%s); reads go on, and the uses are written later", reason)

    def written(self, image_uuid: str) -> None:
        self.when.pop(image_uuid, None)


class ImageStore:
    def __init__(self, root: Path, limits: Limits | None = None) -> None:
        self.root = root
        self.limits = limits or Limits()
        # Each owner's newest images since this process started, newest last: what a gallery shows.
        self._recent: dict[str, deque[StoredImage]] = {}
        # Bytes stored, in all and by owner; counted once at start, then kept up to date.
        self.used_bytes = 0
        self._used_by_owner: dict[str, int] = {}
        # uuid → last use the disk did not take; written again by the next sweep.
        self._unwritten_uses = UnwrittenUses()
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            self._count_usage()
        except OSError as exc:
            raise storage_error(exc) from exc

    def used_by(self, owner: str) -> int:
        return self._used_by_owner.get(owner, 0)

    def _count_usage(self) -> None:
        for directory in self._shard_directories():
            for metadata_path in directory.glob(f"*{METADATA_SUFFIX}"):
                metadata = _read_metadata(metadata_path)
                if metadata is not None and isinstance(metadata.get("size"), int):
                    self._add_usage(str(metadata.get("owner")), metadata["size"])

    def _add_usage(self, owner: str, size: int) -> None:
        self.used_bytes += size
        self._used_by_owner[owner] = self._used_by_owner.get(owner, 0) + size
        if self._used_by_owner[owner] <= 0:
            del self._used_by_owner[owner]

    # ------------------------------------------------------------------ paths

    def _directory(self, image_uuid: str) -> Path:
        return self.root / image_uuid[:2]

    def _data_path(self, image_uuid: str, extension: str) -> Path:
        return self._directory(image_uuid) / f"{image_uuid}.{extension}"

    def _metadata_path(self, image_uuid: str) -> Path:
        return self._directory(image_uuid) / f"{image_uuid}{METADATA_SUFFIX}"

    def _remove_leftovers(self) -> None:
        """Delete what interrupted writes left: temporary files, and data whose metadata never came.

        Runs once, before any write of this process, so nothing in flight can be mistaken for a leftover.
        """
        # Only names this store itself writes are touched: a root pointed at the wrong folder must not lose files.
        for directory in self._shard_directories():
            for entry in directory.iterdir():
                if _is_temporary(entry) or _is_data_without_metadata(entry):
                    entry.unlink(missing_ok=True)

    def _shard_directories(self) -> list[Path]:
        return [entry for entry in self.root.iterdir() if entry.is_dir() and _SHARD_NAME.fullmatch(entry.name)]

    # ------------------------------------------------------------------ writing

    async def put(self, data: bytes, *, extension: str, owner: str, ttl: float | None = None) -> StoredImage:
        """Store ``data`` under a new UUID v4 and return its record; with ``ttl``, it is deleted that many
        seconds from now (or earlier, when unused for the store's own time)."""
        if extension not in STORED_BY_EXTENSION:
            raise ValueError(f"extension must be one of {', '.join(STORED_BY_EXTENSION)}, received {extension!r}")
        self._check_room(len(data), owner)
        image_uuid = str(uuid.uuid4())
        now = time.time()
        image = StoredImage(
            uuid=image_uuid,
            extension=extension,
            content_type=STORED_BY_EXTENSION[extension].media_type,
            owner=owner,
            path=self._data_path(image_uuid, extension),
            size=len(data),
            expires=now + ttl if ttl is not None else None,
        )
        metadata = {
            "uuid": image_uuid,
            "extension": extension,
            "content_type": image.content_type,
            "owner": owner,
            "size": image.size,
            "created": now,
            "last_used": now,
        }
        if image.expires is not None:
            metadata["expires"] = image.expires
        try:
            await asyncio.to_thread(self._write_image, image, data, metadata)
        except OSError as exc:
            raise storage_error(exc) from exc
        self.adopt(image)
        return image

    def shared_write(self, owner: str) -> None:
        """None: a process on another machine cannot reach this machine's disk, so this process stores every image."""
        return None

    def adopt(self, image: StoredImage) -> None:
        """Count ``image``, just written, in the usage and its owner's recent images."""
        self._add_usage(image.owner, image.size)
        self._recent.setdefault(image.owner, deque(maxlen=RECENT_PER_OWNER)).append(image)

    def _check_room(self, size: int, owner: str) -> None:
        limits = self.limits
        check_bounds(limits, size=size, used=self.used_bytes, used_by_owner=self.used_by(owner))
        if limits.min_free_bytes:
            free = shutil.disk_usage(self.root).free
            if free - size < limits.min_free_bytes:
                raise StoreFailed(
                    f"the server's disk is nearly full (less than {_gib(limits.min_free_bytes)} GiB free)",
                    disk_full=True)

    async def recent(self, owner: str, limit: int) -> list[StoredImage]:
        """``owner``'s newest images stored since this process started, newest first, at most ``limit``;
        images swept away since are left out."""
        return await asyncio.to_thread(self._recent_kept, owner, limit)

    def _recent_kept(self, owner: str, limit: int) -> list[StoredImage]:
        now = time.time()
        kept = (image for image in reversed(self._recent.get(owner, ()))
                if (image.expires is None or image.expires > now)
                and self._data_path(image.uuid, image.extension).exists())
        return list(itertools.islice(kept, limit))

    def _write_image(self, image: StoredImage, data: bytes, metadata: dict[str, Any]) -> None:
        path = self._data_path(image.uuid, image.extension)
        path.parent.mkdir(exist_ok=True)
        entry = None
        if image.expires is not None:
            # Its expiry entry first: an image with a time to live is never on disk without one. An entry whose
            # image never came is dropped by ``expire`` when due.
            entry = self._expiring_folder() / expiring_name(image.uuid, image.extension, image.expires)
            entry.parent.mkdir(exist_ok=True)
            entry.touch()
        try:
            _write_atomically(path, data, sync_directory=False)
            # Metadata last: its presence is what makes the image visible. One directory flush covers both renames.
            _write_atomically(self._metadata_path(image.uuid), json.dumps(metadata).encode())
        except BaseException:
            # Data without metadata is never served, and goes at the next start (``_remove_leftovers``).
            if entry is not None:
                entry.unlink(missing_ok=True)
            raise

    def _expiring_folder(self) -> Path:
        return self.root / EXPIRING_FOLDER

    # ------------------------------------------------------------------ reading

    async def get(self, image_uuid: str, *, owner: str | None) -> StoredImage:
        """The stored image ``image_uuid`` if it exists and belongs to ``owner`` (None: anyone's)."""
        canonical = require_uuid(image_uuid)
        # Answered the same for a missing image and for someone else's, so existence does not leak.
        not_found = ImageNotStored(canonical)
        try:
            image = await asyncio.to_thread(self._load_and_touch, canonical, owner)
        except OSError as exc:
            raise storage_error(exc, reading=True) from exc
        if image is None:
            raise not_found
        return image

    def _load_and_touch(self, image_uuid: str, owner: str | None) -> StoredImage | None:
        metadata_path = self._metadata_path(image_uuid)
        metadata = _read_metadata(metadata_path)
        extension = servable_extension(metadata, image_uuid, owner)
        if metadata is None or extension is None:
            return None
        # The path comes from the parsed UUID and a known extension, never from client text.
        path = self._data_path(image_uuid, extension)
        if not path.is_file():
            return None  # swept between its data and its metadata
        now = time.time()
        if UnwrittenUses.due(metadata, now):
            self._touch(metadata_path, metadata, now)
        return stored_image(metadata, extension, path)

    def _touch(self, metadata_path: Path, metadata: dict[str, Any], now: float) -> None:
        """Note a use of the image, best-effort: a disk that refuses the write does not fail the read."""
        metadata["last_used"] = now
        try:
            _write_atomically(metadata_path, json.dumps(metadata).encode())
        except OSError as exc:
            self._unwritten_uses.failed(metadata["uuid"], now,
                                        os.strerror(exc.errno) if exc.errno else type(exc).__name__)
        else:
            self._unwritten_uses.written(metadata["uuid"])

    async def read(self, image: StoredImage) -> bytes:
        try:
            async with aiofiles.open(self._data_path(image.uuid, image.extension), "rb") as file:
                data: bytes = await file.read()
                return data
        except FileNotFoundError as exc:
            raise ImageNotStored(image.uuid) from exc
        except OSError as exc:
            raise storage_error(exc, reading=True) from exc

    # ------------------------------------------------------------------ expiry

    async def sweep(self, *, max_age_seconds: float, now: float | None = None) -> int:
        """Delete images whose last use is more than ``max_age_seconds`` before ``now``; return how many."""
        now = time.time() if now is None else now
        try:
            return await asyncio.to_thread(self._sweep, now - max_age_seconds, now)
        except OSError as exc:
            raise storage_error(exc) from exc

    def _sweep(self, cutoff: float, now: float) -> int:
        removed = 0
        for directory in self._shard_directories():
            for metadata_path in directory.glob(f"*{METADATA_SUFFIX}"):
                metadata = _read_metadata(metadata_path)
                if metadata is None:
                    continue
                last_used = metadata.get("last_used")
                unwritten = self._unwritten_uses.when.get(str(metadata.get("uuid")))
                if unwritten is not None:
                    # A use the disk refused earlier: it counts, and is written now if the disk takes it.
                    self._touch(metadata_path, metadata, unwritten)
                    last_used = unwritten
                unused = isinstance(last_used, (int, float)) and last_used < cutoff
                # An image past its time to live whose expiry entry was lost (a crash) goes here too.
                if unused or expired(metadata, now):
                    self._remove(metadata_path, metadata)
                    removed += 1
        return removed

    def _remove(self, metadata_path: Path, metadata: dict[str, Any]) -> None:
        image_uuid = canonical_uuid(metadata_path.stem)
        extension = metadata.get("extension")
        if image_uuid is not None and isinstance(extension, str) and extension in STORED_BY_EXTENSION:
            # Data first: a sweep interrupted here leaves metadata, which the next sweep finds again.
            self._data_path(image_uuid, extension).unlink(missing_ok=True)
        metadata_path.unlink(missing_ok=True)
        if isinstance(metadata.get("size"), int):
            self._add_usage(str(metadata.get("owner")), -metadata["size"])

    async def expire(self, *, now: float | None = None) -> int:
        """Delete the images whose time to live has ended by ``now``; return how many."""
        try:
            return await asyncio.to_thread(self._expire, time.time() if now is None else now)
        except OSError as exc:
            raise storage_error(exc) from exc

    def _expire(self, now: float) -> int:
        folder = self._expiring_folder()
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            return 0
        removed = 0
        for name in names:
            found = EXPIRING_NAME.fullmatch(name)
            if found is None:
                continue  # not ours
            if int(found["expires"]) > now * 1000:
                break  # in expiry order: every later one is due later still
            image_uuid = canonical_uuid(found["uuid"])
            if image_uuid is not None:
                metadata_path = self._metadata_path(image_uuid)
                metadata = _read_metadata(metadata_path)
                # The metadata decides: an entry whose image is gone already (swept as unused) only goes itself.
                if metadata is not None and metadata.get("uuid") == image_uuid and expired(metadata, now):
                    self._remove(metadata_path, metadata)
                    removed += 1
            # The entry last: an expiry interrupted before this finds the image again next time.
            (folder / name).unlink(missing_ok=True)
        return removed


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def _is_data_without_metadata(path: Path) -> bool:
    return (
        path.suffix[1:] in STORED_BY_EXTENSION
        and canonical_uuid(path.stem) is not None
        and not path.with_suffix(METADATA_SUFFIX).exists()
    )


def _read_metadata(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        # Never written half (it is renamed into place), so unreadable metadata is foreign: not ours to serve.
        return None
    return loaded if isinstance(loaded, dict) else None


def _gib(size: int) -> str:
    return f"{size / GIB:.2f}"
