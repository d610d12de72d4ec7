"""HTTP REST: ``POST /v1`` with the same JSON task array as a WebSocket frame, answered with one
``{"data": [...], "errors": [...]}`` object once every task in the array is done.

Authentication is an ``Authorization: Bearer KEY`` header or an ``authentication`` task first in
the array. Async tasks (``deliveryMethod: "async"``) are acknowledged in the answer and their
results fetched with getResponse, in later POSTs or over a socket; a getResponse for a task still processing
holds its answer up to ``GET_RESPONSE_HOLD_SECONDS`` for it to finish. The tasks run through the same
runner as the socket's, so validation, limits and error items are the same; only the envelope and
the HTTP status differ:

- 400 the body is not a JSON task array; 413 it is larger than ``--max-frame-mib``; 408 it did not
  arrive within ``FRAME_DEADLINE_SECONDS``;
- 401 no key or a wrong one, or a body over ``SMALL_MESSAGE_BYTES`` without the key in the header;
- otherwise 200 when any task produced an item, else the status of the first error (429 when a
  connection's or key's task limit is reached, 503 when the queue is full, 404 for an unknown
  model or image, 500 for a failure on the server, 400 for everything a client sent wrong).

A body is read only as far as its sender has earned. Without a good key in the header, at most
``SMALL_MESSAGE_BYTES`` of it (decompressed) are read, which is room for an ``authentication`` task and a few
small ones, and it is charged nothing; a larger one is answered 401 before the rest is read, so no keyless
client can make the server inflate a compressed body or hold the inbound budget. With the key, a body is
charged its length from before it is read, or the largest body allowed when its decompressed length is
unknown (compressed, or chunked), as a fragmented WebSocket message is; it is read in pieces up to
``--max-frame-mib`` after decompression. Either way the whole body must arrive within
``FRAME_DEADLINE_SECONDS``, as a WebSocket message must: a body that trickles in gives its charge back then.

An answer is bounded as a socket's outbox is (``--max-outbox-mib``): each result is encoded as it comes and
counted; one that would pass the bound is left out and answered with a ``responseTooLarge`` error item for its
task instead (its results stay available to getResponse), so the answer is whole and its size known.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import msgspec
from aiohttp import web

from imagewire.server import protocol
from imagewire.server.answer_budget import AnswerBudget
from imagewire.server.auth import ApiKeys, owner_token
from imagewire.server.config import Config
from imagewire.server.dispatch import Dispatcher, invalid_api_key
from imagewire.server.handshakes import discard_rest_of_body
from imagewire.server.inbound_budget import FRAME_DEADLINE_SECONDS, SMALL_MESSAGE_BYTES, InboundBudget
from imagewire.server.logs import Repeats
from imagewire.server.task_runner import TaskRunner
from imagewire.tasks import schema
from imagewire.tasks.errors import MissingApiKey, ResponseTooLarge, TaskError
from imagewire.tasks.task_type import Item, TaskType

log = logging.getLogger("imagewire.rest")

BEARER = "bearer "
# A getResponse over HTTP holds its answer up to this long for a task still processing to finish: a client
# polling by REST gets the results as soon as they exist rather than at its next poll.
GET_RESPONSE_HOLD_SECONDS = 5.0
_hang_ups = Repeats()   # one log line per interval for bodies cut off by their clients


class BodyTooLarge(Exception):
    """The body grew past what it may be."""


class RestEndpoint:
    def __init__(self, *, config: Config, api_keys: ApiKeys, runner: TaskRunner, inbound: InboundBudget,
                 answers: AnswerBudget) -> None:
        self.config = config
        self.answers = answers
        self.api_keys = api_keys
        self.runner = runner
        self.inbound = inbound

    async def __call__(self, request: web.Request) -> web.Response:
        exchange = RestExchange(self.api_keys, self.runner, max_answer_bytes=self.config.max_outbox_bytes,
                                answers=self.answers)
        header = request.headers.get("Authorization", "")
        if header[: len(BEARER)].lower() == BEARER:
            if not exchange.accept_key(header[len(BEARER):].strip()):
                return _respond(401, errors=[invalid_api_key().to_item("authentication", None)])
        limit = self.config.max_frame_bytes if exchange.authenticated else SMALL_MESSAGE_BYTES
        async with self.inbound.reserved(self._charge(request) if exchange.authenticated else 0):
            try:
                body = await _read_body(request, limit)
            except BodyTooLarge:
                if not exchange.authenticated:
                    error: TaskError = MissingApiKey(
                        f"A request body over {SMALL_MESSAGE_BYTES // 1024} KiB needs the API key in its "
                        "Authorization header (Bearer KEY); an authentication task in the body is read only "
                        "in smaller ones.")
                    return _unread(request, 401, error.to_item("authentication", None))
                error = protocol.FrameError(
                    f"A request body may be at most {self.config.max_frame_bytes // (1024 * 1024)} MiB "
                    "(--max-frame-mib); send large images by URL or upload them first.")
                return _unread(request, 413, error.to_item(None, None))
            except ConnectionError:
                # The client hung up mid-body: nobody to answer, and nothing of ours went wrong.
                due, unsaid = _hang_ups.due("rest-body")
                if due:
                    log.info("a client hung up before its request body arrived%s",
                             f" ({unsaid} more since the last such line)" if unsaid else "")
                return web.Response(status=400)
            except TimeoutError:
                error = protocol.FrameError(
                    f"The request body did not arrive within {FRAME_DEADLINE_SECONDS:.0f} s; send it at once.")
                return _unread(request, 408, error.to_item(None, None))
            try:
                decoded = protocol.decode_frame(body, max_tasks=self.config.max_tasks_per_message)
            except protocol.FrameError as error:
                return _respond(400, errors=[error.to_item(None, None)])
            del body
            await exchange.take(decoded)
            del decoded
        await exchange.finished()
        return exchange.response()


    def _charge(self, request: web.Request) -> int:
        """What a keyed body holds of the inbound budget while it is read and its tasks are taken: its length,
        or the largest body allowed when the length after decompression is unknown."""
        encoded = request.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
        known = request.content_length if request.content_length is not None and not encoded else None
        size = min(known if known is not None else self.config.max_frame_bytes, self.config.max_frame_bytes)
        return size if size >= SMALL_MESSAGE_BYTES else 0


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body as aiohttp decompresses it, in pieces, up to ``limit`` bytes, within the arrival deadline.

    Raises BodyTooLarge as soon as it passes ``limit`` (the rest is never read: aiohttp closes the connection
    after the answer) and TimeoutError when it has not all arrived in time."""
    body = bytearray()
    async with asyncio.timeout(FRAME_DEADLINE_SECONDS):
        while piece := await request.content.readany():
            body += piece
            if len(body) > limit:
                raise BodyTooLarge
    return bytes(body)


