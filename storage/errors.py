"""What can go wrong with images at rest and in transit, in the storage layer's own terms.

    StorageError            base of them all
    ├── ImageNotStored      no image under that UUID (for that owner)
    ├── StoreFailed         the disk failed: full, read-only, an I/O error (messages never name a path)
    └── InputRejected       an input image cannot be used: not an image, too large, a forbidden URL, …
        └── FetchFailed     an http(s) URL could not be fetched

Storage knows nothing of the wire. Each error is phrased to follow the name of what was given
(``describe("seedImage")`` → "seedImage is not an image …"); the task layer turns it into an
error item naming the parameter, in one place.
"""

from __future__ import annotations

from typing import Any


def shown(value: Any, limit: int = 60) -> str:
    """A short, safe rendering of a client's value inside a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class StorageError(Exception):
    def __init__(self, problem: str, *, allowed_values: list[str] | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.allowed_values = allowed_values

    def describe(self, name: str) -> str:
        """The sentence for a client, about the input or image called ``name``."""
        return f"{name} {self.problem}"


class ImageNotStored(StorageError):
    def __init__(self, image_uuid: str) -> None:
        super().__init__(f"{image_uuid} does not name a stored image")
        self.image_uuid = image_uuid


class StoreFailed(StorageError):
    def __init__(self, problem: str, *, disk_full: bool = False, reading: bool = False) -> None:
        super().__init__(problem)
        self.disk_full = disk_full
        self.reading = reading  # the disk failed a read (of an input), not a write

    def describe(self, name: str) -> str:
        """``name``: the input read, or what was to be kept ("The result image")."""
        return f"{name} could not be {'read' if self.reading else 'stored'}: {self.problem}."


class InputRejected(StorageError):
    pass


class FetchFailed(InputRejected):
    """``origin`` is scheme://host[:port] only: no credentials, path or query reach a message."""

    def __init__(self, origin: str, what: str) -> None:
        super().__init__(f"URL {origin} {what}")
        self.origin = origin
        self.what = what

    def describe(self, name: str) -> str:
        return f"fetching {name} URL {self.origin} {self.what}"
