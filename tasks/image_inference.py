"""imageInference: text-to-image, and image-to-image from a seedImage.

The handler reads as the path of one task:

1. ``prepare``: resolve the model and check every parameter against it, without I/O;
2. ``run``: find the weights, resolve the seed image (any of the four input forms) and settle
   the output size, queue the job on the device, and as chunks of images come back, encode and
   store each one concurrently and yield its result item as soon as it is ready.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import get_args

import msgspec
from PIL import Image

from imagewire.air_registry import AIR, ARCHITECTURES, ModelDefaults, ModelEntry, SamplerSpec
from imagewire.storage import OUTPUT_FORMAT_NAMES, ImageFormat, encode_image, output_format, to_base64
from imagewire.tasks import inputs, schema
from imagewire.tasks.context import TaskContext
from imagewire.tasks.describe import describe_annotation, nearest_valid, stepped_range
from imagewire.tasks.errors import InvalidParameter, MissingParameter, UnknownParameter, UnsupportedParameter
from imagewire.tasks.jobs import GeneratedImage, InferenceJob
from imagewire.tasks.schema import ImageInference, ImageResult
from imagewire.tasks.task_type import Delivery, TaskType

BLANK_PROMPT = "__BLANK__"
OUTPUT_TYPES: tuple[str, ...] = get_args(schema.OutputType)
_SIZE = stepped_range(msgspec.inspect.type_info(schema.Width))
assert _SIZE is not None


@dataclass(frozen=True)
class Prepared:
    """The request with the model's defaults filled in and every value checked."""

    task: ImageInference
    model: ModelEntry
    prompt: str
    negative_prompt: str | None
    steps: int
    cfg_scale: float
    sampler: SamplerSpec | None
    seeds: list[int]
    output_types: list[str]
    output_format: ImageFormat
    output_quality: int


@dataclass(frozen=True)
class AwaitingDownload:
    """A request for a Civitai checkpoint this server has not fetched yet. Only the checkpoint tells
    its architecture, so the checks that need the model wait for it: ``run`` fetches it, then
    prepares the task as it would for any model in the catalog."""

    task: ImageInference
    air: AIR


def prepare(task: ImageInference, ctx: TaskContext) -> Prepared | AwaitingDownload:
    """Every check that needs the model but no I/O. Raises a TaskError naming the parameter."""
    download = inputs.model_to_download(ctx, task.model)
    if download is not None:
        check_safety(task)
        return AwaitingDownload(task, download)
    model = inputs.model(ctx, task.model)
    defaults = model.defaults
    check_safety(task)
    if ARCHITECTURES[model.architecture].inpainting_only:
        raise InvalidParameter(
            f"model {model.label} only does inpainting: it needs a seedImage and a maskImage, and this "
            "server takes no maskImage yet", parameter="model", type="string")
    if task.seedImage is None:
        if ARCHITECTURES[model.architecture].image_to_image_only:
            raise InvalidParameter(
                f"model {model.air} is a refiner and only does image-to-image: send a seedImage with it",
                parameter="seedImage", type="string")
        for name in ("width", "height"):
            if getattr(task, name) is None:
                raise MissingParameter(
                    f"{name} is required for text-to-image (without seedImage): "
                    f"{describe_annotation(schema.Width)}; this model's default is "
                    f"{defaults.width}x{defaults.height}.", parameter=name, type="integer")
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
    steps = task.steps if task.steps is not None else defaults.steps
    if task.seedImage is not None and int(steps * task.strength) < 1:
        raise InvalidParameter(
            f"strength x steps must leave at least one denoising step; received strength {task.strength} "
            f"with steps {steps} ({steps * task.strength:.2f} steps). Use strength of at least "
            f"{1 / steps:.3g} or more steps.", parameter="strength", type="number")
    first_seed = task.seed if task.seed is not None else secrets.randbelow(schema.MAX_SEED - 20)
    return Prepared(
        task=task,
        model=model,
        prompt="" if task.positivePrompt == BLANK_PROMPT else task.positivePrompt,
        negative_prompt=None if task.negativePrompt in (None, "", BLANK_PROMPT) else task.negativePrompt,
        steps=steps,
        cfg_scale=task.CFGScale if task.CFGScale is not None else defaults.cfg_scale,
        sampler=inputs.sampler(ctx, task.scheduler if task.scheduler is not None else defaults.scheduler,
                               sampling=ARCHITECTURES[model.architecture].sampling),
        # Counting up wraps past the largest seed, so every returned seed can be sent back.
        seeds=[(first_seed + i) % (schema.MAX_SEED + 1) for i in range(task.numberResults)],
        output_types=output_types,
        output_format=chosen_format,
        output_quality=task.outputQuality,
    )


SAFETY_FIELDS = ("checkContent", "checkInputs", "mode", "tolerance")


