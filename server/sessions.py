"""What outlives one socket: sessions (for resume) and the record of every task (for
``conflictTaskUUID``, ``getResponse`` and async delivery).

A ``Session`` is what ``connectionSessionUUID`` names. Frames sent while no socket is
attached are kept in its outbox for ``resume_window`` seconds and flushed when the client
authenticates again with the same UUID and API key. A ``TaskRecord`` remembers that a
taskUUID was used (so it runs only once) and, for async tasks, the items to hand back.
Both registries are swept periodically so nothing grows without bound.

Two implementations keep them: the classes here, in this process's memory (the default), and
``server/state.py``, in Redis (``--state redis://…``), shared by every server using it. Callers see
them through ``Sessions`` and ``Tasks``; every call that may reach Redis is a coroutine.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from imagewire.tasks.errors import ConflictTaskUUID

Sender = Callable[[bytes], Awaitable[bool]]  # returns False when the socket is gone


class ClientSession(Protocol):
    """One ``connectionSessionUUID``: where a task's frames go, whichever socket (if any) is attached."""

    @property
    def uuid(self) -> str: ...

    @property
    def owner(self) -> str: ...

    async def send(self, frame: bytes) -> None:
        """To the attached socket, else kept for a resuming client."""
        ...

    async def keep(self, frames: list[bytes]) -> None:
        """Frames a closed socket did not take: they go first when the client resumes."""
        ...

    async def detach(self, sender: Sender) -> None: ...

    async def attach(self, sender: Sender) -> None:
        """``sender`` takes this session's frames from now on, those kept first."""
        ...


class Sessions(Protocol):
    async def open(self, owner: str, resume_uuid: str | None) -> tuple[ClientSession, bool]:
        """The session to use after authentication, and whether it is a resumed one."""
        ...

    async def sweep(self) -> int: ...

    def __len__(self) -> int: ...


class Tasks(Protocol):
    """The record of every task: its UUID is used once, its results are kept for getResponse."""

    @property
    def retention(self) -> float: ...

    @property
    def max_kept_bytes(self) -> int: ...

    async def begin(self, task_uuid: str, task_type: str, owner: str) -> TaskRecord:
        """A record for a task that starts now; ConflictTaskUUID when ``owner`` used the UUID already."""
        ...

    async def keep(self, record: TaskRecord, item: dict[str, Any]) -> None: ...

    def progress(self, record: TaskRecord, percent: int) -> None:
        """How far the task is, for getResponse (written in the background where it is not in memory)."""
        ...

    async def finish(self, record: TaskRecord, status: str) -> None:
        """The task ended with ``status``, and with ``record.errors`` when it failed."""
        ...

    async def get(self, task_uuid: str, owner: str, follower: str | None = None) -> TaskRecord | None:
        """The record; ``follower``, a session UUID, is also subscribed to the task's later results where another
        server runs it (the shared state; in memory every task runs here, and the runner follows it)."""
        ...

    async def cancel(self, task_uuid: str, owner: str) -> bool | None: ...

    async def sweep(self) -> int: ...

    def __len__(self) -> int: ...


def conflict(task_uuid: str, retention: float) -> ConflictTaskUUID:
    return ConflictTaskUUID(
        f"taskUUID {task_uuid} was already used by a task that is running or was answered in the last "
        f"{int(retention)} s; every task needs a new UUID. getResponse with this taskUUID "
        "returns its results.", parameter="taskUUID", type="string")


@dataclass
class Session:
    uuid: str
    owner: str
    max_outbox_bytes: int
    sender: Sender | None = None
    outbox: list[bytes] = field(default_factory=list)
    outbox_bytes: int = 0
    detached_at: float | None = None

    async def send(self, frame: bytes) -> None:
        """Send now if a socket is attached, else keep the frame for a resuming client."""
        if self.sender is not None and await self.sender(frame):
            return
        self.outbox.append(frame)
        self.outbox_bytes += len(frame)
        # A client that never comes back must not make the server hold its images in memory:
        # past the bound the oldest frames go (their images stay reachable by UUID and URL).
        while self.outbox_bytes > self.max_outbox_bytes and len(self.outbox) > 1:
            self.outbox_bytes -= len(self.outbox.pop(0))

    async def keep(self, frames: list[bytes]) -> None:
        """Frames a closed socket did not take: they go first, ahead of anything kept since."""
        self.outbox[:0] = frames
        self.outbox_bytes += sum(len(frame) for frame in frames)
        while self.outbox_bytes > self.max_outbox_bytes and len(self.outbox) > 1:
            self.outbox_bytes -= len(self.outbox.pop(0))

    async def detach(self, sender: Sender) -> None:
        # ==, not is: each access to a bound method makes a new object, and equal ones share their self.
        if self.sender == sender:
            self.sender = None
            self.detached_at = time.monotonic()

    async def attach(self, sender: Sender) -> None:
        self.sender = sender
        self.detached_at = None
        pending, self.outbox, self.outbox_bytes = self.outbox, [], 0
        for frame in pending:
            await self.send(frame)


