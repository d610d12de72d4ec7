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

import orjson

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
    flushing: Sender | None = None   # a socket just attached, taking the kept frames: new ones queue behind them

    async def send(self, frame: bytes) -> None:
        """Send now if a socket is attached, else keep the frame for a resuming client."""
        if self.sender is not None and self.flushing is None and await self.sender(frame):
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
        """The kept frames first, oldest first; frames sent meanwhile (a task answered during the flush) join the
        outbox behind them, so that each task's frames reach the client in the order they were made."""
        self.sender = sender
        self.detached_at = None
        self.flushing = sender
        try:
            while self.outbox and self.sender == sender:
                frame = self.outbox.pop(0)
                self.outbox_bytes -= len(frame)
                if not await sender(frame):   # the socket closed again: the frame waits for the next one
                    self.outbox.insert(0, frame)
                    self.outbox_bytes += len(frame)
                    return
        finally:
            if self.flushing == sender:   # not when another socket attached meanwhile, and flushes now
                self.flushing = None


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


Key = tuple[str, str]  # (owner, taskUUID): a UUID is one API key's name for its task
# A finished record as kept: when it finished, its encoding, and the part of ``kept_bytes`` its results are.
Finished = tuple[float, bytes, int]

# What one finished record costs beside its encoded bytes: its key (a tuple and the UUID string), the entry
# tuple, the bytes object's header and its slot in the dict.
FINISHED_ENTRY_OVERHEAD = 320


class TaskRegistry:
    """Every task's UUID, state and results, kept ``retention`` seconds after it finishes.

    Results of sync tasks are kept too: a client that lost its socket mid-task (the Runware SDKs
    do this) sends the task again, gets conflictTaskUUID, and asks getResponse for the results.

    A running task is a ``TaskRecord`` its runner writes to. A finished one is kept encoded, as one bytes
    object in a tuple with its finishing time, in the order tasks finished: a busy server keeps hundreds of
    thousands, and as plain objects every full pass of Python's garbage collector would walk them all (pauses
    of a quarter second and more, with every socket waiting), where tuples of bytes and numbers are not walked
    at all. Expired records are then the oldest ones, so a sweep reads only those.

    Two memory bounds: results (``kept_bytes``) within ``max_kept_bytes``, the oldest finished tasks' let go
    first (the record stays, so getResponse can say why) and a running task's only where running tasks alone
    hold more; and the records themselves (``record_bytes``) within a quarter of that, the oldest forgotten
    first, so that a flood of small tasks is bounded as surely as a few large ones.
    """

    def __init__(self, *, retention: float, max_kept_bytes: int = 256 * 1024 * 1024) -> None:
        self.retention = retention
        self.max_kept_bytes = max_kept_bytes
        self.max_record_bytes = max_kept_bytes // 4
        self.kept_bytes = 0
        self.record_bytes = 0
        self._running: dict[Key, TaskRecord] = {}
        self._finished: dict[Key, Finished] = {}  # oldest first
        self._finished_with_items: dict[Key, None] = {}  # those still holding results, oldest first

    async def begin(self, task_uuid: str, task_type: str, owner: str) -> TaskRecord:
        key = (owner, task_uuid)
        if key in self._running or key in self._finished:
            raise conflict(task_uuid, self.retention)
        record = TaskRecord(task_uuid, task_type, owner)
        self._running[key] = record
        return record

    async def keep(self, record: TaskRecord, item: dict[str, Any]) -> None:
        """Remember one result item of ``record`` for getResponse."""
        size = 64 + sum(len(value) for value in item.values() if isinstance(value, str))
        record.items.append(item)
        record.kept_bytes += size
        self.kept_bytes += size
        if self.kept_bytes > self.max_kept_bytes:
            self._let_go_of_oldest_results()

    async def finish(self, record: TaskRecord, status: str) -> None:
        record.status = status
        record.finished_at = time.monotonic()
        record.stop = None
        key = (record.owner, record.task_uuid)
        if self._running.pop(key, None) is None:
            return
        entry = (record.finished_at, _encoded(record), record.kept_bytes)
        self._finished[key] = entry
        self.record_bytes += _record_bytes(entry)
        if record.items:
            self._finished_with_items[key] = None
        while self.record_bytes > self.max_record_bytes:
            self._forget(next(iter(self._finished)))

    def _forget(self, key: Key) -> None:
        entry = self._finished.pop(key)
        self._finished_with_items.pop(key, None)
        self.record_bytes -= _record_bytes(entry)
        self.kept_bytes -= entry[2]

    def _let_go_of_oldest_results(self) -> None:
        while self.kept_bytes > self.max_kept_bytes and self._finished_with_items:
            key = next(iter(self._finished_with_items))
            del self._finished_with_items[key]
            finished_at, encoded, results = old = self._finished[key]
            stripped = (finished_at, orjson.dumps({**orjson.loads(encoded), "items": [], "items_dropped": True}), 0)
            self._finished[key] = stripped  # in its place among the oldest
            self.record_bytes += _record_bytes(stripped) - _record_bytes(old)
            self.kept_bytes -= results
        for record in self._running.values():  # stops as soon as enough is let go
            if self.kept_bytes <= self.max_kept_bytes:
                break
            if record.items:
                self.kept_bytes -= record.kept_bytes
                record.items, record.kept_bytes, record.items_dropped = [], 0, True

    async def get(self, task_uuid: str, owner: str, follower: str | None = None) -> TaskRecord | None:
        key = (owner, task_uuid)
        running = self._running.get(key)
        if running is not None:
            return running
        finished = self._finished.get(key)
        return _decoded(owner, task_uuid, finished) if finished is not None else None

    def progress(self, record: TaskRecord, percent: int) -> None:
        record.progress = percent

    async def cancel(self, task_uuid: str, owner: str) -> bool | None:
        """Stop a running task of ``owner``: True when stopped, False when it had ended, None when unknown
        (another key's tasks are unknown to it, as for getResponse)."""
        key = (owner, task_uuid)
        record = self._running.get(key)
        if record is None:
            return False if key in self._finished else None
        # Taken as it is used: of several cancels for one task (one frame may hold many), only the first stops it.
        stop, record.stop = record.stop, None
        if stop is None:
            return False
        stop()
        return True

    async def sweep(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        expired = []
        for key, (finished_at, _, _) in self._finished.items():  # oldest first: stops at the first one kept
            if now - finished_at <= self.retention:
                break
            expired.append(key)
        for key in expired:
            self._forget(key)
        return len(expired)

    def __len__(self) -> int:
        return len(self._running) + len(self._finished)


def _encoded(record: TaskRecord) -> bytes:
    return orjson.dumps({"type": record.task_type, "status": record.status, "items": record.items,
                         "errors": record.errors, "items_dropped": record.items_dropped, "expires": record.expires})


def _decoded(owner: str, task_uuid: str, entry: Finished) -> TaskRecord:
    finished_at, encoded, _ = entry
    saved = orjson.loads(encoded)
    return TaskRecord(task_uuid, saved["type"], owner, status=saved["status"], items=saved["items"],
                      errors=saved["errors"], finished_at=finished_at, items_dropped=saved["items_dropped"],
                      expires=saved["expires"])


def _record_bytes(entry: Finished) -> int:
    """What a finished record holds besides its results."""
    return max(0, len(entry[1]) - entry[2]) + FINISHED_ENTRY_OVERHEAD
