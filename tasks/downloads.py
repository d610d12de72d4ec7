"""Slow outbound work on threads of its own: model downloads never hold the threads the serving path needs.

A download is minutes of blocking reads (``air_registry/civitai.py`` is ``urllib``). On asyncio's default
thread pool, which also encodes every result, resizes inputs and answers modelSearch, six slow downloads of one
key left another key's 0.3 s inference waiting for 45 s. Here downloads run on a pool of ``--max-downloads``
threads of their own, and each API key has at most ``--max-downloads-per-key`` of them at once: a key's further
downloads wait for its own to end, so one key never takes every download thread either.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

T = TypeVar("T")


class Shared(Protocol):
    """A download that outlives the request that started it; a shutdown cancels what is left of it."""

    def cancel(self) -> None: ...


S = TypeVar("S", bound=Shared)


class Downloads:
    def __init__(self, *, workers: int, per_key: int) -> None:
        self.workers = workers
        self.per_key = per_key
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imagewire-download")
        self._keys: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}   # tasks of each key holding or waiting for one of its slots
        # Downloads that outlive the task that started them (modelDownload's), by what they fetch: a second
        # request for one follows it rather than starting another into the same files.
        self._shared: dict[str, Shared] = {}

    def shared(self, key: str, start: Callable[[], S]) -> S:
        """The download under way for ``key``, or the one ``start()`` begins now; ``forget`` ends its entry."""
        if key not in self._shared:
            self._shared[key] = start()
        return self._shared[key]  # type: ignore[return-value]

    def under_way(self, key: str) -> Shared | None:
        return self._shared.get(key)

    def forget(self, key: str) -> None:
        self._shared.pop(key, None)

    async def run(self, owner: str, work: Callable[..., T], *args: object) -> T:
        """``work(*args)`` on a download thread, once ``owner`` has a slot free."""
        async with self._slot(owner):
            return await asyncio.get_running_loop().run_in_executor(self._pool, work, *args)

    @contextlib.asynccontextmanager
    async def _slot(self, owner: str) -> AsyncIterator[None]:
        slots = self._keys.setdefault(owner, asyncio.Semaphore(self.per_key))
        self._users[owner] = self._users.get(owner, 0) + 1
        try:
            async with slots:
                yield
        finally:
            self._users[owner] -= 1
            if not self._users[owner]:  # nobody of this key holds or waits: forget it
                del self._users[owner], self._keys[owner]

    def close(self) -> None:
        """Let the threads go once their downloads end (a shutdown does not wait for them)."""
        for download in list(self._shared.values()):
            download.cancel()
        self._shared.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
