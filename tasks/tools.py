"""What the tool task types (upscale, background removal, caption, prompt enhance) share: where a request's
input image is (``inputImage``, or ``inputs.image`` as newer clients send it), which model serves it (the
request's, else the catalog's default for the task type), the answer's delivery, and running the job.

A task type's default model is the catalog entry with the alias ``default-<…>`` its module names: an
operator makes another model the default by giving it that alias in a catalog file of their own (a
later entry claiming an alias takes it over).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from imagewire.air_registry import ModelEntry
from imagewire.storage import FORMATS, InputImage, canonical_uuid
from imagewire.tasks import inputs
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter, MissingParameter, UnsupportedParameter
from imagewire.tasks.jobs import Job
from imagewire.tasks.task_type import Delivery, name_of


class ImageToolRequest(Protocol):
    @property
    def inputImage(self) -> str | None: ...

    @property
    def inputs(self) -> dict[str, Any] | None: ...


class DeliveredRequest(Protocol):
    @property
    def deliveryMethod(self) -> str: ...

    @property
    def webhookURL(self) -> str | None: ...


def delivery(task: DeliveredRequest) -> Delivery:
    return Delivery(asynchronous=task.deliveryMethod == "async", webhook_url=task.webhookURL)


def input_image_field(task: ImageToolRequest, *, purpose: str) -> tuple[str, str]:
    """``(value, parameter)`` of the image a tool works on. No I/O: for ``prepare``.

    ``purpose`` completes "the image to …" in the message for a missing image.
    """
    given = task.inputs or {}   # an empty object counts as absent
    others = sorted(key for key in given if key != "image")
    if others:
        raise UnsupportedParameter(
            f"inputs.{others[0]} is not supported by {name_of(task)}; inputs takes image only.",  # type: ignore[arg-type]
            parameter=f"inputs.{others[0]}")
    nested = given.get("image")
    if nested is not None and not isinstance(nested, str):
        raise InvalidParameter(
            "Invalid inputs.image: expected a string (an image UUID, a data URI, base64 data or an http(s) URL).",
            parameter="inputs.image", type="string")
    if task.inputImage is not None and nested is not None and nested != task.inputImage:
        raise InvalidParameter("Send the image once: as inputImage or as inputs.image, not two different ones.",
                               parameter="inputs.image", type="string")
    if task.inputImage is not None:
        return task.inputImage, "inputImage"
    if nested is not None:
        return nested, "inputs.image"
    raise MissingParameter(
        f"inputImage is required: the image to {purpose}, as an image UUID, a data URI, base64 data or an "
        "http(s) URL (newer clients send it as inputs.image).", parameter="inputImage", type="string")


def model(ctx: TaskContext, name: str | None, *, default: str, task: str) -> ModelEntry:
    """The model a tool request names, or the task type's default (the entry with alias ``default``)."""
    return inputs.model(ctx, name if name is not None else default, task=task)


async def input_image(ctx: TaskContext, value: str, parameter: str) -> InputImage:
    with ctx.timed("decode"):
        return await inputs.image(ctx, value, parameter=parameter)


async def input_image_uuid(ctx: TaskContext, value: str, image: InputImage) -> str:
    """The image UUID of a tool's input, for ``inputImageUUID``: its own when it was sent as one, else the
    UUID it is kept under from now on (its bytes as they came), so later tasks can use it too."""
    known = canonical_uuid(value.strip())
    if known is not None:
        return known
    extension = next(fmt.extension for fmt in FORMATS if fmt.pil == image.format)
    with ctx.timed("store"):
        return (await inputs.store(ctx, image.data, extension=extension)).uuid


async def results(ctx: TaskContext, job: Job) -> AsyncIterator[Any]:
    """Queue ``job`` on the device and yield its results as they come; the queue and model times go to
    the task's log line."""
    progress = ctx.services.device.submit(job)
    try:
        async for chunk in progress:
            for result in chunk:
                yield result
    finally:
        progress.cancel()  # the task ended early (cancelled, failed): its job stops too
        ctx.timings["queue"] = progress.queue_seconds
        ctx.timings["model"] = progress.compute_seconds
