"""HTTP on the server's one port: the WebSocket endpoint and REST (``/v1``), stored images at their
imageURL, health (``/health``; ``/health/live``: the process answers; ``/health/ready``: it takes
tasks, its models loaded), Prometheus metrics (``/metrics``) and the status panel's numbers
(``/status``).

aiohttp serves HTTP/1.1 and the WebSocket upgrade on the same port, so REST, metrics and pages can
live beside the socket. Every WebSocket bound is an explicit setting here: the largest message, no
compression (it would run on the event loop and delay pongs), the keep-alive ping.

Two answers to other sites in a browser. No page of another site may frame ours (``frame-ancestors
'none'``, ``X-Frame-Options``): the playground keeps the key in the browser and acts on clicks. And
``/status`` and ``/metrics``, which need no key, answer only a request whose ``Host`` is this server as an
operator names it (an address, ``localhost``, the ``--public-url``'s host, an ``--allowed-host``) or one
that carries a valid key: a page of another site that points its own name at 127.0.0.1 (DNS rebinding)
sends its own name as ``Host`` and learns nothing.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from aiohttp import web

from imagewire.server.auth import ApiKeys
from imagewire.server.device import DeviceService
from imagewire.server.handshakes import count_frames
from imagewire.server.inbound_budget import FrameCounter, InboundBudget
from imagewire.server.metrics import CONTENT_TYPE, Metrics
from imagewire.storage import STORED_BY_EXTENSION, ImageStorage, StorageError

WEBSOCKET_PATHS = ("/", "/v1", "/v1/")
# The web page at "/": one file, no build step; it speaks the public WebSocket API like any client.
PLAYGROUND = Path(__file__).with_name("web") / "playground.html"
IMAGE_ROUTE = "/image/{uuid:[0-9a-fA-F-]{36}}.{ext:" + "|".join(STORED_BY_EXTENSION) + "}"
# The server pings every socket this often and closes one whose pong does not come within half of it.
HEARTBEAT_SECONDS = 20.0

# On every answer: no framing by other sites, no type sniffing, no Referer with an image URL in it.
SECURITY_HEADERS = {
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

SocketHandler = Callable[[web.WebSocketResponse, web.Request, FrameCounter | None], Awaitable[None]]
RequestHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def text(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/plain", charset="utf-8")


@web.middleware
async def security_headers(request: web.Request, handler: RequestHandler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as answer:
        answer.headers.update(SECURITY_HEADERS)
        raise
    if not response.prepared:  # a WebSocket's upgrade answer has gone out already
        response.headers.update(SECURITY_HEADERS)
    return response


class HostCheck:
    """Whether a keyless report (``/status``, ``/metrics``) may answer a request: by its ``Host``, or its key."""

    def __init__(self, allowed_hosts: Iterable[str], api_keys: ApiKeys | None) -> None:
        self.any_host = "*" in allowed_hosts
        self.names = {host.lower().rstrip(".") for host in allowed_hosts if host != "*"} | {"localhost"}
        self.api_keys = api_keys

    def allows(self, request: web.Request) -> bool:
        if self.any_host or self._named(request.host):
            return True
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        return self.api_keys is not None and scheme.lower() == "bearer" and self.api_keys.check(key.strip())

    def _named(self, host: str) -> bool:
        try:
            name = urllib.parse.urlsplit(f"//{host}").hostname
        except ValueError:
            return False
        if not name:
            return False
        try:
            ipaddress.ip_address(name)
            return True   # a name no rebinding page can send: it would be its own address
        except ValueError:
            return name.rstrip(".") in self.names


class HttpRoutes:
    def __init__(self, *, store: ImageStorage, device: DeviceService, metrics: Metrics, max_message_bytes: int,
                 inbound: InboundBudget, serve_socket: SocketHandler, rest: RequestHandler,
                 reports: HostCheck | None = None) -> None:
        self.store = store
        self.reports = reports or HostCheck((), None)
        self.inbound = inbound
        self.device = device
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.serve_socket = serve_socket
        self.rest = rest
        self.playground = PLAYGROUND.read_bytes()

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_message_bytes, middlewares=[security_headers])
        for path in WEBSOCKET_PATHS:
            app.router.add_get(path, self.websocket)
            app.router.add_post(path, self.rest)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health/live", self.live)
        app.router.add_get("/health/ready", self.ready)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/status", self.status)
        app.router.add_get(IMAGE_ROUTE, self.image)
        return app

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        websocket = web.WebSocketResponse(
            max_msg_size=self.max_message_bytes, compress=False, autoping=True, heartbeat=HEARTBEAT_SECONDS)
        if not websocket.can_prepare(request).ok:
            if request.path == "/":
                return web.Response(body=self.playground, content_type="text/html", charset="utf-8")
            return text("imagewire: connect a WebSocket client to /v1, or open / in a browser\n")
        # Counted from before the upgrade answer, so that the count starts at the client's first frame.
        frames = count_frames(request, self.inbound, max_message_bytes=self.max_message_bytes)
        await websocket.prepare(request)
        await self.serve_socket(websocket, request, frames)
        return websocket

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "queued": self.device.pending})

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        # The server listens only once its default model is loaded; it stops being ready when it shuts down.
        ready = self.metrics.state.ready()
        return web.json_response({"status": "ready" if ready else "not ready"}, status=200 if ready else 503)

    def _report_allowed(self, request: web.Request) -> None:
        if not self.reports.allows(request):
            raise web.HTTPForbidden(text=(
                f"imagewire: {request.path} answers requests for this server's own host names; {request.host!r} "
                "is not one. Send the API key (Authorization: Bearer KEY), or start the server with "
                "--allowed-host NAME.\n"))

    async def prometheus(self, request: web.Request) -> web.Response:
        self._report_allowed(request)
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def status(self, request: web.Request) -> web.Response:
        self._report_allowed(request)
        return web.json_response(self.metrics.status())

    async def image(self, request: web.Request) -> web.Response:
        try:
            # imageURLs are capabilities, like the public API's: whoever holds the URL may fetch it.
            stored = await self.store.get(request.match_info["uuid"], owner=None)
            if stored.extension != request.match_info["ext"]:
                raise web.HTTPNotFound(text="not found\n")
            # HEAD answers from the record alone: no read of the bytes (from a bucket, a whole GET).
            data = None if request.method == "HEAD" else await self.store.read(stored)
        except StorageError:
            raise web.HTTPNotFound(text="not found\n") from None
        # nosniff: a browser takes the image for what its type says, never for a page or a script.
        headers = {"Cache-Control": "public, max-age=86400, immutable", "X-Content-Type-Options": "nosniff"}
        if data is None:
            headers["Content-Length"] = str(stored.size)
        return web.Response(body=data, content_type=stored.content_type, headers=headers)
