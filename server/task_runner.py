"""The task runner: one task from admission to its last answer, whatever the transport.

``start`` admits a task (the connection's and the API key's bounds), prepares it (every check that
needs no I/O), records its taskUUID (``conflictTaskUUID``), acknowledges it when it is async, and
runs it as its own asyncio task. Results go to the ``Reply`` the transport gave (for async tasks, to the
result registry instead, and from there to the sockets that asked getResponse), and to the webhook when the
task names one. Every way a task can end (results, a TaskError, our own
bug, a shutdown that cuts it off) is one outcome in one log line, greppable by taskUUID:

    taskUUID=… taskType=imageInference outcome=success results=1 total_ms=412.0 decode_ms=3.1 …

The runner knows no task type: what it needs to know of one, the task module declares in its
``TaskType`` (``tasks/task_type.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol

import msgspec

from imagewire.server.admission import Admission, Ticket
from imagewire.server.sessions import TaskRecord, Tasks
from imagewire.server.webhooks import WebhookSender
from imagewire.tasks import schema
from imagewire.tasks.context import Services, TaskContext
from imagewire.tasks.errors import InternalServerError, ServiceUnavailable, TaskCancelled, TaskError
from imagewire.tasks.supported import SUPPORTED
from imagewire.tasks.task_type import Delivery, Item, TaskType

log = logging.getLogger("imagewire.task")

# A getResponse holding its answer re-reads the record of a task running on another server this often.
RECHECK_SECONDS = 0.25


class Reply(Protocol):
    """Where a task's answers go: one call per frame's worth of data items and error items."""

    def __call__(self, data: Sequence[Item] = (), errors: Sequence[dict[str, Any]] = ()) -> Awaitable[None]: ...


# on_finished(task type, outcome, total seconds, stage seconds): after each task, refused ones too.
Finished = Callable[[str, str, float, Mapping[str, float]], None]


class TaskRunner:
    def __init__(self, services: Services, *, registry: Tasks, webhooks: WebhookSender,
                 admission: Admission, on_finished: Finished | None = None) -> None:
        self.services = services
        self.registry = registry
        self.webhooks = webhooks
        self.admission = admission
        self.on_finished = on_finished
        self.running: set[asyncio.Task[None]] = set()  # every running task, so a shutdown can drain them
        # The recorded tasks running here, by (owner, taskUUID): what getResponse follows and waits for.
        self.runs: dict[tuple[str, str], _Run] = {}
        self.pending_sends: set[asyncio.Future[None]] = set()  # progress items on their way

    def refused(self, task_type: str | None, code: str) -> None:
        """A task that never started (it could not be decoded): counted like one that failed its checks.
        Only task types this server knows are named; anything a client made up counts as "unknown"."""
        if self.on_finished is not None:
            known = task_type if task_type is not None and task_type in SUPPORTED else "unknown"
            self.on_finished(known, code, 0.0, {})

    async def start(self, task: schema.Task, task_type: TaskType[Any, Any], task_uuid: str, *, owner: str,
                    connection: Hashable, reply: Reply, streams: bool = True,
                    hold_seconds: float = 0.0, session: str | None = None) -> asyncio.Task[None] | None:
        """Admit and launch one task; the asyncio task that runs it, or None when it was refused
        (the refusal is answered through ``reply``). ``streams``: the transport delivers answers as
        they come (a socket), so progress items and the results a getResponse follows may go out too; a
        REST answer waits for the end, and its getResponse may hold it up to ``hold_seconds``. ``session``: the
        UUID of the socket's session, which another server pushes the results of a task it runs to."""
        ctx = TaskContext(self.services, owner)
        ctx.feed = _Feed(self, owner, connection, reply, streams, hold_seconds, session)
        delivery = task_type.delivery(task)
        ticket: Ticket | None = None
        try:
            ticket = self.admission.acquire(connection, owner, takes_place=task_type.takes_place)
            prepared = task_type.prepare(task, ctx)
            record = await self.registry.begin(task_uuid, task_type.name, owner) if task_type.recorded else None
        except TaskError as error:
            if ticket is not None:
                self.admission.release(ticket)
            log.info("taskUUID=%s taskType=%s outcome=%s", task_uuid, task_type.name, error.code)
            if self.on_finished is not None:
                self.on_finished(task_type.name, error.code, 0.0, {})
            await reply(errors=[error.to_item(task_type.name, task_uuid)])
            return None
        if delivery.asynchronous:
            await reply(data=[schema.Acknowledgement(taskType=task_type.name, taskUUID=task_uuid)])
        run = _Run(self, task_type, task_uuid, ctx, record, delivery, reply, streams)
        runner = asyncio.create_task(run.until_done(prepared))
        run.task = runner
        if record is not None:
            record.stop = run.cancel
            record.pushes = delivery.asynchronous
            self.runs[owner, task_uuid] = run
        self.running.add(runner)

        def finished(done: asyncio.Task[None]) -> None:
            self.running.discard(done)
            if self.runs.get((owner, task_uuid)) is run:
                del self.runs[owner, task_uuid]
            run.followers.clear()
            self.admission.release(ticket)
            ctx.release()

        runner.add_done_callback(finished)
        return runner


