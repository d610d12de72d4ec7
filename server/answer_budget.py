"""What answering costs the server, bounded per API key and per socket: a token bucket of answer bytes.

A task answered from memory (getResponse, modelSearch, imageHistory, a refusal) needs neither the device
nor the disk, so no other bound slows it: a client sending frames of 64 of them as fast as it reads the
answers would keep the event loop encoding and sending, and every other client's pongs would wait behind
it. So every answer is paid for out of a bucket that holds ``burst`` bytes and fills at ``rate`` bytes a
second (``--answer-mib-per-second``): a task's answers through the API key's bucket, shared by all its
sockets and REST requests; what a socket answers itself (pongs, authentication, errors before it has a
key) through that socket's own.

An answer waits until its bucket is not in debt (behind those already waiting), then is encoded and
charged its size, but at least ``FRAME_COST_BYTES``: below that, what a frame costs the event loop is its
handling, not its bytes (a 64-task frame of refusals is 64 small frames). So a lone answer larger than the
bucket still goes (the bucket goes into debt, and the next one waits it off), and a storm is slowed to the
rate, its tasks waiting with the places they hold (``--max-tasks-in-flight``); past those, its refusals
wait too, and its socket is not read meanwhile. Other keys never wait for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# What one frame costs at least, in bytes' worth: handling a small task from its arrival to its answer on
# the socket takes the event loop about as long as encoding and sending tens of KiB (a few hundred µs on
# this project's 2-core machine), so at the default rate a key gets at most ~512 small frames a second.
FRAME_COST_BYTES = 64 * 1024
# Buckets kept for keys at most; a full bucket is forgotten first (it is the same as one never seen).
MAX_BUCKETS = 4096


class TokenBucket:
    """Bytes that may be answered now: at most ``burst``, filling at ``rate`` a second; below zero, in debt."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._level = burst
        self._when = clock()
        self._turn = asyncio.Lock()  # answers waiting for the bucket, first come first served

    def level(self) -> float:
        now = self._clock()
        self._level = min(self.burst, self._level + (now - self._when) * self.rate)
        self._when = now
        return self._level

    @property
    def full(self) -> bool:
        return self.level() >= self.burst

    async def ready(self) -> None:
        """Wait until the bucket is out of debt, behind the answers already waiting. Charge right after, without
        awaiting in between: the next in line looks only once this one has paid."""
        if not self._turn.locked() and self.level() >= 0:
            return
        async with self._turn:
            while (level := self.level()) < 0:
                await asyncio.sleep(-level / self.rate)

    def charge(self, size: int) -> None:
        self.level()
        self._level -= max(size, FRAME_COST_BYTES)


class AnswerBudget:
    """One bucket per API key, made when it first answers and forgotten once full again."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def bucket(self, owner: str) -> TokenBucket:
        bucket = self._buckets.get(owner)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_full()
            bucket = self._buckets[owner] = TokenBucket(self.rate, self.burst, self._clock)
        return bucket

    def per_socket(self) -> TokenBucket:
        """A bucket of its own for one socket's answers to itself, at the same rate."""
        return TokenBucket(self.rate, self.burst, self._clock)

    def _forget_full(self) -> None:
        for owner in [owner for owner, bucket in self._buckets.items() if bucket.full]:
            del self._buckets[owner]

    def __len__(self) -> int:
        return len(self._buckets)
