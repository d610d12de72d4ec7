"""imageHistory (an extension of ours): the API key's newest images, for a gallery such as the web page's.

On local disk the server remembers each key's newest images since it started; in a bucket
(``--store s3://``) the list is kept there, and shows what any server sharing it stored. Older images
stay reachable by their UUIDs and URLs, as always.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from imagewire.storage import StorageError
from imagewire.tasks import errors
from imagewire.tasks.context import TaskContext
from imagewire.tasks.schema import HistoryImage, ImageHistory, ImageHistoryResult
from imagewire.tasks.task_type import TaskType, unchanged


async def run(task: ImageHistory, ctx: TaskContext) -> AsyncIterator[ImageHistoryResult]:
    services = ctx.services
    try:
        recent = await services.store.recent(ctx.owner, task.limit)
    except StorageError as exc:
        # The store failed to list, not the request: no parameter is to blame.
        raise errors.StorageError(f"This key's image history could not be read: {exc.problem}. "
                                  "Retry in a moment; the images themselves stay reachable by UUID.") from exc
    images = [HistoryImage(imageUUID=image.uuid, imageURL=services.image_url(image.uuid, image.extension))
              for image in recent]
    yield ImageHistoryResult(taskType="imageHistory", taskUUID=task.taskUUID, images=images)


# A report, not work: not recorded, so the same taskUUID may ask again.
TASK_TYPE = TaskType(struct=ImageHistory, prepare=unchanged, run=run, recorded=False)
