"""The seam between the server and where images live: what every image store does.

Two stores implement it: :class:`~imagewire.storage.store.ImageStore` (local disk, the default) and
:class:`~imagewire.storage.s3.S3Store` (an S3-compatible bucket). Callers never learn which one they
have; every failure either raises is a :mod:`storage.errors <imagewire.storage.errors>` error.
"""

from __future__ import annotations

from typing import Protocol

from imagewire.storage.store import SharedWrite, StoredImage


class ImageStorage(Protocol):
    async def put(self, data: bytes, *, extension: str, owner: str, ttl: float | None = None) -> StoredImage:
        """Store ``data`` under a new UUID v4, visible only once whole, and return its record. With ``ttl``
        it is served for that many seconds and never after, and ``expire`` deletes it once they are over."""
        ...

    def shared_write(self, owner: str) -> SharedWrite | None:
        """How a process on another machine (a Ray replica) may store an image of ``owner`` here itself: which
        store, and the room left under its bounds as this process counts it. None where no other machine can
        reach this store (local disk): this process then stores every image."""
        ...

    def adopt(self, image: StoredImage) -> None:
        """Count an image that another process stored here (after ``shared_write``) as this store's own write: its
        bytes join the usage the bounds are checked against."""
        ...

    async def get(self, image_uuid: str, *, owner: str | None) -> StoredImage:
        """The image ``image_uuid`` if it exists and belongs to ``owner`` (None: anyone's); someone
        else's image raises the same ImageNotStored as a missing one. Notes the use, best-effort."""
        ...

    async def read(self, image: StoredImage) -> bytes:
        """The bytes of an image ``get`` or ``put`` returned."""
        ...

    async def recent(self, owner: str, limit: int) -> list[StoredImage]:
        """``owner``'s newest images, newest first, at most ``limit``: on local disk those this process
        stored since it started, in a bucket those any server stored."""
        ...

    async def sweep(self, *, max_age_seconds: float, now: float | None = None) -> int:
        """Delete images unused for more than ``max_age_seconds``, and those past their time to live; return
        how many."""
        ...

    async def expire(self, *, now: float | None = None) -> int:
        """Delete the images whose time to live has ended by ``now``; return how many. Quick where none is
        due: it reads only the images it deletes, and runs as often as the task records are swept."""
        ...
