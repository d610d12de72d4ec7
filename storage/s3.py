"""Images in an S3-compatible bucket (AWS S3, MinIO, ...), addressed by UUID and scoped to an owner.

Layout under ``s3://BUCKET/PREFIX``: ``images/<uuid>.<ext>`` holds the bytes (stored with their
Content-Type), ``meta/<uuid>.json`` the metadata, the same fields as on local disk, and
``owners/<owner>/<newest-first>-<uuid>-<size>.<ext>`` is an empty object per image that lists an owner's
images newest first in one request (imageHistory), whichever server stored them. An image stored with a time
to live also has an empty ``expiring/<expires in ms>-<uuid>.<ext>``, put before the image, which ``expire``
lists in key order (expiry order) up to the first not due, whichever server stored it. A PutObject is atomic,
so no object is ever seen half-written; the data is put before its metadata, and only images with
metadata are served, so an image is visible under its UUID only when whole. Several servers may share
one bucket: any of them serves any image.

Reads never depend on a write: noting a use (last_used, rewritten at most once a minute per image) is
best-effort, and a use the store refused is kept in memory and written by the next sweep. The metadata
object is rewritten on each noted use, so its LastModified bounds last_used from above: a sweep reads
only the metadata of images that listing shows as old enough.

boto3 is an optional extra (``pip install 'imagewire[s3]'``); it is imported only when a store opens.
Its calls block, so each runs in a thread. Credentials and region come from the standard AWS
environment variables (or ~/.aws) as boto3 finds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from imagewire.storage.errors import ImageNotStored, StoreFailed
from imagewire.storage.formats import STORED_BY_EXTENSION
from imagewire.storage.store import (
    EXPIRING_FOLDER,
    EXPIRING_NAME,
    RECENT_PER_OWNER,
    Limits,
    SharedWrite,
    StoredImage,
    UnwrittenUses,
    canonical_uuid,
    check_bounds,
    expired,
    expiring_name,
    require_uuid,
    servable_extension,
    stored_image,
)

log = logging.getLogger("imagewire.storage")

SCHEME = "s3://"
# S3's rules for bucket names (3-63 characters, lowercase letters, digits, dots and hyphens).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
# Error codes of stores that ran out of room (MinIO's, and quota codes of S3-compatible stores).
_FULL_CODES = frozenset({"XMinioStorageFull", "QuotaExceeded", "StorageFull", "InsufficientStorage"})
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
# Data objects without metadata this old are what an interrupted put left; younger ones may be in flight
# on another server sharing the bucket.
LEFTOVER_AGE_SECONDS = 3600.0
# History keys count down in milliseconds from this moment (the year 5138), so that newer sort first.
_HISTORY_EPOCH_MS = 10**14
_HISTORY_NAME = re.compile(r"(?P<countdown>\d{15})-(?P<uuid>[0-9a-f-]{36})-(?P<size>\d+)\.(?P<extension>[a-z0-9]+)")

# How long a store that stops answering can keep a task waiting. Each call to the store waits at most
# CONNECT_TIMEOUT_SECONDS for a connection and READ_TIMEOUT_SECONDS of silence (per read, not per transfer,
# so large images are not cut off), and is tried ATTEMPTS times in all, with boto3's standard backoff between
# tries (a random share of 1 s, then of 2 s, ...). A task meets at most HANGING_CALLS_PER_TASK such calls
# before one fails it: a best-effort write that waits and is let go (noting a use before a read, listing an
# image in its owner's history after a store, removing the data of an image whose metadata failed), then
# the call that fails. docs/cluster.md promises that a frozen store fails a task within two minutes;
# ``worst_case_task_seconds()`` is what these constants give (96 s).
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 10.0
ATTEMPTS = 3
HANGING_CALLS_PER_TASK = 2
_BACKOFF_CAP_SECONDS = 20.0  # boto3's standard retries never wait longer than this between tries


def worst_case_call_seconds() -> float:
    backoff = sum(min(2.0 ** retry, _BACKOFF_CAP_SECONDS) for retry in range(ATTEMPTS - 1))
    return ATTEMPTS * (CONNECT_TIMEOUT_SECONDS + READ_TIMEOUT_SECONDS) + backoff


def worst_case_task_seconds() -> float:
    return HANGING_CALLS_PER_TASK * worst_case_call_seconds()


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ending with "/"

    @classmethod
    def parse(cls, text: str) -> S3Location:
        """``s3://BUCKET`` or ``s3://BUCKET/PREFIX``; ValueError for anything else."""
        if not text.startswith(SCHEME):
            raise ValueError(f"expected s3://BUCKET/PREFIX, got {text!r}")
        bucket, _, prefix = text[len(SCHEME):].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"{bucket!r} is not an S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)")
        prefix = prefix.strip("/")
        return cls(bucket=bucket, prefix=f"{prefix}/" if prefix else "")

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")


