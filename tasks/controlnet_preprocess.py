"""imageControlNetPreProcess (``controlNetPreprocess`` in the newer SDKs): a guide image for ControlNet
from an input image.

1. ``prepare``: where the input image is (``inputImage`` or ``inputs.image``), the pre-processor
   (``preProcessorType``, or ``model`` as ``runware:controlnet-preprocess@canny``), the canny thresholds
   and the output settings are checked, without I/O;
2. ``run``: the input image (any of the four forms) is decoded, scaled down to ``width`` × ``height``
   when larger, pre-processed in a worker thread (``tasks/guides.py``: these pre-processors need no
   model weights, so no device job), stored under a new UUID and answered as ``guideImageUUID``,
   reusable as any other image. An inline input is kept too, for ``inputImageUUID``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from imagewire.tasks import guides, tools
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter, MissingParameter
from imagewire.tasks.outputs import ImageOutput, cost, image_output, store_image
from imagewire.tasks.schema import GuideImageResult, ImageControlNetPreProcess
from imagewire.tasks.task_type import TaskType, name_of


@dataclass(frozen=True)
class Prepared:
    task: ImageControlNetPreProcess
    image: str                # the input image as sent
    image_parameter: str      # where it was sent: inputImage or inputs.image
    preprocessor: guides.Preprocess
    options: guides.GuideOptions
    output: ImageOutput


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


def prepare(task: ImageControlNetPreProcess, ctx: TaskContext) -> Prepared:
    image, image_parameter = tools.input_image_field(task, purpose="make a guide image from")
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
    return Prepared(task=task, image=image, image_parameter=image_parameter, preprocessor=preprocessor,
                    options=options, output=image_output(task, ctx))


async def run(prepared: Prepared, ctx: TaskContext) -> AsyncIterator[GuideImageResult]:
    task = prepared.task
    source = await tools.input_image(ctx, prepared.image, prepared.image_parameter)
    started = time.perf_counter()
    with ctx.timed("model"):
        picture = await asyncio.to_thread(guides.fit_within, source.image, task.width, task.height)
        guide = await asyncio.to_thread(prepared.preprocessor, picture, prepared.options)
    seconds = time.perf_counter() - started
    stored = await store_image(ctx, guide, prepared.output)
    input_uuid = await tools.input_image_uuid(ctx, prepared.image, source)
    yield GuideImageResult(
        taskType=name_of(task), taskUUID=task.taskUUID, guideImageUUID=stored.uuid, inputImageUUID=input_uuid,
        guideImageURL=stored.url, guideImageBase64Data=stored.base64_data, guideImageDataURI=stored.data_uri,
        uploaded=stored.uploaded,
        cost=cost(ctx, seconds) if task.includeCost else None)


TASK_TYPE = TaskType(struct=ImageControlNetPreProcess, prepare=prepare, run=run)
