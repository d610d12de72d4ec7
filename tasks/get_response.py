"""getResponse: what an earlier task (usually an async one) has produced so far."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from server.errors import TaskError, TaskNotFound
from server.services import TaskContext
from tasks.schema import GetResponse


class RecordedErrors(TaskError):
    """The errors an earlier task ended with, answered again as they were."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        super().__init__(items[0].get("message", "the task failed"))
        self.items = items

    def to_item(self, task_type: str | None, task_uuid: str | None) -> dict[str, Any]:
        return self.items[0]


async def run(task: GetResponse, ctx: TaskContext) -> AsyncIterator[dict[str, Any]]:
    record = ctx.services.registry.get(task.taskUUID, ctx.owner)
    if record is None or not record.keep_items:
        raise TaskNotFound(
            f"No task with taskUUID {task.taskUUID} is known: getResponse answers for tasks sent with "
            f"deliveryMethod 'async' by the same API key, for {int(ctx.services.registry.retention)} s after "
            "they finish.", parameter="taskUUID", type="string")
    for item in record.items:
        yield {**item, "status": "success"}
    if record.status == "error":
        raise RecordedErrors([{**error, "status": "error"} for error in record.errors])
    if record.status == "processing":
        yield {"taskType": record.task_type, "taskUUID": record.task_uuid, "status": "processing"}