def _origin(url: str) -> str:
    """scheme://host[:port] of ``url``: what a message may show of an endpoint, never credentials or paths."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}"


class S3Store:
    """The :class:`~imagewire.storage.backend.ImageStorage` of an S3-compatible bucket."""

    def __init__(self, location: S3Location, *, endpoint_url: str | None = None, limits: Limits | None = None) -> None:
        """Connect and check the bucket; ValueError, naming ``--store``, when it cannot be used."""
        self.location = location
        self.limits = limits or Limits()
        self._endpoint = endpoint_url
        # Which bucket at which endpoint: two stores with the same address hold the same images.
        self.address = f"{location} at {endpoint_url or 'AWS S3'}"
        failing = f"--store {location}"
        try:
            import boto3
            from botocore.config import Config as BotoConfig
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise ValueError(f"{failing}: the S3 store needs boto3; install it with: pip install "
                             "'imagewire[s3]'") from None
        config = BotoConfig(
            connect_timeout=CONNECT_TIMEOUT_SECONDS, read_timeout=READ_TIMEOUT_SECONDS,
            # total_max_attempts counts the first try; max_attempts would count only retries (one try more).
            retries={"total_max_attempts": ATTEMPTS, "mode": "standard"},
            # Self-hosted stores (MinIO and the like) answer at one host; bucket names in host names
            # need wildcard DNS they seldom have.
            s3={"addressing_style": "path"} if endpoint_url else {})
        # What a call to the store may raise; anything else is a bug, not the store failing.
        self._errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)
        # botocore says at INFO where it found the credentials, at every start; the operator set them.
        credentials_log = logging.getLogger("botocore.credentials")
        if credentials_log.level == logging.NOTSET:
            credentials_log.setLevel(logging.WARNING)
        self._client: Any = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self.used_bytes = 0
        self._used_by_owner: dict[str, int] = {}
        self._unwritten_uses = UnwrittenUses()
        try:
            self._client.head_bucket(Bucket=location.bucket)
            self._count_usage()
        except self._errors as exc:
            raise ValueError(f"{failing}: {self._start_failure(exc)}") from None

    def _start_failure(self, exc: Exception) -> str:
        """Why the store cannot be used, for the operator."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = _origin(self._endpoint) if self._endpoint else "AWS S3"
        if isinstance(exc, ClientError):
            code = _code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                return f"bucket {self.location.bucket!r} does not exist at {where}"
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return f"access to bucket {self.location.bucket!r} at {where} is denied; check the AWS credentials"
            return f"{where} answered {code}"
        if isinstance(exc, NoCredentialsError):
            return "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        if isinstance(exc, EndpointConnectionError):
            return f"cannot reach {where}"
        return f"{where} failed ({type(exc).__name__})"

    # ------------------------------------------------------------------ keys and usage

    def _data_key(self, image_uuid: str, extension: str) -> str:
        return f"{self.location.prefix}images/{image_uuid}.{extension}"

    def _metadata_key(self, image_uuid: str) -> str:
        return f"{self.location.prefix}meta/{image_uuid}.json"

    def _owner_folder(self, owner: str) -> str:
        return f"{self.location.prefix}owners/{urllib.parse.quote(owner, safe='')}/"

    def _history_key(self, metadata: dict[str, Any]) -> str:
        # Listing is in key order, oldest key first: a countdown from far in the future puts the newest first.
        countdown = _HISTORY_EPOCH_MS - int(float(metadata["created"]) * 1000)
        return (f"{self._owner_folder(str(metadata['owner']))}{countdown:015d}-{metadata['uuid']}-"
                f"{metadata['size']}.{metadata['extension']}")

    def used_by(self, owner: str) -> int:
        return self._used_by_owner.get(owner, 0)

    def _add_usage(self, owner: str, size: int) -> None:
        self.used_bytes = max(0, self.used_bytes + size)
        self._used_by_owner[owner] = self._used_by_owner.get(owner, 0) + size
        if self._used_by_owner[owner] <= 0:
            del self._used_by_owner[owner]

    def _count_usage(self) -> None:
        """Count what the bucket holds, only when a bound needs it: per owner it reads every metadata object."""
        if self.limits.max_bytes_per_owner is not None:
            for entry in self._list("meta/"):
                metadata = self._load_metadata(entry["Key"])
                if metadata is not None and isinstance(metadata.get("size"), int):
                    self._add_usage(str(metadata.get("owner")), metadata["size"])
        elif self.limits.max_bytes is not None:
            self.used_bytes = sum(int(entry.get("Size", 0)) for entry in self._list("images/"))

    def _list(self, folder: str) -> Iterator[dict[str, Any]]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.location.bucket, Prefix=f"{self.location.prefix}{folder}")
        for page in pages:
            yield from page.get("Contents", ())

    # ------------------------------------------------------------------ writing

    async def put(self, data: bytes, *, extension: str, owner: str, ttl: float | None = None) -> StoredImage:
        if extension not in STORED_BY_EXTENSION:
            raise ValueError(f"extension must be one of {', '.join(STORED_BY_EXTENSION)}, received {extension!r}")
        check_bounds(self.limits, size=len(data), used=self.used_bytes, used_by_owner=self.used_by(owner))
        image_uuid = str(uuid.uuid4())
        now = time.time()
        image = StoredImage(uuid=image_uuid, extension=extension,
                            content_type=STORED_BY_EXTENSION[extension].media_type, owner=owner, path=None,
                            size=len(data), expires=now + ttl if ttl is not None else None)
        metadata = {"uuid": image_uuid, "extension": extension, "content_type": image.content_type,
                    "owner": owner, "size": image.size, "created": now, "last_used": now}
        if image.expires is not None:
            metadata["expires"] = image.expires
        try:
            await asyncio.to_thread(self._write_image, image, data, metadata)
        except self._errors as exc:
            raise _failure(exc) from None
        self.adopt(image)
        return image

    def shared_write(self, owner: str) -> SharedWrite:
        """Another process opening this bucket stores ``owner``'s images in it as this store would, within the
        room left as this store counts it."""
        return SharedWrite(store=self.address, limits=self.limits, used=self.used_bytes,
                           used_by_owner=self.used_by(owner))

    def adopt(self, image: StoredImage) -> None:
        """Count ``image``, just written here (by this store, or another process after ``shared_write``), in the
        usage the bounds are checked against."""
        self._add_usage(image.owner, image.size)

    def _expiring_key(self, image_uuid: str, extension: str, expires: float) -> str:
        return f"{self.location.prefix}{EXPIRING_FOLDER}/{expiring_name(image_uuid, extension, expires)}"

    def _write_image(self, image: StoredImage, data: bytes, metadata: dict[str, Any]) -> None:
        data_key = self._data_key(image.uuid, image.extension)
        if image.expires is not None:
            # Its expiry entry first: an image with a time to live is never in the bucket without one. An entry
            # whose image never came is dropped by ``expire`` when due.
            self._client.put_object(Bucket=self.location.bucket, Body=b"",
                                    Key=self._expiring_key(image.uuid, image.extension, image.expires))
        try:
            self._client.put_object(Bucket=self.location.bucket, Key=data_key, Body=data,
                                    ContentType=image.content_type)
            # Metadata last: its presence is what makes the image visible.
            self._put_metadata(metadata)
        except self._errors:
            leftovers = [data_key]
            if image.expires is not None:
                leftovers.append(self._expiring_key(image.uuid, image.extension, image.expires))
            for key in leftovers:
                try:
                    self._client.delete_object(Bucket=self.location.bucket, Key=key)
                except self._errors:
                    pass  # a leftover the sweep (data) or the expiry pass (its entry, once due) removes
            raise
        try:
            self._client.put_object(Bucket=self.location.bucket, Key=self._history_key(metadata), Body=b"")
        except self._errors as exc:
            # The image is stored and served; only its owner's gallery will not show it.
            log.warning("image %s is stored but not listed in its owner's history: %s", image.uuid,
                        _failure(exc).problem)

    def _put_metadata(self, metadata: dict[str, Any]) -> None:
        self._client.put_object(Bucket=self.location.bucket, Key=self._metadata_key(metadata["uuid"]),
                                Body=json.dumps(metadata).encode(), ContentType="application/json")

    async def recent(self, owner: str, limit: int) -> list[StoredImage]:
        try:
            return await asyncio.to_thread(self._recent, owner, min(limit, RECENT_PER_OWNER))
        except self._errors as exc:
            raise _failure(exc, reading=True) from None

    def _recent(self, owner: str, limit: int) -> list[StoredImage]:
        listed = self._client.list_objects_v2(Bucket=self.location.bucket, Prefix=self._owner_folder(owner),
                                              MaxKeys=limit)
        images = []
        for entry in listed.get("Contents", ()):
            found = _HISTORY_NAME.fullmatch(entry["Key"].rsplit("/", 1)[-1])
            if found is None or found["extension"] not in STORED_BY_EXTENSION:
                continue  # not ours
            extension = found["extension"]
            images.append(StoredImage(uuid=found["uuid"], extension=extension,
                                      content_type=STORED_BY_EXTENSION[extension].media_type, owner=owner,
                                      path=None, size=int(found["size"])))
        return images

    # ------------------------------------------------------------------ reading

    async def get(self, image_uuid: str, *, owner: str | None) -> StoredImage:
        canonical = require_uuid(image_uuid)
        try:
            image = await asyncio.to_thread(self._load_and_touch, canonical, owner)
        except self._errors as exc:
            raise _failure(exc, reading=True) from None
        if image is None:
            # Answered the same for a missing image and for someone else's, so existence does not leak.
            raise ImageNotStored(canonical)
        return image

    def _load_metadata(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            response = self._client.get_object(Bucket=self.location.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                return None
            raise
        with response["Body"] as body:
            raw = body.read()
        try:
            loaded = json.loads(raw)
        except ValueError:
            return None  # never written half (a PutObject is atomic): foreign, not ours to serve
        return loaded if isinstance(loaded, dict) else None

    def _load_and_touch(self, image_uuid: str, owner: str | None) -> StoredImage | None:
        metadata = self._load_metadata(self._metadata_key(image_uuid))
        extension = servable_extension(metadata, image_uuid, owner)
        if metadata is None or extension is None:
            return None
        now = time.time()
        if UnwrittenUses.due(metadata, now):
            self._touch(metadata, now)
        return stored_image(metadata, extension, None)

    def _touch(self, metadata: dict[str, Any], now: float) -> None:
        """Note a use of the image, best-effort: a store that refuses the write does not fail the read."""
        metadata["last_used"] = now
        try:
            self._put_metadata(metadata)
        except self._errors as exc:
            self._unwritten_uses.failed(metadata["uuid"], now, _failure(exc).problem)
        else:
            self._unwritten_uses.written(metadata["uuid"])

    async def read(self, image: StoredImage) -> bytes:
        try:
            data = await asyncio.to_thread(self._read, image)
        except self._errors as exc:
            raise _failure(exc, reading=True) from None
        if data is None:
            raise ImageNotStored(image.uuid)
        return data

    def _read(self, image: StoredImage) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            response = self._client.get_object(Bucket=self.location.bucket,
                                               Key=self._data_key(image.uuid, image.extension))
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                return None  # swept since its metadata was read
            raise
        with response["Body"] as body:
            data: bytes = body.read()
        return data

    # ------------------------------------------------------------------ expiry

    async def sweep(self, *, max_age_seconds: float, now: float | None = None) -> int:
        now = time.time() if now is None else now
        try:
            return await asyncio.to_thread(self._sweep, now - max_age_seconds, now)
        except self._errors as exc:
            raise _failure(exc) from None

    def _sweep(self, cutoff: float, now: float) -> int:
        removed: set[str] = set()
        described: set[str] = set()
        for entry in self._list("meta/"):
            image_uuid = canonical_uuid(entry["Key"].rsplit("/", 1)[-1].removesuffix(".json"))
            if image_uuid is None:
                continue
            described.add(image_uuid)
            unwritten = self._unwritten_uses.when.get(image_uuid)
            if unwritten is None and entry["LastModified"].timestamp() >= cutoff:
                continue  # noted as used no earlier than its metadata was written
            metadata = self._load_metadata(entry["Key"])
            if metadata is None:
                continue
            last_used = metadata.get("last_used")
            if unwritten is not None:
                # A use the store refused earlier: it counts, and is written now if the store takes it.
                self._touch(metadata, unwritten)
                last_used = unwritten
            unused = isinstance(last_used, (int, float)) and last_used < cutoff
            # An image past its time to live whose expiry entry was lost goes here too, once its metadata is old.
            if not unused and not expired(metadata, now):
                continue
            self._remove(image_uuid, entry["Key"], metadata)
            removed.add(image_uuid)
        # Data whose metadata never came: what an interrupted put left, once old enough not to be in flight.
        for entry in self._list("images/"):
            name = entry["Key"].rsplit("/", 1)[-1]
            stem, _, extension = name.rpartition(".")
            image_uuid = canonical_uuid(stem)
            if (image_uuid is not None and extension in STORED_BY_EXTENSION and image_uuid not in described
                    and entry["LastModified"].timestamp() < now - LEFTOVER_AGE_SECONDS):
                self._client.delete_object(Bucket=self.location.bucket, Key=entry["Key"])
        return len(removed)

    def _remove(self, image_uuid: str, metadata_key: str, metadata: dict[str, Any]) -> None:
        extension = metadata.get("extension")
        if isinstance(extension, str) and extension in STORED_BY_EXTENSION:
            # Data first, metadata last: a sweep interrupted on the way leaves metadata, which the next
            # sweep finds again.
            self._client.delete_object(Bucket=self.location.bucket, Key=self._data_key(image_uuid, extension))
            with contextlib.suppress(KeyError, TypeError, ValueError):  # metadata of an older layout
                self._client.delete_object(Bucket=self.location.bucket, Key=self._history_key(metadata))
        self._client.delete_object(Bucket=self.location.bucket, Key=metadata_key)
        if isinstance(metadata.get("size"), int):
            self._add_usage(str(metadata.get("owner")), -metadata["size"])

    async def expire(self, *, now: float | None = None) -> int:
        """Delete the images whose time to live has ended by ``now``; return how many."""
        try:
            return await asyncio.to_thread(self._expire, time.time() if now is None else now)
        except self._errors as exc:
            raise _failure(exc) from None

    def _expire(self, now: float) -> int:
        removed = 0
        for entry in self._list(f"{EXPIRING_FOLDER}/"):
            found = EXPIRING_NAME.fullmatch(entry["Key"].rsplit("/", 1)[-1])
            if found is None:
                continue  # not ours
            if int(found["expires"]) > now * 1000:
                break  # listed in key order, which is expiry order: every later one is due later still
            image_uuid = canonical_uuid(found["uuid"])
            if image_uuid is not None:
                metadata_key = self._metadata_key(image_uuid)
                metadata = self._load_metadata(metadata_key)
                # The metadata decides: an entry whose image is gone already (swept as unused) only goes itself.
                if metadata is not None and metadata.get("uuid") == image_uuid and expired(metadata, now):
                    self._remove(image_uuid, metadata_key, metadata)
                    removed += 1
            # The entry last: an expiry interrupted before this finds the image again next time.
            self._client.delete_object(Bucket=self.location.bucket, Key=entry["Key"])
        return removed


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _failure(exc: Exception, *, reading: bool = False) -> StoreFailed:
    """A client-facing error for a failed call to the store: an error code at most, never a URL or credentials."""
    code = re.sub(r"[^A-Za-z0-9]", "", _code(exc))[:40]
    if code in _FULL_CODES:
        return StoreFailed("the server's image storage is full", disk_full=True, reading=reading)
    if code:
        return StoreFailed(f"the server's image storage failed ({code})", reading=reading)
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, BotoConnectionError | ConnectionError | TimeoutError):
        return StoreFailed("the server's image storage could not be reached", reading=reading)
    return StoreFailed(f"the server's image storage failed ({type(exc).__name__})", reading=reading)
