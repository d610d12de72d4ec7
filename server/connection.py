"""One client socket: read frames, answer pings and authentication at once, admit every other
task to the task runner, and carry its answers back.

The connection knows frames, pings, authentication and admission; what a task is and how it is
delivered is the runner's and the task module's business (``server/runner.py``). Nothing here
blocks the event loop: decoding a frame is microseconds per task, and all image work happens in
the handlers' thread pool calls or on the device worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from aiohttp import WSMsgType, web

from imagewire.server import protocol
from imagewire.server.auth import ApiKeys, owner_token
from imagewire.server.config import Config
from imagewire.server.intake import Intake, invalid_api_key
from imagewire.server.runner import TaskRunner
from imagewire.server.sessions import Session, SessionRegistry
from imagewire.tasks import schema
from imagewire.tasks.errors import ServiceUnavailable
from imagewire.tasks.task_type import Item, TaskType

connection_log = logging.getLogger("imagewire.connection")


# Close codes (RFC 6455): a refused or overdue socket, and the server going away.
POLICY_VIOLATION = 1008
GOING_AWAY = 1001


class Connection(Intake):
    def __init__(self, websocket: web.WebSocketResponse, request: web.Request, *, config: Config,
                 api_keys: ApiKeys, sessions: SessionRegistry, runner: TaskRunner,
                 unauthenticated_by_ip: Counter[str]) -> None:
        self.websocket = websocket
        self.transport = request.transport
        self.config = config
        self.api_keys = api_keys
        self.sessions = sessions
        self.runner = runner
        self.unauthenticated_by_ip = unauthenticated_by_ip
        self.session: Session | None = None
        self.peer_ip = request.remote or "unknown"

    async def serve(self) -> None:
        config = self.config
        waiting = self.unauthenticated_by_ip
        connection_log.info("connection opened peer=%s", self.peer_ip)
        if waiting[self.peer_ip] >= config.max_unauthenticated_per_ip:
            await self._refuse(f"Too many connections from {self.peer_ip} are waiting to authenticate "
                               f"(max {config.max_unauthenticated_per_ip}); authenticate or close them first.")
            return
        waiting[self.peer_ip] += 1
        deadline = asyncio.get_running_loop().call_later(config.auth_timeout, self._authentication_overdue)
        try:
            async for message in self.websocket:
                if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break  # an error (a message over the size limit closes the socket with 1009)
                was_authenticated = self.session is not None
                await self._on_frame(message.data)
                if self.session is not None and not was_authenticated:
                    deadline.cancel()
                    waiting[self.peer_ip] -= 1
        finally:
            deadline.cancel()
            if self.session is None:
                waiting[self.peer_ip] -= 1
            if waiting[self.peer_ip] <= 0:
                del waiting[self.peer_ip]
            if self.session is not None:
                self.session.detach(self._send)
            connection_log.info("connection closed peer=%s session=%s code=%s", self.peer_ip,
                                self.session.uuid if self.session else None, self.websocket.close_code)

    async def close(self, code: int = GOING_AWAY, reason: str = "going away") -> None:
        await self.websocket.close(code=code, message=reason.encode())

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake, as a network failure would."""
        if self.transport is not None:
            self.transport.abort()

    async def _refuse(self, message: str) -> None:
        """Answer with one error item, then close with 1008 (policy violation)."""
        await self._send(protocol.error_frame(ServiceUnavailable(message), "authentication", None))
        await self.close(POLICY_VIOLATION, "policy violation")

    def _authentication_overdue(self) -> None:
        if self.session is None:
            asyncio.ensure_future(self._refuse(
                f"No authentication within {self.config.auth_timeout:g} s of connecting; "
                "send [{\"taskType\":\"authentication\",\"apiKey\":\"...\"}] first."))

    async def _send(self, frame: bytes) -> bool:
        """Send one text frame; False when the socket is gone."""
        if self.websocket.closed:
            return False
        try:
            await self.websocket.send_frame(frame, WSMsgType.TEXT)
            return True
        except ConnectionError:
            return False

    @property
    def authenticated(self) -> bool:
        return self.session is not None

    async def answer(self, data: Sequence[Item] = (), errors: Sequence[dict[str, Any]] = ()) -> None:
        await self._send(protocol.encode_frame(data=list(data), errors=list(errors)))

    async def reply(self, data: Sequence[Item] = (), errors: Sequence[dict[str, Any]] = ()) -> None:
        """Through the session once there is one, not this socket: a client that reconnects gets what it missed."""
        frame = protocol.encode_frame(data=list(data), errors=list(errors))
        if self.session is not None:
            await self.session.send(frame)
        else:
            await self._send(frame)

    async def _on_frame(self, frame: str | bytes) -> None:
        try:
            decoded = protocol.decode_frame(frame, max_tasks=self.config.max_tasks_per_message)
        except protocol.FrameError as error:
            await self.answer(errors=[error.to_item(None, None)])
            return
        await self.take(decoded)

    async def authenticate(self, task: schema.Authentication) -> None:
        if not self.api_keys.check(task.apiKey):
            await self.answer(errors=[invalid_api_key().to_item("authentication", None)])
            return
        assert task.apiKey is not None
        if self.session is not None:
            self.session.detach(self._send)
        self.session, resumed = self.sessions.open(owner_token(task.apiKey), task.connectionSessionUUID)
        await self.answer(data=[
            schema.AuthenticationResult(taskType="authentication", connectionSessionUUID=self.session.uuid)])
        connection_log.info("authenticated session=%s resumed=%s", self.session.uuid, resumed)
        await self.session.attach(self._send)

    async def start(self, task: schema.Task, task_type: TaskType[Any, Any], task_uuid: str) -> None:
        assert self.session is not None
        await self.runner.start(task, task_type, task_uuid, owner=self.session.owner, connection=self,
                                reply=self.reply)
