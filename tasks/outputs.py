"""Image results, as every task that makes images answers them: the output settings a request gives
(``outputType``, ``outputFormat``, ``outputQuality``, ``ttl``, ``uploadEndpoint``) checked once, then each
image encoded, stored under a new image UUID (for ``ttl`` seconds, when given), PUT to ``uploadEndpoint``
(``tasks/uploads.py``) and described in the forms asked for; ``includeCost`` priced by device time.

``ttl`` applies to the stored image whatever the output type: the docs speak of the URL, and a task that asked
for base64 data still has its image stored under the imageUUID it answers, which expires with it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol, get_args

from PIL.Image import Image

from imagewire.storage import OUTPUT_FORMAT_NAMES, ImageFormat, output_format, to_base64
from imagewire.tasks import inputs, schema, uploads
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter
from imagewire.tasks.jobs import EncodedImage, ImageEncoding
from imagewire.tasks.schema import ImageResult

OUTPUT_TYPES: tuple[str, ...] = get_args(schema.OutputType)
MIN_TTL = 60


class ImageOutputRequest(Protocol):
    @property
    def outputType(self) -> str | list[Any]: ...

    @property
    def outputFormat(self) -> str: ...

    @property
    def outputQuality(self) -> int: ...

    @property
    def uploadEndpoint(self) -> str | None: ...

    @property
    def ttl(self) -> int | None: ...


@dataclass(frozen=True)
class ImageOutput:
    types: list[str]       # URL, base64Data, dataURI: each once
    format: ImageFormat
    quality: int
    upload_endpoint: str | None = None
    ttl: int | None = None   # seconds the stored image is kept

    @property
    def encoding(self) -> ImageEncoding:
        return ImageEncoding(self.format, self.quality)


def image_output(task: ImageOutputRequest, ctx: TaskContext) -> ImageOutput:
    """The output settings of a request, checked. Raises InvalidParameter naming the one at fault."""
    chosen_format = output_format(task.outputFormat)
    if chosen_format is None:
        raise InvalidParameter(
            f"Invalid outputFormat: expected one of {', '.join(OUTPUT_FORMAT_NAMES)}; received "
            f"{task.outputFormat!r}.", parameter="outputFormat", type="string",
            allowed_values=list(OUTPUT_FORMAT_NAMES))
    output_types: list[str] = (
        [task.outputType] if isinstance(task.outputType, str) else list(dict.fromkeys(task.outputType)))
    if not output_types:
        raise InvalidParameter(f"outputType must name at least one of {', '.join(OUTPUT_TYPES)}; received [].",
                               parameter="outputType", type="string", allowed_values=list(OUTPUT_TYPES))
    # 60 s is the docs' minimum; the longest is this server's own: an image is deleted after --image-ttl-days
    # without a use, so a longer ttl could not be kept.
    longest = int(ctx.services.settings.image_ttl)
    if task.ttl is not None and not MIN_TTL <= task.ttl <= longest:
        raise InvalidParameter(
            f"Invalid ttl: expected an integer from {MIN_TTL} to {longest} seconds (this server deletes stored images "
            f"{longest // 86400} days after their last use); received {task.ttl}.", parameter="ttl", type="integer")
    endpoint = uploads.check(ctx, task.uploadEndpoint) if task.uploadEndpoint is not None else None
    return ImageOutput(types=output_types, format=chosen_format, quality=task.outputQuality,
                       upload_endpoint=endpoint, ttl=task.ttl)


def cost(ctx: TaskContext, device_seconds: float) -> float:
    """What ``includeCost`` reports for work that took ``device_seconds`` on the device."""
    return round(device_seconds * ctx.services.settings.price_per_gpu_second, 6)


@dataclass(frozen=True)
class StoredImage:
    """An image encoded and stored, in the forms a request asked for (the others None)."""

    uuid: str
    url: str | None = None
    base64_data: str | None = None
    data_uri: str | None = None
    uploaded: bool | None = None   # with an uploadEndpoint: whether the PUT succeeded


async def store_image(ctx: TaskContext, image: Image | EncodedImage, output: ImageOutput) -> StoredImage:
    """Encode ``image`` as ``output`` says (unless the device did: a job's ``encoding``), store it under a new image
    UUID and describe it in each form asked for."""
    fmt = output.format
    if isinstance(image, EncodedImage):
        if image.format != fmt:  # the job's encoding is the task's output: anything else is a bug on our side
            raise ValueError(f"a result came encoded as {image.format.name}, for a task asking {fmt.name}")
        data = image.data
    else:
        with ctx.timed("encode"):
            data = (await asyncio.to_thread(output.encoding.encode, image)).data
    with ctx.timed("store"):
        stored = await inputs.store(ctx, data, extension=fmt.extension, ttl=output.ttl)
    if stored.expires is not None:
        # getResponse stops answering the task's results when its first image expires.
        ctx.expires = stored.expires if ctx.expires is None else min(ctx.expires, stored.expires)
    uploaded = None
    if output.upload_endpoint is not None:
        # After the image is stored: a failed upload leaves it available, and the task says so.
        uploaded = await uploads.upload(ctx, output.upload_endpoint, data, fmt.media_type, image_uuid=stored.uuid)
    url = ctx.services.image_url(stored.uuid, fmt.extension) if "URL" in output.types else None
    encoded = None
    if "base64Data" in output.types or "dataURI" in output.types:
        with ctx.timed("encode"):
            encoded = await asyncio.to_thread(to_base64, data)
    return StoredImage(
        uuid=stored.uuid, url=url, base64_data=encoded if "base64Data" in output.types else None,
        data_uri=f"data:{fmt.media_type};base64,{encoded}" if encoded is not None and "dataURI" in output.types
        else None, uploaded=uploaded)


async def deliver_image(ctx: TaskContext, image: Image | EncodedImage, output: ImageOutput, *, task_type: str,
                        task_uuid: str, cost_seconds: float | None = None, **fields: Any) -> ImageResult:
    """Encode and store ``image`` and answer it: an ``ImageResult`` with ``fields`` (seed, inputImageUUID)
    and, when ``cost_seconds`` is given, its cost."""
    stored = await store_image(ctx, image, output)
    result = ImageResult(taskType=task_type, taskUUID=task_uuid, imageUUID=stored.uuid, imageURL=stored.url,
                         imageBase64Data=stored.base64_data, imageDataURI=stored.data_uri, uploaded=stored.uploaded,
                         **fields)
    if cost_seconds is not None:
        result.cost = cost(ctx, cost_seconds)
    return result
