from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

import pytest

from imagewire.storage import fetch as fetch_module
from imagewire.storage.errors import InputRejected
from imagewire.storage.fetch import UrlFetcher, is_forbidden_address
from imagewire.tasks.errors import InvalidParameter, TaskError
from imagewire.tasks.inputs import task_error
from tests.timing import seconds

Respond = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


def response(status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} Whatever"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class LocalServer:
    """A one-purpose HTTP server on 127.0.0.1: records each request head, answers with ``respond``."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.connections = 0
        self.requests: list[bytes] = []
        self.stop = asyncio.Event()

    async def __aenter__(self) -> LocalServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop.set()
        self.server.close()
        await self.server.wait_closed()

    def url(self, path: str = "/image.png") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            await self.respond(head, writer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def answer(data: bytes) -> Respond:
    async def respond(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(data)

    return respond



async def fetch(fetcher: UrlFetcher, url: str, parameter: str) -> bytes:
    """Fetch ``url``; a failure is reported as the task layer reports it for ``parameter``."""
    try:
        return await fetcher.fetch(url)
    except InputRejected as exc:
        error: TaskError = task_error(exc, parameter)
        raise error from exc

BODY = b"\x89PNG" + bytes(range(256)) * 4


async def test_fetches_a_body_with_content_length() -> None:
    async with LocalServer(answer(response(body=BODY, headers={"Content-Length": str(len(BODY))}))) as server:
        data = await fetch(UrlFetcher(allow_private=True), server.url("/a/b.png?x=1"), "seedImage")
    assert data == BODY
    head = server.requests[0].decode()
    assert head.startswith("GET /a/b.png?x=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in head
    assert "Connection: close\r\n" in head
    assert "User-Agent: imagewire\r\n" in head


async def test_fetches_a_chunked_body() -> None:
    chunked = b"".join(f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n" for part in (BODY[:100], BODY[100:]))
    chunked += b"0\r\nX-Trailer: yes\r\n\r\n"
    async with LocalServer(answer(response(body=chunked, headers={"Transfer-Encoding": "chunked"}))) as server:
        assert await fetch(UrlFetcher(allow_private=True), server.url(), "seedImage") == BODY


async def test_fetches_a_body_delimited_by_close() -> None:
    async with LocalServer(answer(response(body=BODY))) as server:
        assert await fetch(UrlFetcher(allow_private=True), server.url(), "seedImage") == BODY


async def test_request_target_is_percent_encoded() -> None:
    async with LocalServer(answer(response(body=b"ok"))) as server:
        await fetch(UrlFetcher(allow_private=True), server.url("/a b/ü.png?q=\r\nInjected: 1"), "image")
    request_line, *headers = server.requests[0].decode().split("\r\n")
    assert request_line == "GET /a%20b/%C3%BC.png?q=Injected:%201 HTTP/1.1"
    assert not any(line.startswith("Injected") for line in headers)


async def test_loopback_is_refused_before_anything_is_sent() -> None:
    async with LocalServer(answer(response(body=BODY))) as server:
        with pytest.raises(InvalidParameter) as caught:
            await fetch(UrlFetcher(), server.url(), "seedImage")
    assert caught.value.parameter == "seedImage"
    assert "non-public" in caught.value.message
    assert server.connections == 0


async def test_a_host_name_is_resolved_once_and_each_address_checked_before_connecting() -> None:
    # "localhost" goes through the resolver (IP literals do not): refused, with nothing sent anywhere.
    async with LocalServer(answer(response(body=BODY))) as server:
        with pytest.raises(InvalidParameter) as caught:
            await fetch(UrlFetcher(), f"http://localhost:{server.port}/image.png", "seedImage")
        assert "non-public" in caught.value.message and server.connections == 0
        # Allowed, the connection goes to the address the resolver answered, with the name as Host.
        assert await fetch(UrlFetcher(allow_private=True), f"http://localhost:{server.port}/i.png", "image") == BODY
    assert f"Host: localhost:{server.port}\r\n" in server.requests[0].decode()


async def test_an_unresolvable_host_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_such_host(*args: object, **options: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    # No name server is asked: tests send nothing beyond this machine.
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", no_such_host)
    with pytest.raises(InvalidParameter) as caught:
        await fetch(UrlFetcher(allow_private=True), "http://no-such-host.invalid/x.png", "image")
    assert caught.value.message == (
        "fetching image URL http://no-such-host.invalid failed: its host name could not be resolved")


async def test_redirect_is_followed_when_allowed() -> None:
    async with LocalServer(answer(response(body=BODY))) as target:
        redirect = response(302, headers={"Location": target.url("/final.png")})
        async with LocalServer(answer(redirect)) as first:
            assert await fetch(UrlFetcher(allow_private=True), first.url(), "seedImage") == BODY
    assert target.requests[0].startswith(b"GET /final.png ")


async def test_relative_redirect_is_followed() -> None:
    async def respond(head: bytes, writer: asyncio.StreamWriter) -> None:
        if head.startswith(b"GET /start "):
            writer.write(response(301, headers={"Location": "/end"}))
        else:
            writer.write(response(body=b"end"))

    async with LocalServer(respond) as server:
        assert await fetch(UrlFetcher(allow_private=True), server.url("/start"), "image") == b"end"


async def test_redirect_to_loopback_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Treat the first server's address as public, so that the redirect's target is what gets checked.
    real_check = fetch_module.is_forbidden_address
    monkeypatch.setattr(
        fetch_module,
        "is_forbidden_address",
        lambda address: address != ipaddress.ip_address("127.0.0.1") and real_check(address),
    )
    async with LocalServer(answer(response(body=BODY))) as target:
        redirect = response(307, headers={"Location": f"http://127.0.0.2:{target.port}/secret"})
        async with LocalServer(answer(redirect)) as first:
            with pytest.raises(InvalidParameter) as caught:
                await fetch(UrlFetcher(), first.url(), "seedImage")
    assert first.connections == 1
    assert target.connections == 0
    assert caught.value.parameter == "seedImage"
    assert "non-public" in caught.value.message


async def test_too_many_redirects() -> None:
    async def respond(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(response(302, headers={"Location": "/again"}))

    async with LocalServer(respond) as server:
        with pytest.raises(InvalidParameter) as caught:
            await fetch(UrlFetcher(allow_private=True, max_redirects=2), server.url(), "image")
    assert server.connections == 3
    assert "redirected more than 2 times" in caught.value.message
    assert caught.value.parameter == "image"


async def test_error_status_is_reported() -> None:
    async with LocalServer(answer(response(404, body=b"nope", headers={"Content-Length": "4"}))) as server:
        with pytest.raises(InvalidParameter) as caught:
            url = f"http://user:hunter2@127.0.0.1:{server.port}/private/token.png"
            await fetch(UrlFetcher(allow_private=True), url, "seedImage")
    assert caught.value.parameter == "seedImage"
    assert caught.value.message == f"fetching seedImage URL http://127.0.0.1:{server.port} answered HTTP 404"
    assert b"hunter2" not in server.requests[0]


async def test_oversize_content_length_is_refused_before_the_body() -> None:
    # The server announces a large body and then sends nothing: only an early refusal ends this quickly.
    async def respond(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(response(headers={"Content-Length": "10000000"}))
        await server.stop.wait()

    async with LocalServer(respond) as server:
        with pytest.raises(InvalidParameter) as caught:
            await fetch(UrlFetcher(allow_private=True, max_bytes=1000, timeout=seconds(5)), server.url(), "image")
    assert "10000000 bytes, more than the 1000 bytes allowed" in caught.value.message
    assert caught.value.parameter == "image"


@pytest.mark.parametrize("chunked", [False, True])
async def test_oversize_stream_is_cut_off(chunked: bool) -> None:
    async def respond(head: bytes, writer: asyncio.StreamWriter) -> None:
        headers = {"Transfer-Encoding": "chunked"} if chunked else {}
        writer.write(response(headers=headers))
        # Endless body: the fetcher must stop reading on its own.
        while not server.stop.is_set():
            writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n" if chunked else b"x" * 1024)
            await writer.drain()

    async with LocalServer(respond) as server:
        with pytest.raises(InvalidParameter) as caught:
            await fetch(UrlFetcher(allow_private=True, max_bytes=10_000, timeout=seconds(5)), server.url(), "image")
    assert "more than the 10000 bytes allowed" in caught.value.message
    assert caught.value.parameter == "image"


async def test_timeout() -> None:
    async def never(head: bytes, writer: asyncio.StreamWriter) -> None:
        await server.stop.wait()

    async with LocalServer(never) as server:
        started = time.monotonic()
        with pytest.raises(InvalidParameter) as caught:
            await fetch(UrlFetcher(allow_private=True, timeout=seconds(0.5)), server.url(), "seedImage")
        assert time.monotonic() - started < 2
    assert "timed out after 0.5 s" in caught.value.message
    assert caught.value.parameter == "seedImage"


async def test_connection_refused() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(InvalidParameter) as caught:
            await fetch(UrlFetcher(allow_private=True), f"http://127.0.0.1:{port}/x.png", "image")
    assert "could not be reached" in caught.value.message
    assert caught.value.parameter == "image"


async def test_not_http_is_refused() -> None:
    async with LocalServer(answer(b"SSH-2.0-OpenSSH\r\n\r\n")) as server:
        with pytest.raises(InvalidParameter) as caught:
            await fetch(UrlFetcher(allow_private=True), server.url(), "image")
    assert "did not answer with HTTP/1.x" in caught.value.message


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.png", "file:///etc/passwd", "gopher://127.0.0.1:70/", "http:///nohost", "http://[::1"]
)
async def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        await fetch(UrlFetcher(allow_private=True), url, "seedImage")
    assert caught.value.parameter == "seedImage"
    assert "etc/passwd" not in caught.value.message


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "0.0.0.0",
        "0.1.2.3",
        "100.64.0.1",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fec0::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::",  # 6to4 wrapping 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 wrapping 10.0.0.1
    ],
)
def test_non_public_addresses_are_forbidden(address: str) -> None:
    assert is_forbidden_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert not is_forbidden_address(ipaddress.ip_address(address))
