"""HTTP on the server's one port: the WebSocket endpoint and REST (``/v1``), stored images at their
imageURL, health.

aiohttp serves HTTP/1.1 and the WebSocket upgrade on the same port, so REST, metrics and pages can
live beside the socket. Every WebSocket bound is an explicit setting here: the largest message, no
compression (it would run on the event loop and delay pongs), the keep-alive ping.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from imagewire.server.device import DeviceQueue
from imagewire.storage import STORED_BY_EXTENSION, ImageStore, StorageError

WEBSOCKET_PATHS = ("/", "/v1", "/v1/")
IMAGE_ROUTE = "/image/{uuid:[0-9a-fA-F-]{36}}.{ext:" + "|".join(STORED_BY_EXTENSION) + "}"
# The server pings every socket this often and closes one whose pong does not come within half of it.
HEARTBEAT_SECONDS = 20.0

SocketHandler = Callable[[web.WebSocketResponse, web.Request], Awaitable[None]]
RequestHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def text(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/plain", charset="utf-8")


class HttpRoutes:
    def __init__(self, *, store: ImageStore, device: DeviceQueue, max_message_bytes: int,
                 serve_socket: SocketHandler, rest: RequestHandler) -> None:
        self.store = store
        self.device = device
        self.max_message_bytes = max_message_bytes
        self.serve_socket = serve_socket
        self.rest = rest

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_message_bytes)
        for path in WEBSOCKET_PATHS:
            app.router.add_get(path, self.websocket)
            app.router.add_post(path, self.rest)
        app.router.add_get("/health", self.health)
        app.router.add_get(IMAGE_ROUTE, self.image)
        return app

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        websocket = web.WebSocketResponse(
            max_msg_size=self.max_message_bytes, compress=False, autoping=True, heartbeat=HEARTBEAT_SECONDS)
        if not websocket.can_prepare(request).ok:
            return text("imagewire: connect a WebSocket client to /v1\n")
        await websocket.prepare(request)
        await self.serve_socket(websocket, request)
        return websocket

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "queued": self.device.pending})

    async def image(self, request: web.Request) -> web.Response:
        try:
            # imageURLs are capabilities, like the public API's: whoever holds the URL may fetch it.
            stored = await self.store.get(request.match_info["uuid"], owner=None)
            if stored.extension != request.match_info["ext"]:
                raise web.HTTPNotFound(text="not found\n")
            data = await self.store.read(stored)
        except StorageError:
            raise web.HTTPNotFound(text="not found\n") from None
        return web.Response(body=data, content_type=stored.content_type,
                            headers={"Cache-Control": "public, max-age=86400, immutable"})
