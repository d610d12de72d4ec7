"""cancelTask (an extension of ours): stop a task this API key sent, by its taskUUID.

A waiting task leaves the queue at once; a running one stops at its next denoising step (tasks that
share its pipeline call carry on). The cancelled task answers with a taskCancelled error item, and
getResponse shows it so. Another key's task is unknown here, exactly as for getResponse.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import TaskNotFound
from imagewire.tasks.schema import Cancellation, CancelTask
from imagewire.tasks.task_type import TaskType, unchanged


async def run(task: CancelTask, ctx: TaskContext) -> AsyncIterator[Cancellation]:
    results = ctx.services.results
    stopped = await results.cancel(task.taskUUID, ctx.owner)
    if stopped is None:
        raise TaskNotFound(
            f"No task with taskUUID {task.taskUUID} is known: cancelTask stops tasks sent by the same API key.",
            parameter="taskUUID", type="string")
    record = await results.get(task.taskUUID, ctx.owner)
    status = "error" if stopped or record is None else record.status
    yield Cancellation(taskType="cancelTask", taskUUID=task.taskUUID, cancelled=stopped, status=status)


# It names another task's UUID: not itself recorded, answered in one frame, and taking no place of the tasks
# it may be sent to stop (its own bound is one message's worth per connection: server/admission.py).
TASK_TYPE = TaskType(struct=CancelTask, prepare=unchanged, run=run, recorded=False, single_frame=True,
                     takes_place=False)
