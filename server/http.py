"""Plain HTTP on the WebSocket port: stored images at their imageURL, and a health check.

websockets calls ``process_request`` before every handshake; returning a response ends
the exchange there, returning ``None`` lets the WebSocket upgrade go ahead.
"""

from __future__ import annotations

import re

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from imagewire.server.device import DeviceQueue
from imagewire.storage import STORED_BY_EXTENSION, ImageStore, StorageError

WEBSOCKET_PATHS = frozenset({"/", "/v1", "/v1/"})
IMAGE_PATH = re.compile(
    r"^/image/(?P<uuid>[0-9a-fA-F-]{36})\.(?P<ext>" + "|".join(STORED_BY_EXTENSION) + ")$")


def _response(status: int, reason: str, body: bytes, content_type: str, **headers: str) -> Response:
    pairs = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    pairs += [(name.replace("_", "-"), value) for name, value in headers.items()]
    return Response(status, reason, Headers(pairs), body)


def not_found() -> Response:
    return _response(404, "Not Found", b"not found\n", "text/plain; charset=utf-8")


class HttpRoutes:
    def __init__(self, store: ImageStore, device: DeviceQueue) -> None:
        self.store = store
        self.device = device

    async def __call__(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path in WEBSOCKET_PATHS:
            if "websocket" in request.headers.get("Upgrade", "").lower():
                return None
            return _response(200, "OK", b"imagewire: connect a WebSocket client to /v1\n", "text/plain; charset=utf-8")
        if path == "/health":
            body = orjson.dumps({"status": "ok", "queued": self.device.pending})
            return _response(200, "OK", body, "application/json")
        match = IMAGE_PATH.match(path)
        if match is None:
            return not_found()
        try:
            # imageURLs are capabilities, like the public API's: whoever holds the URL may fetch it.
            stored = await self.store.get(match["uuid"], owner=None)
            if stored.extension != match["ext"]:
                return not_found()
            data = await self.store.read(stored)
        except StorageError:
            return not_found()
        return _response(200, "OK", data, stored.content_type, Cache_Control="public, max-age=86400, immutable")
