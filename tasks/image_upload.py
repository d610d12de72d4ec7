"""imageUpload: store an image given in any of the four input forms, answer its UUID and URL."""

from __future__ import annotations

from collections.abc import AsyncIterator

from imagewire.storage import UPLOAD_INPUTS, prepare_upload
from imagewire.tasks import inputs
from imagewire.tasks.context import TaskContext
from imagewire.tasks.schema import ImageUpload, UploadResult
from imagewire.tasks.task_type import TaskType, unchanged


async def run(task: ImageUpload, ctx: TaskContext) -> AsyncIterator[UploadResult]:
    with ctx.timed("decode"):
        image = await inputs.image(ctx, task.image, parameter="image", formats=UPLOAD_INPUTS)
        data, extension = await prepare_upload(image)
    with ctx.timed("store"):
        stored = await inputs.store(ctx, data, extension=extension, what="The uploaded image")
    yield UploadResult(
        taskType="imageUpload", taskUUID=task.taskUUID, imageUUID=stored.uuid,
        imageURL=ctx.services.image_url(stored.uuid, stored.extension))


TASK_TYPE = TaskType(struct=ImageUpload, prepare=unchanged, run=run)
