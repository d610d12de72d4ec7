"""One client socket: read frames, answer pings and authentication at once, run every
other task as its own asyncio task, and send each result as soon as it exists.

Nothing here blocks the event loop: decoding a frame is microseconds per task, and all
image work happens in the handlers' thread pool calls or on the device worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from server import protocol
from server.auth import ApiKeys, owner_token
from server.dispatcher import handler_for, precheck
from server.errors import InternalServerError, InvalidApiKey, MissingApiKey, ServiceUnavailable, TaskError
from server.services import Services, TaskContext
from server.sessions import Session, TaskRecord
from tasks import schema

log = logging.getLogger("imagewire.task")
connection_log = logging.getLogger("imagewire.connection")


class Connection:
    def __init__(self, websocket: ServerConnection, services: Services, api_keys: ApiKeys,
                 running: set[asyncio.Task[None]]) -> None:
        self.websocket = websocket
        self.services = services
        self.api_keys = api_keys
        self.running = running  # every task of the server, so a shutdown can drain them
        self.session: Session | None = None
        self.in_flight = 0
        peer = websocket.remote_address
        self.peer_ip = str(peer[0]) if peer else "unknown"

    async def serve(self) -> None:
        config = self.services.config
        waiting = self.services.unauthenticated_by_ip
        connection_log.info("connection opened peer=%s", self.websocket.remote_address)
        if waiting[self.peer_ip] >= config.max_unauthenticated_per_ip:
            await self._refuse(f"Too many connections from {self.peer_ip} are waiting to authenticate "
                               f"(max {config.max_unauthenticated_per_ip}); authenticate or close them first.")
            return
        waiting[self.peer_ip] += 1
        deadline = asyncio.get_running_loop().call_later(config.auth_timeout, self._authentication_overdue)
        try:
            async for frame in self.websocket:
                was_authenticated = self.session is not None
                await self._on_frame(frame)
                if self.session is not None and not was_authenticated:
                    deadline.cancel()
                    waiting[self.peer_ip] -= 1
        except ConnectionClosed:
            pass
        finally:
            deadline.cancel()
            if self.session is None:
                waiting[self.peer_ip] -= 1
            if waiting[self.peer_ip] <= 0:
                del waiting[self.peer_ip]
            if self.session is not None:
                self.session.detach(self._send)
            connection_log.info("connection closed peer=%s session=%s", self.websocket.remote_address,
                                self.session.uuid if self.session else None)

    async def _refuse(self, message: str) -> None:
        """Answer with one error item, then close with 1008 (policy violation)."""
        await self._send(protocol.error_frame(ServiceUnavailable(message), "authentication", None))
        await self.websocket.close(1008, "policy violation")

    def _authentication_overdue(self) -> None:
        if self.session is None:
            asyncio.ensure_future(self._refuse(
                f"No authentication within {self.services.config.auth_timeout:g} s of connecting; "
                "send [{\"taskType\":\"authentication\",\"apiKey\":\"...\"}] first."))

    async def _send(self, frame: bytes) -> bool:
        try:
            await self.websocket.send(frame, text=True)
            return True
        except ConnectionClosed:
            return False

    async def _reply(self, frame: bytes) -> None:
        """Answer on this socket, or into the session's outbox once there is a session."""
        if self.session is not None:
            await self.session.send(frame)
        else:
            await self._send(frame)

    async def _on_frame(self, frame: str | bytes) -> None:
        try:
            decoded = protocol.decode_frame(frame, max_tasks=self.services.config.max_tasks_per_message)
        except protocol.FrameError as error:
            await self._send(protocol.error_frame(error, None, None))
            return
        for element in decoded:
            if self.session is None and element.task_type not in ("authentication", "ping"):
                # Before authentication every other task gets the same answer, valid or not.
                refusal = MissingApiKey("Authenticate first: send [{\"taskType\":\"authentication\",\"apiKey\":"
                                      "\"...\"}] before other tasks.", parameter="apiKey", type="string")
                await self._send(protocol.error_frame(refusal, element.task_type, element.task_uuid))
            elif element.error is not None:
                log.info("taskUUID=%s taskType=%s outcome=%s", element.task_uuid, element.task_type,
                         element.error.code)
                await self._reply(protocol.error_frame(element.error, element.task_type, element.task_uuid))
            elif isinstance(element.task, schema.Ping):
                await self._send(protocol.encode_frame(data=[schema.Pong(taskType="ping", pong=True)]))
            elif isinstance(element.task, schema.Authentication):
                await self._authenticate(element.task)
            else:
                assert element.task is not None and element.task_type is not None
                await self._start(element.task, element.task_type, element.task_uuid)

    async def _authenticate(self, task: schema.Authentication) -> None:
        if not self.api_keys.check(task.apiKey):
            error = InvalidApiKey("Invalid API key: the server does not accept the apiKey given.",
                                  parameter="apiKey", type="string")
            await self._send(protocol.error_frame(error, "authentication", None))
            return
        assert task.apiKey is not None
        if self.session is not None:
            self.session.detach(self._send)
        self.session, resumed = self.services.sessions.open(owner_token(task.apiKey), task.connectionSessionUUID)
        await self._send(protocol.encode_frame(data=[
            schema.AuthenticationResult(taskType="authentication", connectionSessionUUID=self.session.uuid)]))
        connection_log.info("authenticated session=%s resumed=%s", self.session.uuid, resumed)
        await self.session.attach(self._send)

    async def _start(self, task: schema.Task, task_type: str, task_uuid: str | None) -> None:
        assert self.session is not None and task_uuid is not None
        config = self.services.config
        asynchronous = isinstance(task, schema.ImageInference) and task.deliveryMethod == "async"
        try:
            if self.in_flight >= config.max_tasks_in_flight:
                raise ServiceUnavailable(
                    f"This connection already has {self.in_flight} unfinished tasks, the most allowed "
                    f"(max {config.max_tasks_in_flight}); wait for some to finish.")
            if self.services.tasks_by_owner[self.session.owner] >= config.max_tasks_per_key:
                raise ServiceUnavailable(
                    f"This API key already has {config.max_tasks_per_key} unfinished tasks over all its "
                    "connections, the most allowed; wait for some to finish.")
            if asynchronous:
                precheck(task, self.services)
            record = None
            if not isinstance(task, schema.GetResponse):
                record = self.services.registry.begin(task_uuid, task_type, self.session.owner)
        except TaskError as error:
            log.info("taskUUID=%s taskType=%s outcome=%s", task_uuid, task_type, error.code)
            await self._reply(protocol.error_frame(error, task_type, task_uuid))
            return
        if asynchronous:
            await self._reply(protocol.encode_frame(data=[schema.Acknowledgement(taskType=task_type,
                                                                                  taskUUID=task_uuid)]))
        self.in_flight += 1
        owner = self.session.owner
        self.services.tasks_by_owner[owner] += 1
        runner = asyncio.create_task(self._run(task, task_type, task_uuid, record, self.session, asynchronous))
        self.running.add(runner)
        runner.add_done_callback(lambda done: self._finished(done, owner))

    def _finished(self, runner: asyncio.Task[None], owner: str) -> None:
        self.running.discard(runner)
        self.in_flight -= 1
        counts = self.services.tasks_by_owner
        counts[owner] -= 1
        if counts[owner] <= 0:
            del counts[owner]

    async def _run(self, task: schema.Task, task_type: str, task_uuid: str, record: TaskRecord | None,
                   session: Session, asynchronous: bool) -> None:
        """Run one task to its end. Results go to the session, so a client that reconnects gets them.

        Results stream one frame per item as they are ready; a getResponse, which reports a
        state rather than producing results, is answered in a single frame.
        """
        ctx = TaskContext(self.services, session.owner)
        started = time.perf_counter()
        outcome, results = "success", 0
        webhook = getattr(task, "webhookURL", None) if asynchronous else None
        one_frame = isinstance(task, schema.GetResponse)
        collected: list[Any] = []
        try:
            async for item in handler_for(task)(task, ctx):
                results += 1
                as_dict = _as_dict(item)
                if record is not None:
                    self.services.registry.keep(record, as_dict)
                if webhook:
                    self.services.webhooks.send(webhook, as_dict)
                if one_frame:
                    collected.append(item)
                elif not asynchronous:
                    with ctx.timed("send"):
                        await session.send(protocol.encode_frame(data=[item]))
            if collected:
                await session.send(protocol.encode_frame(data=collected))
        except TaskError as error:
            outcome = error.code
            if one_frame:
                await session.send(protocol.encode_frame(
                    data=collected, errors=[error.to_item(task_type, task_uuid)]))
            else:
                await self._fail(error, task_type, task_uuid, record, session, asynchronous, webhook)
        except asyncio.CancelledError:
            # Only a shutdown whose grace ran out cancels a task: tell the client rather than go silent.
            outcome = "cancelled"
            stopped = ServiceUnavailable("The server shut down before this task finished; send it again.")
            await self._fail(stopped, task_type, task_uuid, record, session, asynchronous, webhook)
            raise
        except Exception:
            outcome = "internalServerError"
            log.exception("taskUUID=%s taskType=%s failed with an internal error", task_uuid, task_type)
            internal = InternalServerError("The server failed on this task; the server log has details.")
            await self._fail(internal, task_type, task_uuid, record, session, asynchronous, webhook)
        finally:
            if record is not None:
                self.services.registry.finish(record, "success" if outcome == "success" else "error")
            stages = " ".join(f"{name}_ms={seconds * 1000:.1f}" for name, seconds in ctx.timings.items())
            log.info("taskUUID=%s taskType=%s outcome=%s results=%d total_ms=%.1f %s", task_uuid, task_type,
                     outcome, results, (time.perf_counter() - started) * 1000, stages)

    async def _fail(self, error: TaskError, task_type: str, task_uuid: str, record: TaskRecord | None,
                    session: Session, asynchronous: bool, webhook: str | None) -> None:
        item = error.to_item(task_type, task_uuid)
        if record is not None:
            record.errors.append(item)
        if webhook:
            self.services.webhooks.send(webhook, item)
        if not asynchronous:
            await session.send(protocol.encode_frame(errors=[item]))


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    result = msgspec.to_builtins(item)
    assert isinstance(result, dict)
    return result
