"""Fetching an image from an http(s) URL without giving clients a way into the server's own network.

The host is resolved once, every address it resolves to is checked, and the connection goes
to a checked address itself (with the host name kept for TLS and the Host header), so a DNS
answer that changes between check and use cannot redirect the request. Redirects are followed
by hand and each target is checked the same way. Size and time are bounded.

The HTTP client is deliberately minimal (one GET, HTTP/1.1, ``Connection: close``): a general
client library would resolve names itself and so reopen the gap this module closes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import ssl
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from urllib.parse import quote, urljoin, urlsplit

from imagewire.storage.errors import FetchFailed, InputRejected, shown

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_LENGTH = 8192
MAX_HEADER_LINES = 100
MAX_LINE_BYTES = 16 * 1024
READ_CHUNK_BYTES = 64 * 1024

# Networks that ``ipaddress`` flags do not all cover: "this network" and carrier-grade NAT,
# whose addresses reach the provider's internal network.
_FORBIDDEN_IPV4_NETWORKS = (IPv4Network("0.0.0.0/8"), IPv4Network("100.64.0.0/10"))
_NAT64_NETWORK = IPv6Network("64:ff9b::/96")
_HOST_CHARACTERS = re.compile(r"[A-Za-z0-9._:%-]+")
_CHUNK_SIZE = re.compile(r"[0-9A-Fa-f]{1,16}")
# Characters left as they are in the request target; everything else (spaces, CR/LF, non-ASCII)
# is percent-encoded, so a URL can never add a header line.
_TARGET_SAFE_CHARACTERS = "/?=&%:@!$'()*+,;-._~[]"

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


@dataclass(frozen=True)
class _Head:
    status: int
    headers: dict[str, str]


def _os_error_reason(exc: OSError) -> str:
    # str(exc) of a failed connect names the address; the errno text alone does not.
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "its TLS certificate could not be verified"
    if isinstance(exc, ssl.SSLError):
        return "the TLS handshake failed"
    if exc.errno:
        return os.strerror(exc.errno)
    return type(exc).__name__


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
            async with asyncio.timeout(self.timeout):
                for redirects in range(self.max_redirects + 1):
                    location = await self._get_once(target)
                    if isinstance(location, bytes):
                        return location
                    if redirects == self.max_redirects:
                        break
                    target = self._parse(urljoin(target.url, location))
        except TimeoutError as exc:
            raise FetchFailed(target.origin, f"timed out after {self.timeout:g} s") from exc
        raise FetchFailed(target.origin, f"was redirected more than {self.max_redirects} times")

    # ------------------------------------------------------------------ one request

    async def post_json(self, url: str, body: bytes) -> int:
        """POST a JSON body (webhooks); the HTTP status of a 2xx answer, else an InputRejected.

        The same address rules as fetching apply. Redirects are not followed: a webhook
        endpoint that moves is a configuration error the client should see.
        """
        target = self._parse(url)
        try:
            async with asyncio.timeout(self.timeout):
                head, _ = await self._exchange(target, "POST", body, "application/json", read_body=False)
        except TimeoutError as exc:
            raise FetchFailed(target.origin, f"timed out after {self.timeout:g} s") from exc
        if not 200 <= head.status < 300:
            raise FetchFailed(target.origin, f"answered HTTP {head.status}")
        return head.status

    async def _get_once(self, target: _Target) -> bytes | str:
        """The body of a 2xx answer, or the Location of a redirect."""
        head, body = await self._exchange(target, "GET", None, None, read_body=True)
        if head.status in REDIRECT_STATUSES:
            location = head.headers.get("location")
            if not location:
                raise FetchFailed(target.origin, f"answered HTTP {head.status} without a Location")
            return location
        if not 200 <= head.status < 300:
            raise FetchFailed(target.origin, f"answered HTTP {head.status}")
        return body or b""

    async def _exchange(
        self,
        target: _Target,
        method: str,
        body: bytes | None,
        content_type: str | None,
        *,
        read_body: bool,
    ) -> tuple[_Head, bytes | None]:
        """One request to a checked address: the answer's head, and its body when asked for and 2xx."""
        addresses = await self._resolve(target)
        reader, writer = await self._connect(addresses, target)
        try:
            lines = [
                f"{method} {target.request_target} HTTP/1.1",
                f"Host: {target.host_header}",
                "User-Agent: imagewire",
                "Accept: image/*, */*;q=0.5",
                "Accept-Encoding: identity",
                "Connection: close",
            ]
            if body is not None:
                lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b""))
            await writer.drain()
            head = await self._read_head(reader, target)
            if read_body and 200 <= head.status < 300 and head.status != 204:
                return head, await self._read_body(reader, head, target)
            return head, None
        except asyncio.IncompleteReadError as exc:
            raise FetchFailed(target.origin, "closed the connection before the answer was complete") from exc
        except OSError as exc:
            raise FetchFailed(target.origin, f"failed: {_os_error_reason(exc)}") from exc
        finally:
            # Not awaiting wait_closed(): a TLS peer that never acknowledges the close must not
            # hold a finished request until the timeout.
            writer.close()

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
        return _Target(
            url=url,
            scheme=scheme,
            host=host,
            port=port if port is not None else DEFAULT_PORTS[scheme],
            request_target=quote(path, safe=_TARGET_SAFE_CHARACTERS),
        )

    async def _resolve(self, target: _Target) -> list[str]:
        """Every address of the host, each checked before anything is sent anywhere."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise FetchFailed(target.origin, "failed: its host name could not be resolved") from exc
        addresses: list[str] = []
        for family, _type, _proto, _canonname, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in addresses:
                addresses.append(str(sockaddr[0]))
        if not addresses:
            raise FetchFailed(target.origin, "failed: its host name has no IP address")
        if not self.allow_private:
            for address in addresses:
                if is_forbidden_address(ipaddress.ip_address(address)):
                    raise InputRejected(
                        f"URL {target.origin} points to a loopback, private or otherwise "
                        "non-public address; this server only fetches from public addresses")
        return addresses

    async def _connect(
        self, addresses: list[str], target: _Target
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        tls = self._tls() if target.scheme == "https" else None
        failure: OSError | None = None
        for address in addresses:
            try:
                # The checked address itself, not the name: resolving again could give another answer.
                return await asyncio.open_connection(
                    address,
                    target.port,
                    ssl=tls,
                    server_hostname=target.host if tls is not None else None,
                    limit=MAX_LINE_BYTES,
                )
            except OSError as exc:
                failure = exc
        assert failure is not None
        raise FetchFailed(target.origin, f"could not be reached: {_os_error_reason(failure)}") from failure

    def _tls(self) -> ssl.SSLContext:
        if self._tls_context is None:
            self._tls_context = ssl.create_default_context()
        return self._tls_context

    # ------------------------------------------------------------------ reading the answer

    async def _read_line(self, reader: asyncio.StreamReader, target: _Target) -> str:
        try:
            line = await reader.readline()
        except ValueError as exc:  # a line longer than the reader's limit
            raise FetchFailed(target.origin, "answered with an overlong header line") from exc
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)
        return line.decode("latin-1").rstrip("\r\n")

    async def _read_head(self, reader: asyncio.StreamReader, target: _Target) -> _Head:
        while True:
            status_line = await self._read_line(reader, target)
            version, _, rest = status_line.partition(" ")
            status_text = rest[:3]
            if not version.startswith("HTTP/1.") or len(status_text) != 3 or not status_text.isdigit():
                raise FetchFailed(target.origin, "did not answer with HTTP/1.x")
            headers: dict[str, str] = {}
            for _ in range(MAX_HEADER_LINES):
                line = await self._read_line(reader, target)
                if not line:
                    break
                name, separator, value = line.partition(":")
                if not separator:
                    raise FetchFailed(target.origin, "answered with a malformed header")
                name = name.strip().lower()
                headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
            else:
                raise FetchFailed(target.origin, f"answered with more than {MAX_HEADER_LINES} headers")
            status = int(status_text)
            # 1xx answers (e.g. 103 Early Hints) precede the real one.
            if status >= 200:
                return _Head(status, headers)

    async def _read_body(self, reader: asyncio.StreamReader, head: _Head, target: _Target) -> bytes:
        encoding = head.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchFailed(target.origin, f"answered with unsupported content encoding {encoding!r}")
        transfer_encoding = head.headers.get("transfer-encoding", "").strip().lower()
        if transfer_encoding:
            if transfer_encoding != "chunked":
                raise FetchFailed(target.origin, f"answered with unsupported transfer encoding {transfer_encoding!r}")
            return await self._read_chunked(reader, target)
        content_length = head.headers.get("content-length")
        if content_length is not None:
            lengths = {value.strip() for value in content_length.split(",")}
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise FetchFailed(target.origin, "answered with an invalid Content-Length")
            length = int(next(iter(lengths)))
            if length > self.max_bytes:
                raise self._too_large(target, f"{length} bytes")
            return await reader.readexactly(length)
        return await self._read_until_close(reader, target)

    async def _read_chunked(self, reader: asyncio.StreamReader, target: _Target) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size_text = (await self._read_line(reader, target)).split(";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise FetchFailed(target.origin, "answered with a malformed chunked body")
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > self.max_bytes:
                raise self._too_large(target, "a longer body")
            chunks.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise FetchFailed(target.origin, "answered with a malformed chunked body")
        # Trailers are ignored; a peer that closes instead of sending the final blank line still delivered the body.
        for _ in range(MAX_HEADER_LINES):
            line = await reader.readline()
            if line in (b"", b"\r\n", b"\n"):
                break
        return b"".join(chunks)

    async def _read_until_close(self, reader: asyncio.StreamReader, target: _Target) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while chunk := await reader.read(READ_CHUNK_BYTES):
            total += len(chunk)
            if total > self.max_bytes:
                raise self._too_large(target, "a longer body")
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, target: _Target, received: str) -> FetchFailed:
        return FetchFailed(target.origin, f"answered with {received}, more than the {self.max_bytes} bytes allowed")