class SessionRegistry:
    def __init__(self, *, resume_window: float, max_outbox_bytes: int) -> None:
        self.resume_window = resume_window
        self.max_outbox_bytes = max_outbox_bytes
        self._sessions: dict[str, Session] = {}

    async def open(self, owner: str, resume_uuid: str | None) -> tuple[ClientSession, bool]:
        """The session to use after authentication, and whether it is a resumed one."""
        if resume_uuid is not None:
            session = self._sessions.get(resume_uuid)
            if session is not None and session.owner == owner:
                return session, True
        session = Session(uuid=str(uuid.uuid4()), owner=owner, max_outbox_bytes=self.max_outbox_bytes)
        self._sessions[session.uuid] = session
        return session, False

    async def sweep(self, now: float | None = None) -> int:
        """Forget sessions detached for longer than the resume window; returns how many."""
        now = time.monotonic() if now is None else now
        expired = [
            key for key, session in self._sessions.items()
            if session.detached_at is not None and now - session.detached_at > self.resume_window
        ]
        for key in expired:
            del self._sessions[key]
        return len(expired)

    def __len__(self) -> int:
        return len(self._sessions)


@dataclass
class TaskRecord:
    task_uuid: str
    task_type: str
    owner: str
    status: str = "processing"           # processing | success | error
    items: list[dict[str, Any]] = field(default_factory=list)    # for getResponse
    errors: list[dict[str, Any]] = field(default_factory=list)
    finished_at: float | None = None
    kept_bytes: int = 0
    items_dropped: bool = False          # its items were let go to bound memory
    progress: int | None = None          # percent done, while it runs and reports it
    stop: Callable[[], None] | None = None  # cancels it while it runs
    pushes: bool = False                 # its results go to the sessions that asked getResponse (async tasks)
    expires: float | None = None         # when its first image's ttl ends (epoch seconds): its results stop then


class TaskRegistry:
    """Every task's UUID, state and results, kept ``retention`` seconds after it finishes.

    Results of sync tasks are kept too: a client that lost its socket mid-task (the Runware SDKs
    do this) sends the task again, gets conflictTaskUUID, and asks getResponse for the results.
    Past ``max_kept_bytes`` the results of the oldest finished tasks are let go first.
    """

    def __init__(self, *, retention: float, max_kept_bytes: int = 256 * 1024 * 1024) -> None:
        self.retention = retention
        self.max_kept_bytes = max_kept_bytes
        self.kept_bytes = 0
        # By (owner, taskUUID): a UUID is one API key's name for its task, so another key may use the same
        # one without being told of, or kept from, a task it cannot see.
        self._records: dict[tuple[str, str], TaskRecord] = {}
        # The records holding results, oldest first: what letting go walks, rather than every record.
        self._holding: dict[tuple[str, str], TaskRecord] = {}

    async def begin(self, task_uuid: str, task_type: str, owner: str) -> TaskRecord:
        if (owner, task_uuid) in self._records:
            raise conflict(task_uuid, self.retention)
        record = TaskRecord(task_uuid, task_type, owner)
        self._records[owner, task_uuid] = record
        return record

    async def keep(self, record: TaskRecord, item: dict[str, Any]) -> None:
        """Remember one result item of ``record`` for getResponse."""
        size = 64 + sum(len(value) for value in item.values() if isinstance(value, str))
        record.items.append(item)
        self._holding.setdefault((record.owner, record.task_uuid), record)
        record.kept_bytes += size
        self.kept_bytes += size
        if self.kept_bytes > self.max_kept_bytes:
            self._let_go_of_oldest()

    def _let_go_of_oldest(self) -> None:
        # Finished tasks go first, and running ones only if they alone hold more than the bound.
        excess = self.kept_bytes - self.max_kept_bytes
        for finished_only in (True, False):
            chosen = []
            for record in self._holding.values():  # stops as soon as enough is found
                if excess <= 0:
                    break
                if record.finished_at is not None or not finished_only:
                    chosen.append(record)
                    excess -= record.kept_bytes
            for record in chosen:
                self._drop_items(record)

    def _drop_items(self, record: TaskRecord) -> None:
        if self._holding.pop((record.owner, record.task_uuid), None) is None:
            return
        self.kept_bytes -= record.kept_bytes
        record.items, record.kept_bytes, record.items_dropped = [], 0, True

    async def get(self, task_uuid: str, owner: str, follower: str | None = None) -> TaskRecord | None:
        return self._records.get((owner, task_uuid))

    def progress(self, record: TaskRecord, percent: int) -> None:
        record.progress = percent

    async def finish(self, record: TaskRecord, status: str) -> None:
        record.status = status
        record.finished_at = time.monotonic()
        record.stop = None

    async def cancel(self, task_uuid: str, owner: str) -> bool | None:
        """Stop a running task of ``owner``: True when stopped, False when it had ended, None when unknown
        (another key's tasks are unknown to it, as for getResponse)."""
        record = self._records.get((owner, task_uuid))
        if record is None:
            return None
        # Taken as it is used: of several cancels for one task (one frame may hold many), only the first stops it.
        stop, record.stop = record.stop, None
        if stop is None:
            return False
        stop()
        return True

    async def sweep(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        expired = [key for key, record in self._records.items()
                   if record.finished_at is not None and now - record.finished_at > self.retention]
        for key in expired:
            self._drop_items(self._records.pop(key))
        return len(expired)

    def __len__(self) -> int:
        return len(self._records)
