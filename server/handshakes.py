"""The listening socket, before HTTP: bounds on connections that have not sent their request yet, and
who a request comes from.

A TCP connection that sends half a request holds a file descriptor and a little memory for as long as
it likes; thousands of them starve everyone. So each new connection has ``--handshake-timeout``
seconds to send its request head, and each address at most ``--max-handshakes-per-ip`` connections
in that state: past it, its oldest such connection is dropped once it has had ``CROWDING_GRACE`` to send
its request, so a flood cannot lock out a client that sends its request promptly, and a burst of prompt
ones is not mistaken for a flood. Connections from trusted proxies (``--trusted-proxy``) are timed but
not counted, since many clients share their address; behind one, a request's client is the last
address in X-Forwarded-For that is not a trusted proxy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import socket
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from aiohttp import web

from imagewire.server.inbound_budget import FrameCounter, InboundBudget

log = logging.getLogger("imagewire.server")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Member = TypeVar("Member")


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit (every connection is a descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("open-file limit raised from %d to %d", soft, hard)
        return hard
    return soft


def networks(cidrs: Sequence[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted(peer: str | None, trusted: Sequence[IPNetwork]) -> bool:
    address = _address(peer) if peer else None
    return address is not None and any(address in network for network in trusted)


def client_address(request: web.Request, trusted: Sequence[IPNetwork]) -> str:
    """The address a request comes from: its peer, or behind trusted proxies the last address in
    X-Forwarded-For that is not one of them."""
    peer = request.remote or "unknown"
    if not trusted or not is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for header in request.headers.getall("X-Forwarded-For", ()) for hop in header.split(",")]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break  # a malformed entry: what comes before it cannot be trusted either
        if not any(address in network for network in trusted):
            return str(address)
    return peer


# How long a new connection may stay counted beside its address's bound before it may be crowded out. A client
# library opening thirty connections at once (aiohttp's opens up to a hundred) has sent every request by the time
# the server reads them, but a busy event loop accepts the whole burst before reading any: without a grace, the
# first of them would be dropped as the oldest still handshaking, their requests unanswered.
CROWDING_GRACE = 1.0


class Crowd(Generic[Member]):
    """Members waiting by address (connections still handshaking, sockets not yet authenticated), oldest first.
    Past ``per_address`` under one address, its oldest member that has waited ``grace`` seconds leaves and is
    handed to ``crowded_out``; younger ones are looked at again once old enough (most will have moved on)."""

    def __init__(self, per_address: int, grace: float, crowded_out: Callable[[Member], None]) -> None:
        self.per_address = per_address
        self.grace = grace
        self.crowded_out = crowded_out
        self._by_address: dict[str, dict[Member, float]] = {}   # when each entered
        self._address_of: dict[Member, str] = {}
        self._thinning: set[str] = set()   # addresses with a check due

    def enter(self, address: str, member: Member, *, bounded: bool = True) -> None:
        self._by_address.setdefault(address, {})[member] = asyncio.get_running_loop().time()
        self._address_of[member] = address
        if bounded:
            self._thin(address)

    def leave(self, member: Member) -> bool:
        """Whether ``member`` was waiting (and is no longer)."""
        address = self._address_of.pop(member, None)
        if address is None:
            return False
        waiting = self._by_address[address]
        del waiting[member]
        if not waiting:
            del self._by_address[address]
        return True

    def __len__(self) -> int:
        return len(self._address_of)

    def _thin(self, address: str) -> None:
        self._thinning.discard(address)
        waiting = self._by_address.get(address, {})
        loop = asyncio.get_running_loop()
        while len(waiting) > self.per_address:
            oldest, entered = next(iter(waiting.items()))
            young_for = entered + self.grace - loop.time()
            if young_for > 0:
                if address not in self._thinning:
                    self._thinning.add(address)
                    loop.call_later(young_for, self._thin, address)
                return
            self.leave(oldest)
            self.crowded_out(oldest)


class HandshakeGuard:
    """Wraps aiohttp's protocol factory: times each connection until its first request arrives."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], *, timeout: float, per_address: int,
                 trusted: Sequence[IPNetwork], grace: float = CROWDING_GRACE) -> None:
        self.factory = factory
        self.timeout = timeout
        self.trusted = trusted
        # Each connection still handshaking, by address, and its deadline.
        self._handshaking: Crowd[asyncio.Transport] = Crowd(per_address, grace, self._abort)
        self._deadlines: dict[asyncio.Transport, asyncio.TimerHandle] = {}
        self.dropped = 0  # connections dropped for a slow or crowded handshake

    def __call__(self) -> asyncio.Protocol:
        return _Timed(self.factory(), self)

    @property
    def pending(self) -> int:
        return len(self._handshaking)

    def opened(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "unknown"
        trusted = is_trusted(address, self.trusted)
        self._deadlines[transport] = asyncio.get_running_loop().call_later(self.timeout, self._drop, transport)
        self._handshaking.enter("trusted" if trusted else address, transport, bounded=not trusted)

    def request_arrived(self, transport: asyncio.Transport | None) -> None:
        """A request head came in: this connection is past its handshake."""
        if transport is not None:
            self._forget(transport)

    def closed(self, transport: asyncio.Transport) -> None:
        self._forget(transport)

    def _forget(self, transport: asyncio.Transport) -> bool:
        self._cancel_deadline(transport)
        return self._handshaking.leave(transport)

    def _cancel_deadline(self, transport: asyncio.Transport) -> None:
        deadline = self._deadlines.pop(transport, None)
        if deadline is not None:
            deadline.cancel()

    def _drop(self, transport: asyncio.Transport) -> None:
        """Its handshake took longer than the timeout."""
        if self._handshaking.leave(transport):
            self._abort(transport)

    def _abort(self, transport: asyncio.Transport) -> None:
        """Dropped: too slow, or crowded out by newer connections from its address (it left the crowd)."""
        self._cancel_deadline(transport)
        self.dropped += 1
        transport.abort()


class _Timed(asyncio.Protocol):
    """aiohttp's protocol for one connection, as it is, with the guard told when it opens and closes, and,
    once it is a WebSocket, its frames counted against the server's inbound budget."""

    def __init__(self, inner: asyncio.Protocol, guard: HandshakeGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.frames: FrameCounter | None = None
        self.discarding = False  # the rest of a refused request body is thrown away as it arrives
        self._held_back = bytearray()  # bytes read past a message that waits for the budget
        # Until the first request head has come in whole: its last bytes, to find its end across reads.
        self._head_tail: bytes | None = b""

    def count_frames(self, budget: InboundBudget, *, max_message_bytes: int) -> FrameCounter:
        """Charge this connection's messages to ``budget`` from now on (called before the upgrade answer)."""
        self.frames = FrameCounter(budget, max_message_bytes=max_message_bytes, resume=self._resume)
        # Bytes a client sent before it was answered already went past: count them, so that the counter
        # starts at a frame boundary.
        self.frames.feed(bytes(getattr(self.inner, "_message_tail", b"")))
        return self.frames

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.guard.opened(transport)
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.guard.closed(self.transport)
        if self.frames is not None:
            self.frames.close()
            self._held_back = bytearray()
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        if self._head_tail is not None:
            self._watch_head(data)
        if self.frames is None:
            self.inner.data_received(data)
            return
        if self._held_back:
            self._held_back += data
            self._pause()
            return
        passed = self.frames.feed(data)
        if passed:
            self.inner.data_received(data if passed == len(data) else data[:passed])
        if passed < len(data):
            self._held_back += data[passed:]
            self._pause()

    def _watch_head(self, data: bytes) -> None:
        """The connection is past its handshake once its first request head has arrived whole (the blank
        line that ends it), told here as it arrives rather than when its handler starts: on a busy event loop
        a handler may start late, and a connection counted as still handshaking meanwhile could be dropped
        as the oldest of its address's (the soak's REST clients, all on one address, were)."""
        seen = (self._head_tail or b"") + data
        if b"\r\n\r\n" in seen:
            self._head_tail = None
            if self.transport is not None:
                self.guard.request_arrived(self.transport)
        else:
            self._head_tail = seen[-3:]

    def discard_rest(self, seconds: float) -> None:
        """Throw away what more of this request comes, unread, and close the connection in ``seconds``."""
        self.discarding = True
        self._held_back = bytearray()
        if self.transport is not None:
            self.transport.resume_reading()  # read on, so that the client can send the rest and read its answer
            asyncio.get_running_loop().call_later(seconds, self.transport.close)

    def _pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _resume(self) -> None:
        """The message that waited was granted: pass on what was held back, and read again unless aiohttp
        itself holds the socket (a message waits unread)."""
        held_back, self._held_back = bytes(self._held_back), bytearray()
        self.data_received(held_back)
        inner_holds = getattr(self.inner, "_reading_paused", False) or getattr(self.inner, "_buffer_paused", False)
        if not self._held_back and not inner_holds and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def count_frames(request: web.Request, budget: InboundBudget, *, max_message_bytes: int) -> FrameCounter | None:
    """Charge a WebSocket's inbound messages to ``budget``; None for a connection the guard did not open."""
    protocol = request.transport.get_protocol() if request.transport is not None else None
    if not isinstance(protocol, _Timed):
        return None
    return protocol.count_frames(budget, max_message_bytes=max_message_bytes)


# How long a connection whose request body was refused unread is kept open, its bytes thrown away, before it
# is closed: its client can finish sending and read the answer (a connection closed with unread bytes is reset,
# and the answer may be lost with it).
DISCARD_SECONDS = 2.0


def discard_rest_of_body(request: web.Request) -> None:
    """The request's body was refused before it was read whole (too large, too slow, no key): throw the rest
    away as it arrives, then close the connection. Left to aiohttp, the rest would be read, and decompressed,
    to keep the connection: a 64 KiB gzip body of zeros is 64 MiB of decompressing for nothing, which a
    client without a key could ask for as often as it likes."""
    # What aiohttp has of the body already, compressed, it would go on decompressing for its lingering close:
    # to it, the body ends here.
    request.content.feed_eof()
    protocol = request.transport.get_protocol() if request.transport is not None else None
    if isinstance(protocol, _Timed):
        protocol.discard_rest(DISCARD_SECONDS)


def bind(host: str, port: int) -> list[socket.socket]:
    """The listening addresses of ``host``, bound to ``port`` but not yet listening: bound first thing at start,
    so that a taken port is said at once, while connections are refused (not left waiting) until the server is
    ready to answer them. Port 0 picks one port free on every address."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            listening = socket.socket(family, kind, proto)
            bound.append(listening)
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(bound) > 1:  # the port the first address got, on the others too
                address = (address[0], bound[0].getsockname()[1], *address[2:])
            try:
                listening.bind(address)
            except OSError as exc:
                raise OSError(f"cannot listen on {_shown(address)}: {exc.strerror}") from None
    except BaseException:
        for listening in bound:
            listening.close()
        raise
    return bound


def _shown(address: tuple[Any, ...]) -> str:
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    return f"{host}:{address[1]}"


def request_arrived_middleware(guard: HandshakeGuard) -> Any:
    @web.middleware
    async def arrived(request: web.Request, handler: Any) -> web.StreamResponse:
        guard.request_arrived(request.transport)
        return await handler(request)

    return arrived
