"""A server-wide budget for the bytes of inbound WebSocket messages and REST bodies.

Each socket's own bounds keep what one client pins to a few messages (aiohttp stops reading a socket
while a message waits unread; the read loop lets each message go before it takes the next). Many
sockets sending large messages at once would still add up, so every large message is charged to one
budget, ``--max-inbound-mib``, from the moment its first frame header arrives until the read loop
has handled it. A socket whose next message does not fit is not read until it does: TCP flow control
then slows its client down, and no byte of it is held here beyond one read.

The charge is known before the payload arrives because a WebSocket frame header says how long the
frame is. ``FrameCounter`` follows the frame boundaries in the raw byte stream (it never buffers or
decodes a payload), so a message is charged its size when it starts, and an admitted message always
completes: two half-received messages can never wait on each other. A message sent in fragments
does not announce its total, so it is charged the largest message allowed. Messages under
``SMALL_MESSAGE_BYTES`` (pings, prompts) are not charged: they cannot add up to much on one socket
and must never wait behind a large upload.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable

SMALL_MESSAGE_BYTES = 64 * 1024
# A charged frame must arrive within this: one that trickles in would hold its share of the budget
# (and make others wait) for as long as its client likes.
FRAME_DEADLINE_SECONDS = 60.0
_TEXT, _BINARY = 0x1, 0x2


class InboundBudget:
    """Bytes of large inbound messages held at once, over every socket and REST request."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.held = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def claim(self, size: int) -> asyncio.Future[None] | None:
        """Take ``size``: None when taken now, else a future set once it is granted. Claims are granted in
        the order they were made, so a large message is not passed over forever by smaller ones."""
        if size == 0 or (not self._waiting and self._fits(size)):
            self.held += size  # nothing charged (a small message) never waits behind a large one
            return None
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((size, granted))
        return granted

    def withdraw(self, granted: asyncio.Future[None], size: int) -> None:
        """A claim no longer wanted: its grant goes back, or its place in line."""
        if granted.done() and not granted.cancelled():
            self.give_back(size)
            return
        granted.cancel()
        self._waiting = deque(entry for entry in self._waiting if entry[1] is not granted)
        self._grant()  # those behind it may fit now

    async def take(self, size: int) -> None:
        granted = self.claim(size)
        if granted is None:
            return
        try:
            await granted
        except asyncio.CancelledError:
            self.withdraw(granted, size)
            raise

    def give_back(self, size: int) -> None:
        self.held -= size
        self._grant()

    @contextlib.asynccontextmanager
    async def reserved(self, size: int) -> AsyncIterator[None]:
        await self.take(size)
        try:
            yield
        finally:
            self.give_back(size)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _fits(self, size: int) -> bool:
        # An empty budget takes anything, so that a message larger than the budget still gets through alone.
        return self.held == 0 or self.held + size <= self.limit

    def _grant(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            size, granted = self._waiting.popleft()
            if not granted.done():
                self.held += size
                granted.set_result(None)


class FrameCounter:
    """Follows one socket's client-to-server frames and charges each large message to the budget.

    ``feed`` takes raw bytes as they arrive and says how many of them may go on to the WebSocket parser
    now; the rest must wait until ``resume`` is called (the next message was granted its charge).
    ``handled`` is called once per message the read loop has finished with, and gives its charge back.
    """

    def __init__(self, budget: InboundBudget, *, max_message_bytes: int, resume: Callable[[], None]) -> None:
        self.budget = budget
        self.max_message_bytes = max_message_bytes
        self._resume = resume
        # What to do when a charged message does not arrive in time (the connection closes its socket).
        self.on_overdue: Callable[[], None] = lambda: None
        self._header = bytearray()
        self._remaining = 0              # payload bytes of the current frame still to come
        self._control = False            # the current frame is a ping, pong or close, part of no message
        self._fin = False                # the current frame ends its message
        self._charge = 0                 # what the message being received is charged (0: small, or none)
        self._charged = False            # ... and whether the budget has granted it
        self._complete: deque[int] = deque()  # charges of received messages the read loop has not handled
        self._waiting: asyncio.Future[None] | None = None   # the budget's answer to a claim not yet granted
        self._deadline: asyncio.TimerHandle | None = None
        self.closed = False

    @property
    def held(self) -> int:
        """Bytes of the budget this socket holds."""
        return sum(self._complete) + (self._charge if self._charged else 0)

    @property
    def waiting(self) -> bool:
        return self._waiting is not None

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """How many bytes of ``data`` may pass now; fewer than all when a message must wait for the budget."""
        size = len(data)
        position = 0
        while position < size and self._waiting is None:
            if self._remaining:
                step = min(self._remaining, size - position)
                self._remaining -= step
                position += step
                if not self._remaining:
                    self._frame_ended()
                continue
            self._header.append(data[position])
            position += 1
            if len(self._header) == _header_length(self._header):
                self._header_ended()
        return position

    def handled(self) -> None:
        """The read loop is done with its oldest message: what it was charged goes back."""
        if self._complete:
            charge = self._complete.popleft()
            if charge:
                self.budget.give_back(charge)

    def close(self) -> None:
        """The socket is gone: give back everything it holds, and stop waiting."""
        if self.closed:
            return
        self.closed = True
        if self._waiting is not None:
            self.budget.withdraw(self._waiting, self._charge)
            self._waiting = None
        if self._charged:
            self.budget.give_back(self._charge)
        self._charge, self._charged = 0, False
        self._stop_deadline()
        while self._complete:
            self.handled()

    def _header_ended(self) -> None:
        header, self._header = self._header, bytearray()
        opcode = header[0] & 0x0F
        self._fin = bool(header[0] & 0x80)
        self._control = opcode >= 0x8
        self._remaining = _payload_length(header)
        if opcode in (_TEXT, _BINARY):
            # A message in fragments does not say how long it will be: charge it the most it may be.
            size = min(self._remaining, self.max_message_bytes) if self._fin else self.max_message_bytes
            self._charge = size if size >= SMALL_MESSAGE_BYTES else 0
            if self._charge:
                self._take_charge()
        if not self._remaining:
            self._frame_ended()

    def _frame_ended(self) -> None:
        if self._control or not self._fin:
            return
        # The last frame of a message: it waits for the read loop, still charged, until handled.
        self._complete.append(self._charge if self._charged else 0)
        self._charge, self._charged = 0, False
        self._stop_deadline()

    def _take_charge(self) -> None:
        granted = self.budget.claim(self._charge)
        if granted is None:
            self._granted()
            return
        self._waiting = granted
        granted.add_done_callback(self._claim_answered)

    def _claim_answered(self, granted: asyncio.Future[None]) -> None:
        if granted.cancelled() or granted is not self._waiting:
            return  # withdrawn: the socket went away
        self._waiting = None
        self._granted()
        self._resume()

    def _granted(self) -> None:
        self._charged = True
        self._deadline = asyncio.get_running_loop().call_later(FRAME_DEADLINE_SECONDS, self._overdue)

    def _overdue(self) -> None:
        self._deadline = None
        self.on_overdue()

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def _header_length(header: bytearray) -> int:
    """A frame header's length, once its first two bytes are in (client frames are always masked)."""
    if len(header) < 2:
        return 2
    masked = 4 if header[1] & 0x80 else 0
    extended = {126: 2, 127: 8}.get(header[1] & 0x7F, 0)
    return 2 + extended + masked


def _payload_length(header: bytearray) -> int:
    length = header[1] & 0x7F
    if length == 126:
        return int.from_bytes(header[2:4], "big")
    if length == 127:
        return int.from_bytes(header[2:10], "big")
    return length
