"""One client socket: read frames, answer pings and authentication at once, admit every other
task to the task runner, and carry its answers back.

The connection knows frames, pings, authentication and admission; what a task is and how it is
delivered is the runner's and the task module's business (``server/task_runner.py``). Nothing here
blocks the event loop: decoding a frame is microseconds per task, and all image work happens in
the handlers' thread pool calls or on the device worker.

Memory a client can pin is bounded both ways. Inbound, aiohttp stops reading the socket while a
message waits unread, and every large message counts against the server-wide ``--max-inbound-mib``
until it is handled here (``server/inbound_budget.py``). Outbound, answers go through an outbox of at most
``--max-outbox-mib`` drained by one writer; what would overflow it waits for room. A client that leaves an answer
untaken for ``--send-timeout`` is closed (1008, "not reading its answers"), and what it did not
take waits in its session for it to resume. So a slow reader slows only its own answers, and a
stopped one holds no socket and a bounded outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Coroutine, Sequence
from typing import Any

from aiohttp import WSMsgType, web

from imagewire.server import protocol
from imagewire.server.answer_budget import AnswerBudget, TokenBucket
from imagewire.server.auth import ApiKeys, owner_token
from imagewire.server.config import Config
from imagewire.server.dispatch import Dispatcher, invalid_api_key
from imagewire.server.handshakes import CROWDING_GRACE, Crowd
from imagewire.server.inbound_budget import FrameCounter
from imagewire.server.sessions import ClientSession, Sessions
from imagewire.server.task_runner import TaskRunner
from imagewire.tasks import schema
from imagewire.tasks.errors import ServiceUnavailable, TaskError
from imagewire.tasks.task_type import Item, TaskType

connection_log = logging.getLogger("imagewire.connection")


# Close codes (RFC 6455): a refused, overdue or not-reading socket, and the server going away.
POLICY_VIOLATION = 1008
GOING_AWAY = 1001
# A closing handshake with a peer that does not read cannot finish; past this the socket is dropped.
CLOSE_TIMEOUT_SECONDS = 2.0


class WaitingRoom(Crowd["Connection"]):
    """Sockets that have not authenticated yet, by address, oldest first. When an address has more than it
    may, its oldest is closed to make room: a flood of half-open sockets cannot lock out a client that
    authenticates promptly. Only a socket that has had ``grace`` seconds to authenticate is closed so: a client
    opening sixty sockets at once sends every key before a busy server reads one (``handshakes.CROWDING_GRACE``)."""

    def __init__(self, per_address: int, grace: float = CROWDING_GRACE) -> None:
        super().__init__(per_address, grace, lambda oldest: oldest.displaced(per_address))


class Connection(Dispatcher):
    def __init__(self, websocket: web.WebSocketResponse, request: web.Request, *, peer_ip: str, config: Config,
                 api_keys: ApiKeys, sessions: Sessions, runner: TaskRunner,
                 waiting_room: WaitingRoom, answers: AnswerBudget, frames: FrameCounter | None = None) -> None:
        self.websocket = websocket
        # What answering costs (server/answer_budget.py): a task's answers are paid by its API key, what the
        # socket answers itself (pongs, authentication, errors before it has a key) by the socket.
        self.answers = answers
        self.own_answers = answers.per_socket()
        self.frames = frames
        if frames is not None:
            frames.on_overdue = self._message_overdue
        self.transport = request.transport
        self.config = config
        self.api_keys = api_keys
        self.sessions = sessions
        self.runner = runner
        self.waiting_room = waiting_room
        self.session: ClientSession | None = None
        self.peer_ip = peer_ip
        self._outbox: deque[bytes] = deque()
        self._outbox_bytes = 0
        self._queued = asyncio.Event()
        self._taken = asyncio.Event()  # set whenever the writer hands a frame to the socket, or gives up
        self._closing = False
        self._writer: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()
        self._checking_key = False  # a good key came and its session is opening
        self._auth_deadline: asyncio.TimerHandle | None = None

    async def serve(self) -> None:
        config = self.config
        connection_log.info("connection opened peer=%s", self.peer_ip)
        self._writer = asyncio.create_task(self._write_forever())
        self.waiting_room.enter(self.peer_ip, self)
        deadline = self._auth_deadline = asyncio.get_running_loop().call_later(
            config.auth_timeout, self._authentication_overdue)
        try:
            while True:
                message = await self.websocket.receive()
                if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break  # closed, or an error (a message over the size limit closes the socket with 1009)
                frame = message.data
                del message
                try:
                    await self._on_frame(frame)
                finally:
                    del frame  # this message (up to --max-frame-mib) is let go before the next one is awaited
                    if self.frames is not None:
                        self.frames.handled()
                if self.session is not None:
                    deadline.cancel()
                    self.waiting_room.leave(self)
        finally:
            deadline.cancel()
            self.waiting_room.leave(self)
            self._closing = True
            self._taken.set()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            if self.session is not None:
                await self.session.detach(self._send)
                # What this socket did not take waits in the session, for the client to resume.
                await self.session.keep(list(self._outbox))
            connection_log.info("connection closed peer=%s session=%s code=%s", self.peer_ip,
                                self.session.uuid if self.session else None, self.websocket.close_code)

    async def close(self, code: int = GOING_AWAY, reason: str = "going away") -> None:
        self._closing = True
        self._taken.set()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self.websocket.close(code=code, message=reason.encode())
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                self.abort()
                raise
            # Not ours: aiohttp's writers share one drain future, and a send that timed out cancelled it.
        # A peer that does not read never lets the closing handshake (or the bytes before it) through.
        if self.transport is not None and (self.transport.get_write_buffer_size() or not self.transport.is_closing()):
            self.abort()

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake, as a network failure would."""
        if self.transport is not None:
            self.transport.abort()

    async def _refuse(self, message: str) -> None:
        """Answer a socket that has no key yet with one error item, then close it with 1008 (policy violation).

        Called soon after the reason arose, not at once: a socket that sent a good key meanwhile keeps its place
        (its session may be opening, or open and the client told it is in)."""
        if self.session is not None or self._checking_key:
            return
        await self._send(protocol.error_frame(ServiceUnavailable(message), "authentication", None))
        await self._flushed()
        await self.close(POLICY_VIOLATION, "policy violation")

    def displaced(self, per_address: int) -> None:
        """Turned away from the waiting room by a newer socket from its address."""
        self._soon(self._refuse(
            f"Too many connections from {self.peer_ip} are waiting to authenticate (max {per_address}); this "
            "one, the oldest, was closed to let a newer one in. Authenticate right after connecting."))

    def _authentication_overdue(self) -> None:
        if self.session is None:
            self._soon(self._refuse(
                f"No authentication within {self.config.auth_timeout:g} s of connecting; "
                "send [{\"taskType\":\"authentication\",\"apiKey\":\"...\"}] first."))

    async def _send(self, frame: bytes) -> bool:
        """Queue one text frame for the writer; False when this socket takes no more (closed, or closing
        because its client does not read), and the caller keeps the frame for a resume."""
        if self._closing or self.websocket.closed:
            return False
        if not await self._room_for(len(frame)):
            return False
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)
        self._queued.set()
        return True

    async def _room_for(self, size: int) -> bool:
        """Wait, up to the send timeout, until ``size`` more bytes fit in the outbox: a client reading
        slower than answers come (or resuming with a full session outbox) slows their producers down,
        and one that stops reading is closed."""
        bound = self.config.max_outbox_bytes
        try:
            async with asyncio.timeout(self.config.send_timeout):
                while self._outbox and self._outbox_bytes + size > bound:
                    self._taken.clear()
                    await self._taken.wait()
                    if self._closing:
                        return False
        except TimeoutError:
            self._not_reading(f"{(self._outbox_bytes + size) >> 20} MiB of answers waited untaken for "
                              f"{self.config.send_timeout:g} s")
            return False
        return True

    async def _write_forever(self) -> None:
        while True:
            await self._queued.wait()
            while self._outbox:
                frame = self._outbox[0]
                try:
                    async with asyncio.timeout(self.config.send_timeout):
                        await self.websocket.send_frame(frame, WSMsgType.TEXT)
                except TimeoutError:
                    self._not_reading(f"an answer stayed untaken for {self.config.send_timeout:g} s")
                    return
                except ConnectionError:
                    return
                self._outbox.popleft()
                self._outbox_bytes -= len(frame)
                self._taken.set()
            self._queued.clear()

    async def _flushed(self) -> None:
        """Wait until the writer has handed every queued frame to the socket (or gave up)."""
        while self._outbox and self._writer is not None and not self._writer.done():
            await asyncio.sleep(0.01)

    def _not_reading(self, why: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._taken.set()
        connection_log.warning("closing a connection that does not read its answers peer=%s session=%s: %s",
                               self.peer_ip, self.session.uuid if self.session else None, why)
        self._soon(self.close(POLICY_VIOLATION, "not reading its answers"))

    def _message_overdue(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._taken.set()
        connection_log.warning("closing a connection whose message arrives too slowly peer=%s session=%s",
                               self.peer_ip, self.session.uuid if self.session else None)
        self._soon(self.close(POLICY_VIOLATION, "message arriving too slowly"))

    def _soon(self, chore: Coroutine[Any, Any, None]) -> None:
        """Run ``chore`` in its own task, held here: the loop keeps only weak references to tasks."""
        task = asyncio.ensure_future(chore)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    @property
    def authenticated(self) -> bool:
        return self.session is not None

    async def answer(self, data: Sequence[Item] = (), errors: Sequence[dict[str, Any]] = ()) -> None:
        await self._send(await _paid(self.own_answers, data, errors))

    async def reply(self, data: Sequence[Item] = (), errors: Sequence[dict[str, Any]] = ()) -> None:
        """Through the session once there is one, not this socket: a client that reconnects gets what it missed."""
        if self.session is not None:
            await self.session.send(await _paid(self.answers.bucket(self.session.owner), data, errors))
        else:
            await self._send(await _paid(self.own_answers, data, errors))

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
        # Its key is good: it no longer waits to authenticate, and a newer socket cannot displace it while its
        # session opens (an await on the shared state).
        self.waiting_room.leave(self)
        self._checking_key = True
        try:
            session, resumed = await self.sessions.open(owner_token(task.apiKey), task.connectionSessionUUID)
        except TaskError as error:  # the shared state cannot be reached: this socket stays unauthenticated
            await self.answer(errors=[error.to_item("authentication", None)])
            deadline = self._auth_deadline
            if self.session is None and deadline is not None and deadline.when() <= asyncio.get_running_loop().time():
                self._authentication_overdue()  # its deadline passed while the session was opening
            return
        finally:
            self._checking_key = False
        if self.session is not None:
            await self.session.detach(self._send)
        self.session = session
        await self.answer(data=[
            schema.AuthenticationResult(taskType="authentication", connectionSessionUUID=self.session.uuid)])
        connection_log.info("authenticated session=%s resumed=%s", self.session.uuid, resumed)
        await self.session.attach(self._send)

    async def start(self, task: schema.Task, task_type: TaskType[Any, Any], task_uuid: str) -> None:
        assert self.session is not None
        await self.runner.start(task, task_type, task_uuid, owner=self.session.owner, connection=self,
                                reply=self.reply, session=self.session.uuid)


async def _paid(bucket: TokenBucket, data: Sequence[Item], errors: Sequence[dict[str, Any]]) -> bytes:
    """One answer frame, encoded once ``bucket`` can pay for it, and charged to it."""
    await bucket.ready()
    frame = protocol.encode_frame(data=list(data), errors=list(errors))
    bucket.charge(len(frame))
    return frame
