"""imageUpload: store an image given in any of the four input forms, answer its UUID and URL."""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.services import TaskContext
from storage import UPLOAD_FORMATS, prepare_upload, resolve_image_input
from tasks.schema import ImageUpload, UploadResult


async def run(task: ImageUpload, ctx: TaskContext) -> AsyncIterator[UploadResult]:
    services = ctx.services
    with ctx.timed("decode"):
        image = await resolve_image_input(
            task.image, parameter="image", owner=ctx.owner, store=services.store, fetcher=services.fetcher,
            max_pixels=services.config.max_image_pixels, max_bytes=services.config.max_image_bytes,
            allowed_formats=UPLOAD_FORMATS)
        data, extension = await prepare_upload(image)
    with ctx.timed("store"):
        stored = await services.store.put(data, extension=extension, owner=ctx.owner)
    yield UploadResult(
        taskType="imageUpload", taskUUID=task.taskUUID, imageUUID=stored.uuid,
        imageURL=image_url(ctx, stored.uuid, stored.extension))


def image_url(ctx: TaskContext, image_uuid: str, extension: str) -> str:
    return f"{ctx.services.config.base_url}/image/{image_uuid}.{extension}"
