"""Fetching an image from an http(s) URL without giving clients a way into the server's own network.

The host is resolved once, every address it resolves to is checked, and the connection goes to a
checked address itself (with the host name kept for TLS and the Host header), so a DNS answer that
changes between check and use cannot redirect the request. Redirects are followed by hand and each
target is checked the same way. Size and time are bounded.

The HTTP itself is aiohttp's client. Its connector asks a resolver for addresses and connects to
exactly those, which is the seam this module needs: ``_CheckedResolver`` answers only addresses
that passed the check. Host names that are IP literals never reach a resolver, so ``_parse`` checks
them itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from imagewire.storage.errors import FetchFailed, InputRejected, shown

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_LENGTH = 8192
MAX_HEADER_BYTES = 16 * 1024
READ_CHUNK_BYTES = 64 * 1024

# Networks that ``ipaddress`` flags do not all cover: "this network" and carrier-grade NAT,
# whose addresses reach the provider's internal network.
_FORBIDDEN_IPV4_NETWORKS = (IPv4Network("0.0.0.0/8"), IPv4Network("100.64.0.0/10"))
_NAT64_NETWORK = IPv6Network("64:ff9b::/96")
_HOST_CHARACTERS = re.compile(r"[A-Za-z0-9._:%-]+")
# Characters left as they are in the request target; everything else (spaces, non-ASCII) is
# percent-encoded. (urlsplit has already dropped CR, LF and tabs, so a URL can never add a header line.)
_TARGET_SAFE_CHARACTERS = "/?=&%:@!$'()*+,;-._~[]"
_HEADERS = {"User-Agent": "imagewire", "Accept": "image/*, */*;q=0.5", "Accept-Encoding": "identity",
            "Connection": "close"}

IPAddress = IPv4Address | IPv6Address


def _embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address that an IPv6 address carries to its destination, if it is one of the forms that do."""
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64_NETWORK:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_forbidden_address(address: IPAddress) -> bool:
    """True for every address that is not plainly public: these are never fetched unless an operator allows it."""
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            return is_forbidden_address(address.ipv4_mapped)
        embedded = _embedded_ipv4(address)
        if embedded is not None and is_forbidden_address(embedded):
            return True
        if address.is_site_local:
            return True
    elif any(address in network for network in _FORBIDDEN_IPV4_NETWORKS):
        return True
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str  # ASCII (IDNA), without brackets
    port: int
    request_target: str

    @property
    def origin(self) -> str:
        """scheme://host[:port] — what error messages show: no credentials, no path or query."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == DEFAULT_PORTS[self.scheme] else f":{self.port}"
        return f"{self.scheme}://{host}{port}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def request_url(self) -> URL:
        """What is sent: no credentials, the target already percent-encoded."""
        return URL(f"{self.scheme}://{self.host_header}{self.request_target}", encoded=True)


def _os_error_reason(exc: BaseException) -> str:
    # str(exc) of a failed connect names the address; the errno text alone does not.
    if isinstance(exc, (ssl.SSLCertVerificationError, aiohttp.ClientConnectorCertificateError)):
        return "its TLS certificate could not be verified"
    if isinstance(exc, (ssl.SSLError, aiohttp.ClientSSLError)):
        return "the TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _os_error_reason(exc.os_error)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return type(exc).__name__


class _Forbidden(Exception):
    """Raised by the resolver: the host has an address the server must not reach."""


class _CheckedResolver(AbstractResolver):
    """Resolves once and answers only checked addresses; the connector connects to those."""

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)
        results: list[ResolveResult] = []
        for info_family, _type, proto, _canonname, sockaddr in infos:
            address = str(sockaddr[0])
            if info_family not in (socket.AF_INET, socket.AF_INET6) or any(r["host"] == address for r in results):
                continue
            if not self.allow_private and is_forbidden_address(ipaddress.ip_address(address)):
                raise _Forbidden(address)
            results.append({"hostname": host.rstrip("."), "host": address, "port": port, "family": info_family,
                            "proto": proto, "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV})
        if not results:
            raise OSError(f"{host} has no IP address")
        return results

    async def close(self) -> None:
        pass


class UrlFetcher:
    def __init__(
        self,
        *,
        allow_private: bool = False,
        max_bytes: int = 32 * 1024 * 1024,
        timeout: float = 15.0,
        max_redirects: int = 3,
    ) -> None:
        self.allow_private = allow_private
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_redirects = max_redirects
        self._tls_context: ssl.SSLContext | None = None

    async def fetch(self, url: str) -> bytes:
        """The body of a 2xx answer to GET ``url``; any failure is an InputRejected (a FetchFailed once sent)."""
        target = self._parse(url)
        try:
            async with asyncio.timeout(self.timeout), self._session() as session:
                for redirects in range(self.max_redirects + 1):
                    async with self._request(session, target, "GET") as response:
                        if response.status in REDIRECT_STATUSES:
                            location = response.headers.get("Location")
                            if not location:
                                raise FetchFailed(target.origin, f"answered HTTP {response.status} without a Location")
                        elif not 200 <= response.status < 300:
                            raise FetchFailed(target.origin, f"answered HTTP {response.status}")
                        else:
                            return await self._read_body(response, target)
                    if redirects == self.max_redirects:
                        break
                    target = self._parse(urljoin(target.url, location))
        except TimeoutError as exc:
            raise FetchFailed(target.origin, f"timed out after {self.timeout:g} s") from exc
        raise FetchFailed(target.origin, f"was redirected more than {self.max_redirects} times")

    async def post_json(self, url: str, body: bytes) -> int:
        """POST a JSON body (webhooks); the HTTP status of a 2xx answer, else an InputRejected.

        The same address rules as fetching apply. Redirects are not followed: a webhook
        endpoint that moves is a configuration error the client should see.
        """
        return await self._send("POST", url, body, "application/json")

    async def put(self, url: str, body: bytes, content_type: str) -> int:
        """PUT ``body`` as it is (a result image to a task's uploadEndpoint); the HTTP status of a 2xx answer,
        else an InputRejected. The same rules as ``post_json``: the address checked, no redirects followed,
        the whole request within the timeout, and the answer's body never read."""
        return await self._send("PUT", url, body, content_type)

    def check(self, url: str) -> None:
        """Raise the InputRejected a request to ``url`` would meet before it is sent: not http(s), no host, an
        IP address that is not public. A host name is checked when it is resolved, at the request."""
        self._parse(url)

    async def _send(self, method: str, url: str, body: bytes, content_type: str) -> int:
        target = self._parse(url)
        try:
            async with asyncio.timeout(self.timeout), self._session() as session, self._request(
                    session, target, method, data=body, headers={"Content-Type": content_type}) as response:
                status = response.status
        except TimeoutError as exc:
            raise FetchFailed(target.origin, f"timed out after {self.timeout:g} s") from exc
        if not 200 <= status < 300:
            raise FetchFailed(target.origin, f"answered HTTP {status}")
        return status

    # ------------------------------------------------------------------ one request

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[aiohttp.ClientSession]:
        # One connection per request, no cache of answers or addresses: every request is checked anew.
        connector = aiohttp.TCPConnector(
            resolver=_CheckedResolver(allow_private=self.allow_private), use_dns_cache=False, force_close=True,
            ssl=self._tls(), family=socket.AF_UNSPEC)
        async with aiohttp.ClientSession(
                connector=connector, auto_decompress=False, max_line_size=MAX_HEADER_BYTES,
                max_field_size=MAX_HEADER_BYTES, skip_auto_headers=("Accept-Encoding",)) as session:
            yield session

    @asynccontextmanager
    async def _request(self, session: aiohttp.ClientSession, target: _Target, method: str,
                       **options: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        headers = {**_HEADERS, **options.pop("headers", {})}
        try:
            async with session.request(method, target.request_url, headers=headers, allow_redirects=False,
                                       **options) as response:
                yield response
        except _Forbidden as exc:
            raise self._forbidden(target) from exc
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, _Forbidden):
                raise self._forbidden(target) from exc
            raise FetchFailed(target.origin, "failed: its host name could not be resolved") from exc
        except aiohttp.ClientConnectorError as exc:
            raise FetchFailed(target.origin, f"could not be reached: {_os_error_reason(exc)}") from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise FetchFailed(target.origin, "closed the connection before the answer was complete") from exc
        except aiohttp.ClientPayloadError as exc:
            raise FetchFailed(target.origin, "sent a malformed body") from exc
        except aiohttp.ClientResponseError as exc:
            # aiohttp could not parse the answer: a bad status line, an overlong or malformed header.
            raise FetchFailed(target.origin, "did not answer with HTTP/1.x") from exc
        except aiohttp.ClientError as exc:
            raise FetchFailed(target.origin, f"failed: {_os_error_reason(exc)}") from exc

    def _forbidden(self, target: _Target) -> InputRejected:
        return InputRejected(
            f"URL {target.origin} points to a loopback, private or otherwise "
            "non-public address; this server only fetches from public addresses")

    async def _read_body(self, response: aiohttp.ClientResponse, target: _Target) -> bytes:
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchFailed(target.origin, f"answered with unsupported content encoding {encoding!r}")
        if response.content_length is not None and response.content_length > self.max_bytes:
            raise self._too_large(target, f"{response.content_length} bytes")
        chunks: list[bytes] = []
        total = 0
        try:
            async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
                total += len(chunk)
                if total > self.max_bytes:
                    raise self._too_large(target, "a longer body")
                chunks.append(chunk)
        except aiohttp.ClientPayloadError as exc:
            raise FetchFailed(target.origin, "closed the connection before the answer was complete") from exc
        return b"".join(chunks)

    def _parse(self, url: str) -> _Target:
        if len(url) > MAX_URL_LENGTH:
            raise InputRejected(f"URL is {len(url)} characters long; at most {MAX_URL_LENGTH} are allowed")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InputRejected(f"is not a valid URL, received {shown(url)}") from exc
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise InputRejected(f"URL scheme must be http or https, received {shown(parts.scheme)}")
        try:
            host = (parts.hostname or "").encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise InputRejected("URL has an invalid host name") from exc
        if not _HOST_CHARACTERS.fullmatch(host):
            received = f"{scheme}://{parts.hostname or ''}"
            raise InputRejected(
                f"URL must name a host, as in 'https://example.com/image.png', received {shown(received)}")
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        target = _Target(
            url=url,
            scheme=scheme,
            host=host,
            port=port if port is not None else DEFAULT_PORTS[scheme],
            request_target=quote(path, safe=_TARGET_SAFE_CHARACTERS),
        )
        # An IP literal is connected to as it is, without a resolver: check it here.
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            return target
        if not self.allow_private and is_forbidden_address(literal):
            raise self._forbidden(target)
        return target

    def _tls(self) -> ssl.SSLContext:
        if self._tls_context is None:
            self._tls_context = ssl.create_default_context()
        return self._tls_context

    def _too_large(self, target: _Target, received: str) -> FetchFailed:
        return FetchFailed(target.origin, f"answered with {received}, more than the {self.max_bytes} bytes allowed")
