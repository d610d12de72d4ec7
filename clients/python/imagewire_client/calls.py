"""Calls in flight: each waits on a future that the connection's reader completes.

Answers arrive in any order and may share frames; the reader hands every item to the
call whose ``taskUUID`` it carries. A call is done once it holds as many counted items
as it expects, and fails on the first error item for its ``taskUUID``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imagewire_client.errors import ImagewireError

# Keys that mark an item as an error even when it comes in ``data`` (the public API's clients read them so).
_ERROR_MARKERS = ("code", "error", "errorId")


def _new_future() -> asyncio.Future[list[dict[str, Any]]]:
    return asyncio.get_running_loop().create_future()


def inference_progress(item: dict[str, Any]) -> bool:
    """An imageInference progress item: a percent or a queue position, and no image."""
    return "progress" in item and not item.get("imageUUID")


@dataclass
class PendingCall:
    task_uuid: str
    task_type: str
    expected: int
    # imageInference counts only items with an imageUUID; other items of the task are kept but not counted.
    counted_key: str | None = None
    future: asyncio.Future[list[dict[str, Any]]] = field(default_factory=_new_future)
    items: list[dict[str, Any]] = field(default_factory=list)
    # Set once the task was sent a second time after a dropped socket; see ``on_error``.
    resent: bool = False
    # Hears the task's progress items (those ``is_progress`` picks), which are never results: a task that
    # streams a number of them not known in advance (modelDownload) still ends on its ``expected`` results.
    on_progress: Callable[[dict[str, Any]], None] | None = None
    is_progress: Callable[[dict[str, Any]], bool] = inference_progress

    def on_item(self, item: dict[str, Any]) -> None:
        if self.future.done():
            return
        if any(item.get(marker) for marker in _ERROR_MARKERS):
            self.on_error(item)
            return
        if self.is_progress(item):
            if self.on_progress is not None:
                self.on_progress(item)
            return
        self.items.append(item)
        counted = [entry for entry in self.items if self.counted_key is None or entry.get(self.counted_key)]
        if len(counted) >= self.expected:
            self.future.set_result(counted)

    def on_error(self, item: dict[str, Any]) -> None:
        if self.future.done():
            return
        if self.resent and item.get("code") == "conflictTaskUUID":
            # The first send reached the server after all; its results come through the resumed session.
            return
        self.fail(ImagewireError.from_item(item))

    def fail(self, error: ImagewireError) -> None:
        if not self.future.done():
            self.future.set_exception(error)
            # Nobody may await a call that timed out meanwhile; mark the exception as seen.
            self.future.exception()


class CallTable:
    """The calls of one client, by taskUUID."""

    def __init__(self) -> None:
        self._calls: dict[str, PendingCall] = {}

    def add(self, call: PendingCall) -> None:
        self._calls[call.task_uuid] = call

    def remove(self, task_uuid: str) -> None:
        self._calls.pop(task_uuid, None)

    def get(self, task_uuid: Any) -> PendingCall | None:
        return self._calls.get(task_uuid) if isinstance(task_uuid, str) else None

    def fail_all(self, error: ImagewireError) -> None:
        for call in list(self._calls.values()):
            call.fail(error)

    def __len__(self) -> int:
        return len(self._calls)
