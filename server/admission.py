"""Admission: how many unfinished tasks one connection and one API key may have.

One object holds both counts, so that taking and giving back a place happen in one spot: the
runner acquires a ticket before a task starts and releases it when the task is over, whatever
way it ends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from imagewire.tasks.errors import TooManyTasks


@dataclass(frozen=True, eq=False)
class Ticket:
    connection: Hashable
    owner: str


class Admission:
    def __init__(self, *, per_connection: int, per_key: int) -> None:
        self.per_connection = per_connection
        self.per_key = per_key
        self._by_connection: Counter[Hashable] = Counter()
        self._by_owner: Counter[str] = Counter()

    def acquire(self, connection: Hashable, owner: str) -> Ticket:
        """A place for one more task of ``connection`` (any hashable that names it) and ``owner``."""
        if self._by_connection[connection] >= self.per_connection:
            raise TooManyTasks(
                f"This connection already has {self._by_connection[connection]} unfinished tasks, the most "
                f"allowed (max {self.per_connection}); wait for some to finish.")
        if self._by_owner[owner] >= self.per_key:
            raise TooManyTasks(
                f"This API key already has {self.per_key} unfinished tasks over all its connections, the most "
                "allowed; wait for some to finish.")
        self._by_connection[connection] += 1
        self._by_owner[owner] += 1
        return Ticket(connection, owner)

    def release(self, ticket: Ticket) -> None:
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
