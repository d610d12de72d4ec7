"""A lean WebSocket client for measuring: one request in flight per connection, timed end to end."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

# A run that stops getting answers fails instead of hanging. A request waits behind at most 15
# others (16 connections, one request each); 600 s leaves room for a slow device.
EXCHANGE_TIMEOUT = 600.0


class TaskFailed(RuntimeError):
    pass


class BenchConnection:
    def __init__(self, websocket: ClientConnection) -> None:
        self.websocket = websocket

    @classmethod
    async def open(cls, url: str, api_key: str) -> BenchConnection:
        # No keepalive pings from this side and no compression: either would add work that is not the server's.
        websocket = await connect(url, max_size=None, compression=None, ping_interval=None, open_timeout=60)
        connection = cls(websocket)
        reply = await connection._exchange([{"taskType": "authentication", "apiKey": api_key}],
                                           lambda item: item.get("taskType") == "authentication")
        if "connectionSessionUUID" not in reply:
            raise TaskFailed(f"authentication failed: {reply}")
        return connection

    async def _exchange(self, tasks: list[dict[str, Any]], wanted: Any) -> dict[str, Any]:
        """Send ``tasks`` and read frames until an item for which ``wanted(item)`` holds; errors raise."""
        await self.websocket.send(orjson.dumps(tasks).decode())
        async with asyncio.timeout(EXCHANGE_TIMEOUT):
            while True:
                message = orjson.loads(await self.websocket.recv())
                for error in message.get("errors", []):
                    if wanted(error):
                        raise TaskFailed(f"{error.get('code')}: {error.get('message')}")
                for item in message.get("data", []):
                    if wanted(item):
                        return dict(item)

    async def run(self, task: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Send one task; return (seconds from send to its first result, that result)."""
        task_uuid = task["taskUUID"]
        started = time.perf_counter()
        item = await self._exchange([task], lambda item: item.get("taskUUID") == task_uuid)
        return time.perf_counter() - started, item

    async def ping(self) -> float:
        """Seconds for one ping round trip."""
        started = time.perf_counter()
        await self._exchange([{"taskType": "ping", "ping": True}], lambda item: item.get("taskType") == "ping")
        return time.perf_counter() - started

    async def close(self) -> None:
        await self.websocket.close()