def check_safety(task: ImageInference) -> None:
    """Safety checks are not run here, so asking for one is an error rather than a silent no."""
    safety = task.safety or {}
    unknown = sorted(set(safety) - set(SAFETY_FIELDS))
    if unknown:
        raise UnknownParameter(
            f"Unknown parameter safety.{unknown[0]}; the fields of safety are {', '.join(SAFETY_FIELDS)}.",
            parameter=f"safety.{unknown[0]}", allowed_values=list(SAFETY_FIELDS))
    asked = [f"safety.{name}" for name in ("checkContent", "checkInputs") if safety.get(name)]
    if safety.get("mode") not in (None, "none"):
        asked.append("safety.mode")
    if task.checkNSFW:
        asked.append("checkNSFW")
    if asked:
        raise UnsupportedParameter(
            f"Content safety checks ({', '.join(asked)}) are not supported by this server yet; leave them off "
            "(false, or mode 'none').", parameter=asked[0])


def size_from_seed(value: int | None, seed_size: int) -> int:
    """The requested size, or the seed image's own, the nearest valid size to it."""
    if value is not None:
        return value
    assert _SIZE is not None and _SIZE.multiple_of is not None
    rounded = int(round(seed_size / _SIZE.multiple_of)) * _SIZE.multiple_of
    return nearest_valid(_SIZE, rounded)[0]


# A model's defaults are values a request could send, held to the same limits.
_DEFAULT_LIMITS = (("width", "width", schema.Width), ("height", "height", schema.Height),
                   ("steps", "steps", schema.Steps), ("CFGScale", "cfg_scale", schema.CFGScale),
                   ("strength", "strength", schema.Strength))


def check_model_defaults(defaults: ModelDefaults) -> None:
    """Raise ValueError naming the first of a catalog entry's defaults that no request could send."""
    for name, attribute, limits in _DEFAULT_LIMITS:
        value = getattr(defaults, attribute)
        try:
            msgspec.convert(value, limits)
        except msgspec.ValidationError:
            raise ValueError(f"defaults.{name} must be {describe_annotation(limits)}, not {value!r}") from None


async def run(prepared: Prepared | AwaitingDownload, ctx: TaskContext) -> AsyncIterator[ImageResult]:
    if isinstance(prepared, AwaitingDownload):
        with ctx.timed("download"):
            await inputs.download_model(ctx, prepared.air)
        ready = prepare(prepared.task, ctx)  # in the catalog now
        assert isinstance(ready, Prepared)
        prepared = ready
    task, services = prepared.task, ctx.services
    weights = await inputs.weights(ctx, prepared.model)
    init_image = None
    width, height = task.width, task.height
    if task.seedImage is not None:
        with ctx.timed("decode"):
            seed = await inputs.image(ctx, task.seedImage, parameter="seedImage")
            width, height = size_from_seed(width, seed.width), size_from_seed(height, seed.height)
            init_image = seed.image
            if init_image.size != (width, height):
                init_image = await asyncio.to_thread(init_image.resize, (width, height), Image.Resampling.LANCZOS)
    assert width is not None and height is not None
    job = InferenceJob(
        task_uuid=task.taskUUID, owner=ctx.owner, model=prepared.model, weights=weights, prompt=prepared.prompt,
        negative_prompt=prepared.negative_prompt, width=width, height=height, steps=prepared.steps,
        cfg_scale=prepared.cfg_scale, sampler=prepared.sampler, seeds=prepared.seeds, init_image=init_image,
        strength=task.strength)
    progress = services.device.submit(job)
    try:
        async for chunk in progress:
            pending = [asyncio.ensure_future(_deliver(prepared, image, ctx)) for image in chunk]
            try:
                for finished in asyncio.as_completed(pending):
                    yield await finished
            finally:
                for future in pending:
                    future.cancel()
    finally:
        ctx.timings["queue"] = progress.queue_seconds
        ctx.timings["model"] = progress.compute_seconds


async def _deliver(prepared: Prepared, generated: GeneratedImage, ctx: TaskContext) -> ImageResult:
    task, fmt = prepared.task, prepared.output_format
    with ctx.timed("encode"):
        data = await asyncio.to_thread(encode_image, generated.image, fmt, prepared.output_quality)
    with ctx.timed("store"):
        stored = await inputs.store(ctx, data, extension=fmt.extension)
    result = ImageResult(taskType="imageInference", taskUUID=task.taskUUID, imageUUID=stored.uuid,
                         seed=generated.seed)
    if "URL" in prepared.output_types:
        result.imageURL = ctx.services.image_url(stored.uuid, fmt.extension)
    if "base64Data" in prepared.output_types or "dataURI" in prepared.output_types:
        with ctx.timed("encode"):
            encoded = await asyncio.to_thread(to_base64, data)
        if "base64Data" in prepared.output_types:
            result.imageBase64Data = encoded
        if "dataURI" in prepared.output_types:
            result.imageDataURI = f"data:{fmt.media_type};base64,{encoded}"
    if task.includeCost:
        result.cost = round(generated.seconds * ctx.services.settings.price_per_gpu_second, 6)
    return result


TASK_TYPE = TaskType(
    struct=ImageInference, prepare=prepare, run=run,
    delivery=lambda task: Delivery(asynchronous=task.deliveryMethod == "async", webhook_url=task.webhookURL))
