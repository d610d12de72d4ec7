"""getResponse: what an earlier task (async, or sync and cut off by a lost socket) has produced so far."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from imagewire.tasks.context import RecordedTask, TaskContext
from imagewire.tasks.errors import ErrorItem, TaskError, TaskNotFound
from imagewire.tasks.schema import GetResponse
from imagewire.tasks.task_type import TaskType, unchanged


class RecordedErrors(TaskError):
    """The errors an earlier task ended with, answered again as they were."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        super().__init__(items[0].get("message", "the task failed"))
        self.items = items

    def to_item(self, task_type: str | None, task_uuid: str | None) -> ErrorItem:
        item = ErrorItem(self.items[0])
        item.http_status = 200  # getResponse itself answered: with the state of a task that failed
        return item


async def run(task: GetResponse, ctx: TaskContext) -> AsyncIterator[dict[str, Any]]:
    feed = ctx.feed
    # Subscribed before the record is read: a result kept while it is read is either in the answer or pushed.
    following = feed.follow(task.taskUUID) if feed is not None else None
    started = False
    try:
        # Where the task runs elsewhere, the read itself subscribes this socket's session there.
        follower = feed.follower(task.taskUUID) if feed is not None and following is None else None
        record = await _record(task.taskUUID, ctx, follower)
        if following is not None:
            await following.start(len(record.items), record.status == "processing")
            started = True
    finally:
        if following is not None and not started:
            following.cancel()
    for item in record.items:
        yield {**item, "status": "success"}
    if record.status == "error":
        raise RecordedErrors([{**error, "status": "error"} for error in record.errors])
    if record.status == "processing":
        processing: dict[str, Any] = {"taskType": record.task_type, "taskUUID": record.task_uuid,
                                      "status": "processing"}
        if record.progress is not None:
            processing["progress"] = record.progress
        yield processing


async def _record(task_uuid: str, ctx: TaskContext, follower: str | None) -> RecordedTask:
    """The task's record; where the transport answers once (REST), held up to ``hold_seconds`` for it to finish."""
    registry = ctx.services.results
    record = await registry.get(task_uuid, ctx.owner, follower)
    feed = ctx.feed
    if feed is not None and feed.hold_seconds > 0:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + feed.hold_seconds
        while record is not None and record.status == "processing" and (left := deadline - loop.time()) > 0:
            await feed.changed(task_uuid, left)
            record = await registry.get(task_uuid, ctx.owner)
    if record is None:
        raise TaskNotFound(
            f"No task with taskUUID {task_uuid} is known: getResponse answers for tasks sent by the same "
            f"API key, for {int(registry.retention)} s after they finish.", parameter="taskUUID", type="string")
    if record.expires is not None and now() >= record.expires:
        # Its images are past their ttl, deleted or about to be: their URLs and UUIDs must not be handed out.
        raise TaskNotFound(
            f"The results of task {task_uuid} have expired: it was sent with a ttl, and its images stopped being "
            f"served {now() - record.expires:.0f} s ago. Run the task again with a new taskUUID.",
            parameter="taskUUID", type="string")
    if record.items_dropped:
        raise TaskNotFound(
            f"The results of task {task_uuid} are no longer kept: the server let go of its oldest results "
            f"to stay within {registry.max_kept_bytes // (1024 * 1024)} MiB. Use the imageUUIDs or imageURLs "
            "already delivered, or run the task again with a new taskUUID.", parameter="taskUUID", type="string")
    return record


def now() -> float:
    """The wall clock, which a ttl is counted on (a function, so that tests can move it on)."""
    return time.time()


# getResponse reports on other tasks: it is not itself recorded, and its answer is one frame.
TASK_TYPE = TaskType(struct=GetResponse, prepare=unchanged, run=run, recorded=False, single_frame=True)
