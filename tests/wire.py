"""A bare WebSocket peer for tests: sends task arrays, reads answer frames as dicts."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import orjson
from websockets.asyncio.client import ClientConnection, connect

from tests.timing import seconds

API_KEY = "test-key"


def new_uuid() -> str:
    return str(uuid.uuid4())


class Wire:
    def __init__(self, websocket: ClientConnection) -> None:
        self.websocket = websocket

    @classmethod
    async def open(cls, url: str, *, api_key: str | None = API_KEY, session: str | None = None) -> Wire:
        websocket = await connect(url, max_size=None, compression=None)
        wire = cls(websocket)
        if api_key is not None:
            task: dict[str, Any] = {"taskType": "authentication", "apiKey": api_key}
            if session:
                task["connectionSessionUUID"] = session
            await wire.send([task])
            reply = await wire.receive()
            assert reply["data"][0]["taskType"] == "authentication", reply
            wire.session = reply["data"][0]["connectionSessionUUID"]
        return wire

    session: str = ""

    async def send(self, tasks: list[dict[str, Any]] | str | bytes) -> None:
        if isinstance(tasks, (str, bytes)):
            await self.websocket.send(tasks)
        else:
            # msgspec, not orjson: hostile tests send integers beyond 64 bits.
            await self.websocket.send(msgspec.json.encode(tasks).decode())

    async def receive(self, timeout: float = seconds(60)) -> dict[str, Any]:
        frame = await asyncio.wait_for(self.websocket.recv(), timeout)
        assert isinstance(frame, str), "the server must send text frames"
        message = orjson.loads(frame)
        assert isinstance(message, dict)
        return message

    async def items_for(
        self, task_uuid: str, count: int, timeout: float = seconds(120)
    ) -> tuple[list[dict], list[dict]]:
        """Read frames until ``count`` data items or one error arrived for ``task_uuid``."""
        data: list[dict] = []
        errors: list[dict] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(data) < count and not errors:
            message = await self.receive(deadline - loop.time())
            data += [item for item in message.get("data", []) if item.get("taskUUID") == task_uuid]
            errors += [item for item in message.get("errors", []) if item.get("taskUUID") == task_uuid]
        return data, errors

    async def answers(
        self, expected: dict[str, int], timeout: float = seconds(120)
    ) -> dict[str, tuple[list[dict], list[dict]]]:
        """Read frames until every taskUUID in ``expected`` has its count of data items or an error."""
        found: dict[str, tuple[list[dict], list[dict]]] = {task_uuid: ([], []) for task_uuid in expected}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def waiting() -> bool:
            return any(len(data) < expected[uuid] and not errors for uuid, (data, errors) in found.items())

        while waiting():
            message = await self.receive(deadline - loop.time())
            for key, position in (("data", 0), ("errors", 1)):
                for item in message.get(key, []):
                    if item.get("taskUUID") in found:
                        found[item["taskUUID"]][position].append(item)
        return found

    async def run(self, task: dict[str, Any], count: int = 1, timeout: float = seconds(120)) -> list[dict]:
        """Send one task and return its data items; fail the test on an error item."""
        task.setdefault("taskUUID", new_uuid())
        await self.send([task])
        data, errors = await self.items_for(task["taskUUID"], count, timeout)
        assert not errors, errors
        return data

    async def error(self, task: dict[str, Any], timeout: float = seconds(60)) -> dict[str, Any]:
        """Send one task that must fail and return its error item."""
        task.setdefault("taskUUID", new_uuid())
        await self.send([task])
        data, errors = await self.items_for(task["taskUUID"], 1, timeout)
        assert errors, f"expected an error, got {data}"
        return errors[0]

    async def close(self) -> None:
        await self.websocket.close()


T = TypeVar("T")


async def eventually(check: Callable[[], T | Awaitable[T]], timeout: float = seconds(60)) -> T:
    """Call ``check()`` (awaiting it if it is a coroutine) every 50 ms until it returns something
    truthy, and return that; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        assert loop.time() < deadline, f"still {result!r} after {timeout} s"
        await asyncio.sleep(seconds(0.05))


def inference(**fields: Any) -> dict[str, Any]:
    """An imageInference task for the tiny model with small, fast defaults."""
    task: dict[str, Any] = {
        "taskType": "imageInference", "taskUUID": new_uuid(), "model": "imagewire:tiny@1",
        "positivePrompt": "a red fox in the snow", "width": 128, "height": 128, "steps": 2,
        "outputFormat": "PNG",
    }
    task.update(fields)
    return {key: value for key, value in task.items() if value is not ...}


async def model_search(url: str, text: str) -> list[dict[str, Any]]:
    """modelSearch's results as sent (the SDK's model type has no ``available`` and ``comment``)."""
    wire = await Wire.open(url)
    try:
        [result] = await wire.run({"taskType": "modelSearch", "search": text})
        return result["results"]
    finally:
        await wire.close()