class _Run:
    """One task's run: where its items go, and how it ends."""

    def __init__(self, runner: TaskRunner, task_type: TaskType[Any, Any], task_uuid: str, ctx: TaskContext,
                 record: TaskRecord | None, delivery: Delivery, reply: Reply, streams: bool) -> None:
        self.runner = runner
        self.task_type = task_type
        self.task_uuid = task_uuid
        self.ctx = ctx
        self.record = record
        self.asynchronous = delivery.asynchronous
        # The webhook gets each result and error whichever way the task is delivered: Runware's docs put no
        # async-only condition on it, and a sync task's results still go over the socket as well.
        self.webhook = delivery.webhook_url
        self.reply = reply
        self.streams = streams
        self.task: asyncio.Task[None] | None = None
        self.cancelled_by_client = False
        self.kept = 0                                     # result items kept so far
        self.failure: dict[str, Any] | None = None        # the error item it ended with
        self.followers: dict[Hashable, _Following] = {}   # one per socket that asked getResponse
        ctx.progress_sink = self._progress

    def follow(self, connection: Hashable, reply: Reply) -> _Following:
        """Push what this task produces from now on to ``reply``. A socket that asks again replaces its
        subscription, so that each result is pushed to it once however often it polls."""
        following = _Following(self, connection, reply, missed=self.failure)
        self.followers[connection] = following
        return following

    def cancel(self) -> None:
        """cancelTask: stop the task; it answers that it was cancelled."""
        if self.task is not None and not self.task.done():
            self.cancelled_by_client = True
            self.task.cancel()

    def _progress(self, items: Sequence[Any], overall: int, push: bool) -> None:
        if self.record is not None:
            self.runner.registry.progress(self.record, overall)
        if push and self.streams and not self.asynchronous:
            # Sent like any answer of the task; ahead of its results, which are still being encoded.
            self.runner.pending_sends.add(sending := asyncio.ensure_future(self.reply(data=items)))
            sending.add_done_callback(self.runner.pending_sends.discard)

    async def until_done(self, prepared: Any) -> None:
        """Results stream one frame per item as they are ready, unless the task type answers in one frame."""
        started = time.perf_counter()
        outcome, results = "success", 0
        collected: list[Item] = []
        try:
            async for item in self.task_type.run(prepared, self.ctx):
                results += 1
                await self._keep(item)
                if self.task_type.single_frame:
                    collected.append(item)
                elif not self.asynchronous:
                    with self.ctx.timed("send"):
                        await self.reply(data=[item])
            if self.ctx.deferred is not None:
                raise self.ctx.deferred  # after its results, which stand (a failed uploadEndpoint)
            if collected:
                await self.reply(data=collected)
        except TaskError as error:
            outcome = error.code
            await asyncio.shield(self._fail(error, collected))
        except asyncio.CancelledError:
            outcome = "cancelled"
            if self.cancelled_by_client:
                stopped: TaskError = TaskCancelled(
                    f"Task {self.task_uuid} was cancelled (cancelTask) before it finished.")
                await asyncio.shield(self._fail(stopped, collected))
                return
            # A shutdown whose grace ran out: tell the client rather than go silent.
            stopped = ServiceUnavailable("The server shut down before this task finished; send it again.")
            await asyncio.shield(self._fail(stopped, collected))
            raise
        except Exception:
            outcome = "internalServerError"
            log.exception("taskUUID=%s taskType=%s failed with an internal error", self.task_uuid, self.task_type.name)
            internal = InternalServerError("The server failed on this task; the server log has details.")
            await asyncio.shield(self._fail(internal, collected))
        finally:
            if self.record is not None:
                # Shielded: a shutdown cutting the task off must not cut off its record's last write too.
                await asyncio.shield(self.runner.registry.finish(self.record, "success" if outcome == "success"
                                                                 else "error"))
            total = time.perf_counter() - started
            stages = " ".join(f"{name}_ms={seconds * 1000:.1f}" for name, seconds in self.ctx.timings.items())
            log.info("taskUUID=%s taskType=%s outcome=%s results=%d total_ms=%.1f %s", self.task_uuid,
                     self.task_type.name, outcome, results, total * 1000, stages)
            if self.runner.on_finished is not None:
                self.runner.on_finished(self.task_type.name, outcome, total, self.ctx.timings)

    async def _keep(self, item: Item) -> None:
        """An item for getResponse and the webhook; turned into a dict once for both."""
        if self.record is None and not self.webhook:
            return
        as_dict = _as_dict(item)
        index, self.kept = self.kept, self.kept + 1
        if self.record is not None:
            self.record.expires = self.ctx.expires  # written with the record's end, where it is shared
            await self.runner.registry.keep(self.record, as_dict)
        if self.webhook:
            self.runner.webhooks.send(self.webhook, as_dict)
        # After the registry has it: a getResponse reading from now on has it in its answer (and skips it here).
        for following in list(self.followers.values()):
            await following.offer(index, as_dict)

    async def _fail(self, error: TaskError, collected: list[Item]) -> None:
        item = error.to_item(self.task_type.name, self.task_uuid)
        if self.record is not None:
            self.record.errors.append(item)
        self.failure = item
        if self.webhook:
            self.runner.webhooks.send(self.webhook, item)
        for following in list(self.followers.values()):
            await following.offer(None, item)
        if self.task_type.single_frame:
            await self.reply(data=collected, errors=[item])
        elif not self.asynchronous:
            await self.reply(errors=[item])


