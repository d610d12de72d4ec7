"""API keys: which keys are accepted, and the owner token that scopes stored images to a key."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

KEY_FILE_NAME = "api-key"
KEY_PREFIX = "iw_"


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(keys)
        if not self._keys:
            raise ValueError("at least one API key is required")

    def check(self, candidate: str | None) -> bool:
        if not candidate:
            return False
        # Compare against every key in constant time so timing does not reveal a prefix.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate.encode(), key.encode())
        return matched


def owner_token(api_key: str) -> str:
    """What the store records as an image's owner: never the key itself."""
    return hashlib.sha256(b"imagewire-owner:" + api_key.encode()).hexdigest()[:32]


def new_api_key() -> str:
    """A fresh random key. The prefix makes it recognisable and keeps it from starting with "-",
    which a command line would read as a flag (``--api-key -abc`` fails to parse)."""
    return KEY_PREFIX + secrets.token_urlsafe(24)


def load_or_create_key(data_dir: Path) -> tuple[str, bool]:
    """The key kept in the data dir, created (owner-readable only) on first start.

    Returns the key and whether it was created just now, so the caller can print it once.
    """
    path = data_dir / KEY_FILE_NAME
    if path.exists():
        return path.read_text().strip(), False
    data_dir.mkdir(parents=True, exist_ok=True)
    key = new_api_key()
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    os.replace(temporary, path)
    return key, True