class RestExchange(Dispatcher):
    """One POST: its tasks, and every answer they give, collected for one response."""

    def __init__(self, api_keys: ApiKeys, runner: TaskRunner, *, max_answer_bytes: int,
                 answers: AnswerBudget) -> None:
        self.api_keys = api_keys
        self.answers = answers
        self.runner = runner
        self.owner: str | None = None
        self.max_answer_bytes = max_answer_bytes
        self.answer_bytes = 0
        self.data: list[msgspec.Raw] = []   # encoded as they come, so that their size is known
        self.errors: list[dict[str, Any]] = []
        self.running: list[asyncio.Task[None]] = []

    def accept_key(self, key: str | None) -> bool:
        if not self.api_keys.check(key):
            return False
        assert key is not None
        self.owner = owner_token(key)
        return True

    @property
    def authenticated(self) -> bool:
        return self.owner is not None

    async def answer(self, data: Sequence[Item] = (), errors: Sequence[dict[str, Any]] = ()) -> None:
        for item in data:
            encoded = protocol.encode_item(item)
            if self.answer_bytes + len(encoded) > self.max_answer_bytes:
                self.errors.append(_left_out(item, len(encoded), self.max_answer_bytes))
                continue
            self.answer_bytes += len(encoded)
            self.data.append(msgspec.Raw(encoded))
        self.errors.extend(errors)

    async def reply(self, data: Sequence[Item] = (), errors: Sequence[dict[str, Any]] = ()) -> None:
        """A task's answer, paid by its API key as over a socket (server/answer_budget.py); what the request
        answers itself (pongs, authentication) is bounded by its body and goes in this one response."""
        if self.owner is None:
            await self.answer(data, errors)
            return
        bucket = self.answers.bucket(self.owner)
        await bucket.ready()
        before = self.answer_bytes
        await self.answer(data, errors)  # encodes without awaiting: nothing else is charged in between
        bucket.charge(self.answer_bytes - before)

    async def authenticate(self, task: schema.Authentication) -> None:
        # There is no session to resume over HTTP: a good key is simply used for the tasks that follow.
        if not self.accept_key(task.apiKey):
            await self.answer(errors=[invalid_api_key().to_item("authentication", None)])

    async def start(self, task: schema.Task, task_type: TaskType[Any, Any], task_uuid: str) -> None:
        assert self.owner is not None
        running = await self.runner.start(task, task_type, task_uuid, owner=self.owner, connection=self,
                                          reply=self.reply, streams=False, hold_seconds=GET_RESPONSE_HOLD_SECONDS)
        # An async task is answered by its acknowledgement: the response does not wait for its results.
        if running is not None and not task_type.delivery(task).asynchronous:
            self.running.append(running)

    async def finished(self) -> None:
        """Wait for every task of the array. A client that hangs up does not stop them: their results
        stay available to getResponse."""
        if self.running:
            await asyncio.wait(self.running)

    def response(self) -> web.Response:
        if self.data or not self.errors:
            return _respond(200, data=self.data, errors=self.errors)
        return _respond(getattr(self.errors[0], "http_status", 400), errors=self.errors)


def _left_out(item: Item, size: int, bound: int) -> dict[str, Any]:
    task_type, task_uuid = getattr(item, "taskType", None), getattr(item, "taskUUID", None)
    return ResponseTooLarge(
        f"This result ({size / 2**20:.1f} MiB encoded) would take the answer past {bound // 2**20} MiB "
        "(--max-outbox-mib), so it is left out; fetch it with getResponse (taskUUID), ask for outputType URL, "
        "or send fewer tasks or results per request.").to_item(task_type, task_uuid)


def _unread(request: web.Request, status: int, error: dict[str, Any]) -> web.Response:
    """The answer to a request whose body was refused before it was read whole: the rest is thrown away as it
    comes, and the connection closes after this answer (``Connection: close``, so no client sends another
    request on it)."""
    discard_rest_of_body(request)
    response = _respond(status, errors=[error])
    response.force_close()
    return response


def _respond(status: int, *, data: Sequence[Any] = (), errors: Sequence[dict[str, Any]] = ()) -> web.Response:
    body = protocol.encode_frame(data=list(data), errors=list(errors)) if data or errors else b'{"data":[]}'
    return web.Response(status=status, body=body, content_type="application/json")