class _Following:
    """One socket's subscription to a running async task (``tasks/context.py`` Subscription).

    Until getResponse has read the record (``start``), what the task offers is held here; then each result
    the answer did not hold, and the task's error, is sent through the socket's ``reply``, the session's send
    like any answer (so a client that resumes its session gets them too)."""

    def __init__(self, run: _Run, connection: Hashable, reply: Reply, missed: dict[str, Any] | None) -> None:
        self.run = run
        self.connection = connection
        self.reply = reply
        self.seen: int | None = None   # result items the getResponse answer held, once it is known
        self.early: list[tuple[int | None, dict[str, Any]]] = []
        # The task had failed before this subscription: its error is pushed unless the answer holds it.
        self.missed = missed

    async def start(self, seen: int, running: bool) -> None:
        if not running:  # the answer holds every result, or the error
            self.cancel()
            return
        self.seen = seen
        early, self.early = self.early, []
        if self.missed is not None:
            early.append((None, self.missed))
        for index, item in early:
            await self._send(index, item)

    def cancel(self) -> None:
        self.early = []
        if self.run.followers.get(self.connection) is self:
            del self.run.followers[self.connection]

    async def offer(self, index: int | None, item: dict[str, Any]) -> None:
        """A result (``index``: its place among the task's results) or the error (``index`` None)."""
        if self.seen is None:
            self.early.append((index, item))
        else:
            await self._send(index, item)

    async def _send(self, index: int | None, item: dict[str, Any]) -> None:
        if index is None:
            self.missed = None
            self.cancel()
            await self.reply(errors=[{**item, "status": "error"}])
        elif self.seen is not None and index >= self.seen:
            await self.reply(data=[{**item, "status": "success"}])


class _Feed:
    """What getResponse may do beyond reading the record (``tasks/context.py`` Feed), for one transport."""

    def __init__(self, runner: TaskRunner, owner: str, connection: Hashable, reply: Reply, streams: bool,
                 hold_seconds: float, session: str | None) -> None:
        self.runner = runner
        self.owner = owner
        self.connection = connection
        self.reply = reply
        self.streams = streams
        self.hold_seconds = hold_seconds
        self.session = session

    def follower(self, task_uuid: str) -> str | None:
        if not self.streams or (self.owner, task_uuid) in self.runner.runs:
            return None
        return self.session

    def follow(self, task_uuid: str) -> _Following | None:
        run = self.runner.runs.get((self.owner, task_uuid))
        # Only async tasks: a sync task's results already go to its session, a resumed one included.
        if not self.streams or run is None or not run.asynchronous:
            return None
        return run.follow(self.connection, self.reply)

    async def changed(self, task_uuid: str, timeout: float) -> None:
        run = self.runner.runs.get((self.owner, task_uuid))
        if run is None or run.task is None:
            # Running on another server (shared state): its record is read again shortly.
            await asyncio.sleep(min(timeout, RECHECK_SECONDS))
            return
        await asyncio.wait({run.task}, timeout=timeout)


def _as_dict(item: Item) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    result = msgspec.to_builtins(item)
    assert isinstance(result, dict)
    return result
