"""Image results, as every task that makes images answers them: the output settings a request gives
(``outputType``, ``outputFormat``, ``outputQuality``, ``ttl``, ``uploadEndpoint``) checked once, then each
image encoded, stored under a new image UUID (for ``ttl`` seconds, when given), PUT to ``uploadEndpoint``
(``tasks/uploads.py``) and described in the forms asked for; ``includeCost`` priced by device time.

A device in another process (a Ray replica) may have encoded an image already (a job's ``encoding``), or encoded and
stored it too (a job's ``store_on_device``, ``stored_results``): the task then stores its bytes, or answers its record.

``ttl`` applies to the stored image whatever the output type: the docs speak of the URL, and a task that asked
for base64 data still has its image stored under the imageUUID it answers, which expires with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, get_args

from PIL.Image import Image

from imagewire import storage
from imagewire.storage import OUTPUT_FORMAT_NAMES, ImageFormat, ImageStorage, StorageError, output_format, to_base64
from imagewire.tasks import inputs, schema, uploads
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter, TaskError
from imagewire.tasks.jobs import EncodedImage, GeneratedImage, ImageEncoding, ProcessedImage, StoreOnDevice
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

    def store_on_device(self, ctx: TaskContext) -> StoreOnDevice | None:
        """Where a device in another process may store the task's images itself (a job's ``store_on_device``): only
        when the task answers nothing but their record (no base64Data or dataURI, no uploadEndpoint: those need the
        bytes here) and its store can be reached from there (a bucket, not this machine's disk)."""
        if self.upload_endpoint is not None or set(self.types) != {"URL"}:
            return None
        shared = ctx.services.store.shared_write(ctx.owner)
        return StoreOnDevice(shared, self.ttl) if shared is not None else None


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


@dataclass(frozen=True)
class StoredChunk:
    """A chunk of a device's results as that device stored them (``stored_results``)."""

    results: list[Any]               # each image as its record, up to the first the store refused
    written: int                     # bytes of the job's images stored so far, this chunk's included
    failure: TaskError | None = None  # why the rest was not stored: what the task answers (storageError)


async def stored_results(store: ImageStorage, chunk: Sequence[Any], owner: str, where: StoreOnDevice,
                         written: int = 0) -> StoredChunk:
    """A device's results with each encoded image stored, by the device that made them, in the task's store (a job's
    ``store_on_device``). ``written``: bytes the job stored before this chunk, counted against the room the job
    carries. A write past a bound, or one the store refuses, ends the chunk with the TaskError the task would answer
    had it stored the image itself; the images stored before it are kept, as the task keeps those it stored."""
    kept: list[Any] = []
    for result in chunk:
        if isinstance(result, (GeneratedImage, ProcessedImage)) and isinstance(result.image, EncodedImage):
            data = result.image.data
            try:
                where.shared.check(len(data), written=written)
                record = await store.put(data, extension=result.image.format.extension, owner=owner, ttl=where.ttl)
            except StorageError as exc:
                return StoredChunk(kept, written, inputs.task_error(exc, inputs.RESULT_IMAGE))
            written += record.size
            result = dataclasses.replace(result, image=record)
        kept.append(result)
    return StoredChunk(kept, written)


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


async def store_image(ctx: TaskContext, image: Image | EncodedImage | storage.StoredImage,
                      output: ImageOutput) -> StoredImage:
    """Encode ``image`` as ``output`` says (unless the device did: a job's ``encoding``), store it under a new image
    UUID (unless the device did: a job's ``store_on_device``) and describe it in each form asked for."""
    fmt = output.format
    if isinstance(image, storage.StoredImage):
        # Stored where it was made, in this task's store: only its record came, and its bytes join the usage here.
        if image.extension != fmt.extension:  # the job's encoding is the task's output: else a bug on our side
            raise ValueError(f"a result came stored as .{image.extension}, for a task asking {fmt.name}")
        ctx.services.store.adopt(image)
        return _described(ctx, image, output, uploaded=None, encoded=None)
    if isinstance(image, EncodedImage):
        if image.format != fmt:  # the job's encoding is the task's output: anything else is a bug on our side
            raise ValueError(f"a result came encoded as {image.format.name}, for a task asking {fmt.name}")
        data = image.data
    else:
        with ctx.timed("encode"):
            data = (await asyncio.to_thread(output.encoding.encode, image)).data
    with ctx.timed("store"):
        stored = await inputs.store(ctx, data, extension=fmt.extension, ttl=output.ttl)
    uploaded = None
    if output.upload_endpoint is not None:
        # After the image is stored: a failed upload leaves it available, and the task says so.
        uploaded = await uploads.upload(ctx, output.upload_endpoint, data, fmt.media_type, image_uuid=stored.uuid)
    encoded = None
    if "base64Data" in output.types or "dataURI" in output.types:
        with ctx.timed("encode"):
            encoded = await asyncio.to_thread(to_base64, data)
    return _described(ctx, stored, output, uploaded=uploaded, encoded=encoded)


def _described(ctx: TaskContext, stored: storage.StoredImage, output: ImageOutput, *, uploaded: bool | None,
               encoded: str | None) -> StoredImage:
    """A stored image in the forms the task asked for, whoever stored it; ``encoded``: its bytes in base64."""
    fmt = output.format
    if stored.expires is not None:
        # getResponse stops answering the task's results when its first image expires.
        ctx.expires = stored.expires if ctx.expires is None else min(ctx.expires, stored.expires)
    url = ctx.services.image_url(stored.uuid, fmt.extension) if "URL" in output.types else None
    return StoredImage(
        uuid=stored.uuid, url=url, base64_data=encoded if "base64Data" in output.types else None,
        data_uri=f"data:{fmt.media_type};base64,{encoded}" if encoded is not None and "dataURI" in output.types
        else None, uploaded=uploaded)


async def deliver_image(ctx: TaskContext, image: Image | EncodedImage | storage.StoredImage, output: ImageOutput, *,
                        task_type: str, task_uuid: str, cost_seconds: float | None = None,
                        **fields: Any) -> ImageResult:
    """Encode and store ``image`` and answer it: an ``ImageResult`` with ``fields`` (seed, inputImageUUID)
    and, when ``cost_seconds`` is given, its cost."""
    stored = await store_image(ctx, image, output)
    result = ImageResult(taskType=task_type, taskUUID=task_uuid, imageUUID=stored.uuid, imageURL=stored.url,
                         imageBase64Data=stored.base64_data, imageDataURI=stored.data_uri, uploaded=stored.uploaded,
                         **fields)
    if cost_seconds is not None:
        result.cost = cost(ctx, cost_seconds)
    return result
