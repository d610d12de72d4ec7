"""Admission: how many unfinished tasks one connection and one API key may have, and how much
device time a key may still use.

One object holds the counts, so that taking and giving back a place happen in one spot: the
runner acquires a ticket before a task starts and releases it when the task is over, whatever
way it ends.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from imagewire.tasks.errors import TooManyTasks


@dataclass(frozen=True, eq=False)
class Ticket:
    connection: Hashable
    owner: str
    takes_place: bool = True


class DeviceTime:
    """Device seconds per API key over a sliding hour (``--device-seconds-per-key-hour``).

    Each key has a bucket that holds at most ``per_hour`` seconds and fills at ``per_hour / 3600`` per
    second; the device's calls drain it (``use``, from the device thread). A key whose bucket is empty
    gets no new task until it has filled a little, so a key's use over any hour stays near its budget,
    while its tasks already admitted run to the end. A key never seen has a full bucket.
    """

    def __init__(self, per_hour: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_hour = per_hour
        self._clock = clock
        self._lock = threading.Lock()  # use() comes from the device thread, left() from the event loop
        self._buckets: dict[str, tuple[float, float]] = {}  # owner → (seconds left, when)

    def _level(self, owner: str, now: float) -> float:
        left, when = self._buckets.get(owner, (self.per_hour, now))
        return min(self.per_hour, left + (now - when) * self.per_hour / 3600)

    def use(self, owner: str, seconds: float) -> None:
        with self._lock:
            now = self._clock()
            left = self._level(owner, now) - seconds
            if left >= self.per_hour:
                self._buckets.pop(owner, None)  # full again: forget it, so the table stays small
            else:
                self._buckets[owner] = (left, now)

    def left(self, owner: str) -> float:
        with self._lock:
            return self._level(owner, self._clock())

    def refuse(self, owner: str) -> TooManyTasks | None:
        left = self.left(owner)
        if left > 0:
            return None
        wait = math.ceil((-left + 1) * 3600 / self.per_hour)  # until a second of device time is back
        return TooManyTasks(
            f"This API key has used its device time: at most {self.per_hour:g} device seconds an hour "
            f"(--device-seconds-per-key-hour); send it again in about {wait} s.")


class Admission:
    """Places for unfinished tasks. A task that takes no place (cancelTask: it would otherwise be refused
    when the tasks it is sent to stop hold every place) counts apart, ``per_connection_placeless`` at most
    per connection: one message's worth of them answered at a time."""

    def __init__(self, *, per_connection: int, per_key: int, device_time: DeviceTime | None = None,
                 per_connection_placeless: int = 64) -> None:
        self.per_connection = per_connection
        self.per_key = per_key
        self.device_time = device_time
        self.per_connection_placeless = per_connection_placeless
        self._by_connection: Counter[Hashable] = Counter()
        self._by_owner: Counter[str] = Counter()
        self._placeless: Counter[Hashable] = Counter()

    def acquire(self, connection: Hashable, owner: str, *, takes_place: bool = True) -> Ticket:
        """A place for one more task of ``connection`` (any hashable that names it) and ``owner``."""
        if not takes_place:
            if self._placeless[connection] >= self.per_connection_placeless:
                raise TooManyTasks(
                    f"This connection already has {self._placeless[connection]} unanswered cancelTask tasks, the "
                    f"most allowed (max {self.per_connection_placeless}); wait for their answers.")
            self._placeless[connection] += 1
            return Ticket(connection, owner, takes_place=False)
        if self._by_connection[connection] >= self.per_connection:
            raise TooManyTasks(
                f"This connection already has {self._by_connection[connection]} unfinished tasks, the most "
                f"allowed (max {self.per_connection}); wait for some to finish.")
        if self._by_owner[owner] >= self.per_key:
            raise TooManyTasks(
                f"This API key already has {self.per_key} unfinished tasks over all its connections, the most "
                "allowed; wait for some to finish.")
        refused = self.device_time.refuse(owner) if self.device_time is not None else None
        if refused is not None:
            raise refused
        self._by_connection[connection] += 1
        self._by_owner[owner] += 1
        return Ticket(connection, owner)

    def release(self, ticket: Ticket) -> None:
        if not ticket.takes_place:
            _decrement(self._placeless, ticket.connection)
            return
        _decrement(self._by_connection, ticket.connection)
        _decrement(self._by_owner, ticket.owner)

    def unfinished(self, *, connection: Hashable | None = None, owner: str | None = None) -> int:
        if connection is not None:
            return self._by_connection[connection]
        if owner is not None:
            return self._by_owner[owner]
        return sum(self._by_owner.values())


def _decrement(counts: Counter[Any], key: Hashable) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]  # a count per connection ever seen would grow without bound
