"""imageControlNetPreProcess (also ``controlNetPreprocess``): a guide image for ControlNet from an input image.

1. ``prepare``: the pre-processor (``preProcessorType``, or ``model`` as ``runware:controlnet-preprocess@canny``)
   and the canny thresholds are checked, without I/O;
2. ``run``: the input image (``inputImage`` or ``inputs.image``, any of the four forms) is decoded, scaled
   down to ``width`` × ``height`` when larger, pre-processed in a worker thread (``tasks/guides.py``),
   stored under a new UUID and answered as ``guideImageUUID``, reusable as any other image.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import get_args

from imagewire.storage import (
    OUTPUT_FORMAT_NAMES,
    ImageFormat,
    canonical_uuid,
    encode_image,
    output_format,
    prepare_upload,
    to_base64,
)
from imagewire.tasks import guides, inputs, schema
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter, MissingParameter
from imagewire.tasks.schema import ControlNetPreprocess, GuideImageResult
from imagewire.tasks.task_type import Delivery, TaskType

OUTPUT_TYPES: tuple[str, ...] = get_args(schema.OutputType)


@dataclass(frozen=True)
class Prepared:
    task: ControlNetPreprocess
    image: str                # the input image as sent
    image_parameter: str      # where it was sent: inputImage or inputs.image
    preprocessor: guides.Preprocess
    options: guides.GuideOptions
    output_types: list[str]
    output_format: ImageFormat


def check_preprocessor(value: str, *, parameter: str) -> guides.Preprocess:
    name = guides.preprocessor_name(value)
    why = guides.problem(name)
    if why is not None:
        raise InvalidParameter(f"{parameter} {value!r} {why}.", parameter=parameter, type="string",
                               allowed_values=guides.names())
    return guides.PREPROCESSORS[name]


def check_thresholds(low: int, high: int, *, prefix: str = "") -> guides.GuideOptions:
    if low >= high:
        raise InvalidParameter(
            f"{prefix}lowThresholdCanny must be less than {prefix}highThresholdCanny; received {low} and {high}.",
            parameter=f"{prefix}lowThresholdCanny", type="integer")
    return guides.GuideOptions(low_threshold=low, high_threshold=high)


def check_outputs(output_type: str | Sequence[str], fmt: str) -> tuple[list[str], ImageFormat]:
    chosen = output_format(fmt)
    if chosen is None:
        raise InvalidParameter(
            f"Invalid outputFormat: expected one of {', '.join(OUTPUT_FORMAT_NAMES)}; received {fmt!r}.",
            parameter="outputFormat", type="string", allowed_values=list(OUTPUT_FORMAT_NAMES))
    types = [output_type] if isinstance(output_type, str) else list(dict.fromkeys(output_type))
    if not types:
        raise InvalidParameter(f"outputType must name at least one of {', '.join(OUTPUT_TYPES)}; received [].",
                               parameter="outputType", type="string", allowed_values=list(OUTPUT_TYPES))
    return types, chosen


def prepare(task: ControlNetPreprocess, ctx: TaskContext) -> Prepared:
    image, image_parameter = task.inputImage, "inputImage"
    if image is None and task.inputs is not None and task.inputs.image is not None:
        image, image_parameter = task.inputs.image, "inputs.image"
    if image is None:
        raise MissingParameter("inputImage (or inputs.image) is required: the image to make a guide image from.",
                               parameter="inputImage", type="string")
    if task.preProcessorType is not None:
        preprocessor = check_preprocessor(task.preProcessorType, parameter="preProcessorType")
    elif task.model is not None:
        preprocessor = check_preprocessor(task.model, parameter="model")
    else:
        raise MissingParameter(
            f"preProcessorType is required (or model, as {guides.MODEL_PREFIX}canny): one of "
            f"{', '.join(guides.names())}.", parameter="preProcessorType", type="string",
            allowed_values=guides.names())
    options = check_thresholds(task.lowThresholdCanny, task.highThresholdCanny)
    output_types, fmt = check_outputs(task.outputType, task.outputFormat)
    return Prepared(task=task, image=image, image_parameter=image_parameter, preprocessor=preprocessor,
                    options=options, output_types=output_types, output_format=fmt)


async def run(prepared: Prepared, ctx: TaskContext) -> AsyncIterator[GuideImageResult]:
    task, fmt = prepared.task, prepared.output_format
    with ctx.timed("decode"):
        source = await inputs.image(ctx, prepared.image, parameter=prepared.image_parameter)
    started = time.perf_counter()
    with ctx.timed("model"):
        picture = await asyncio.to_thread(guides.fit_within, source.image, task.width, task.height)
        guide = await asyncio.to_thread(prepared.preprocessor, picture, prepared.options)
    seconds = time.perf_counter() - started
    with ctx.timed("encode"):
        data = await asyncio.to_thread(encode_image, guide, fmt, task.outputQuality)
    with ctx.timed("store"):
        stored = await inputs.store(ctx, data, extension=fmt.extension)
        input_uuid = canonical_uuid(prepared.image.strip())
        if input_uuid is None:
            # The input came as data or a URL: kept too, so that its UUID can be answered and reused.
            upload, extension = await prepare_upload(source)
            input_uuid = (await inputs.store(ctx, upload, extension=extension)).uuid
    result = GuideImageResult(taskType=ctx_task_type(ctx), taskUUID=task.taskUUID, guideImageUUID=stored.uuid,
                              inputImageUUID=input_uuid)
    if "URL" in prepared.output_types:
        result.guideImageURL = ctx.services.image_url(stored.uuid, fmt.extension)
    if "base64Data" in prepared.output_types or "dataURI" in prepared.output_types:
        encoded = await asyncio.to_thread(to_base64, data)
        if "base64Data" in prepared.output_types:
            result.guideImageBase64Data = encoded
        if "dataURI" in prepared.output_types:
            result.guideImageDataURI = f"data:{fmt.media_type};base64,{encoded}"
    if task.includeCost:
        result.cost = round(seconds * ctx.services.settings.price_per_gpu_second, 6)
    yield result


def ctx_task_type(ctx: TaskContext) -> str:
    """The spelling the client sent, which its answers carry."""
    return ctx.task_type or TASK_TYPE.tag


TASK_TYPE = TaskType(
    struct=ControlNetPreprocess, prepare=prepare, run=run, aliases=("controlNetPreprocess",),
    delivery=lambda task: Delivery(asynchronous=task.deliveryMethod == "async", webhook_url=task.webhookURL))
