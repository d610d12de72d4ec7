"""imageInference: text-to-image, and image-to-image from a seedImage.

The handler reads as the path of one task:

1. resolve the model and check every parameter against it (``validate``);
2. resolve the seed image (any of the four input forms) and settle the output size;
3. queue the job on the device scheduler;
4. as chunks of images come back, encode and store each one concurrently and yield its
   result item as soon as it is ready.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from PIL import Image

from air_registry.catalog import ModelEntry, locate_weights
from air_registry.schedulers import SchedulerSpec, resolve_scheduler
from server.errors import InvalidParameter, MissingParameter, UnknownParameter, UnsupportedParameter
from server.scheduler import GeneratedImage, InferenceJob
from server.services import Services, TaskContext
from storage import CONTENT_TYPES, EXTENSIONS, INFERENCE_FORMATS, encode_image, resolve_image_input, to_base64
from tasks.image_upload import image_url
from tasks.schema import OUTPUT_FORMATS, ImageInference, ImageResult

BLANK_PROMPT = "__BLANK__"
MIN_SIZE, MAX_SIZE, SIZE_STEP = 128, 2048, 64
MAX_SEED = 9223372036854775807


@dataclass(frozen=True)
class Settings:
    """The request with the model's defaults filled in and every value checked."""

    prompt: str
    negative_prompt: str | None
    steps: int
    cfg_scale: float
    scheduler: SchedulerSpec | None
    seeds: list[int]
    output_types: list[str]
    output_format: str
    output_quality: int


def validate(task: ImageInference, model: ModelEntry) -> Settings:
    """Checks that need the model but no I/O. Raises a TaskError naming the parameter."""
    defaults = model.defaults
    check_safety(task)
    if task.seedImage is None:
        for name in ("width", "height"):
            if getattr(task, name) is None:
                raise MissingParameter(
                    f"{name} is required for text-to-image (without seedImage): an integer from {MIN_SIZE} to "
                    f"{MAX_SIZE}, divisible by {SIZE_STEP}; this model's default is "
                    f"{defaults.width}x{defaults.height}.", parameter=name, type="integer")
    for name in ("width", "height"):
        check_dimension(name, getattr(task, name))
    output_format = task.outputFormat.upper()
    if output_format == "JPEG":
        output_format = "JPG"
    if output_format not in OUTPUT_FORMATS:
        raise InvalidParameter(
            f"Invalid outputFormat: expected one of {', '.join(OUTPUT_FORMATS)}; received "
            f"{task.outputFormat!r}.", parameter="outputFormat", type="string", allowed_values=list(OUTPUT_FORMATS))
    output_types: list[str] = (
        [task.outputType] if isinstance(task.outputType, str) else list(dict.fromkeys(task.outputType)))
    if not output_types:
        raise InvalidParameter("outputType must name at least one of URL, base64Data, dataURI; received [].",
                               parameter="outputType", type="string", allowed_values=["URL", "base64Data", "dataURI"])
    steps = task.steps if task.steps is not None else defaults.steps
    if task.seedImage is not None and int(steps * task.strength) < 1:
        raise InvalidParameter(
            f"strength x steps must leave at least one denoising step; received strength {task.strength} "
            f"with steps {steps} ({steps * task.strength:.2f} steps). Use strength of at least "
            f"{1 / steps:.3g} or more steps.", parameter="strength", type="number")
    first_seed = task.seed if task.seed is not None else secrets.randbelow(MAX_SEED - 20)
    return Settings(
        prompt="" if task.positivePrompt == BLANK_PROMPT else task.positivePrompt,
        negative_prompt=None if task.negativePrompt in (None, "", BLANK_PROMPT) else task.negativePrompt,
        steps=steps,
        cfg_scale=task.CFGScale if task.CFGScale is not None else defaults.cfg_scale,
        scheduler=resolve_scheduler(task.scheduler if task.scheduler is not None else defaults.scheduler),
        # Counting up wraps past the largest seed, so every returned seed can be sent back.
        seeds=[(first_seed + i) % (MAX_SEED + 1) for i in range(task.numberResults)],
        output_types=output_types,
        output_format=output_format,
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


def check_dimension(name: str, value: int | None) -> None:
    if value is None or (MIN_SIZE <= value <= MAX_SIZE and value % SIZE_STEP == 0):
        return
    if value < MIN_SIZE or value > MAX_SIZE:
        nearest = [MIN_SIZE if value < MIN_SIZE else MAX_SIZE]
    else:
        lower = value // SIZE_STEP * SIZE_STEP
        nearest = [size for size in (lower, lower + SIZE_STEP) if MIN_SIZE <= size <= MAX_SIZE]
    raise InvalidParameter(
        f"Invalid {name}: must be from {MIN_SIZE} to {MAX_SIZE} and divisible by {SIZE_STEP}; received {value}. "
        f"Nearest valid value{'s' if len(nearest) > 1 else ''}: {' or '.join(map(str, nearest))}.",
        parameter=name, type="integer", allowed_values=nearest, code=f"invalid{name.capitalize()}")


def size_from_seed(value: int | None, seed_size: int) -> int:
    """The requested size, or the seed image's own rounded to a multiple of 64 and clamped."""
    if value is not None:
        return value
    rounded = int(round(seed_size / SIZE_STEP)) * SIZE_STEP
    return min(MAX_SIZE, max(MIN_SIZE, rounded))


def check(task: ImageInference, services: Services) -> None:
    """The model exists and every parameter fits it."""
    validate(task, services.catalog.resolve(task.model))


async def run(task: ImageInference, ctx: TaskContext) -> AsyncIterator[ImageResult]:
    services = ctx.services
    # 1. model and parameters
    model = services.catalog.resolve(task.model)
    settings = validate(task, model)
    await asyncio.to_thread(
        locate_weights, model, data_dir=services.config.data_dir, allow_downloads=services.config.allow_downloads)
    # 2. seed image and output size
    init_image = None
    width, height = task.width, task.height
    if task.seedImage is not None:
        with ctx.timed("decode"):
            seed = await resolve_image_input(
                task.seedImage, parameter="seedImage", owner=ctx.owner, store=services.store,
                fetcher=services.fetcher, max_pixels=services.config.max_image_pixels,
                max_bytes=services.config.max_image_bytes, allowed_formats=INFERENCE_FORMATS)
            width, height = size_from_seed(width, seed.width), size_from_seed(height, seed.height)
            init_image = seed.image
            if init_image.size != (width, height):
                init_image = await asyncio.to_thread(init_image.resize, (width, height), Image.Resampling.LANCZOS)
    assert width is not None and height is not None
    job = InferenceJob(
        task_uuid=task.taskUUID, model=model, prompt=settings.prompt, negative_prompt=settings.negative_prompt,
        width=width, height=height, steps=settings.steps, cfg_scale=settings.cfg_scale,
        scheduler=settings.scheduler, seeds=settings.seeds, init_image=init_image, strength=task.strength)
    # 3. the device
    handle = services.scheduler.submit(job)
    try:
        async for chunk in handle:
            # 4. deliver each image as soon as it is encoded and stored
            pending = [asyncio.ensure_future(_deliver(task, settings, image, ctx)) for image in chunk]
            try:
                for finished in asyncio.as_completed(pending):
                    yield await finished
            finally:
                for future in pending:
                    future.cancel()
    finally:
        ctx.timings["queue"] = handle.queue_seconds
        ctx.timings["model"] = handle.compute_seconds


async def _deliver(
    task: ImageInference, settings: Settings, generated: GeneratedImage, ctx: TaskContext
) -> ImageResult:
    with ctx.timed("encode"):
        data = await asyncio.to_thread(encode_image, generated.image, settings.output_format, settings.output_quality)
    extension = EXTENSIONS[settings.output_format]
    with ctx.timed("store"):
        stored = await ctx.services.store.put(data, extension=extension, owner=ctx.owner)
    result = ImageResult(taskType="imageInference", taskUUID=task.taskUUID, imageUUID=stored.uuid,
                         seed=generated.seed)
    if "URL" in settings.output_types:
        result.imageURL = image_url(ctx, stored.uuid, extension)
    if "base64Data" in settings.output_types or "dataURI" in settings.output_types:
        with ctx.timed("encode"):
            encoded = await asyncio.to_thread(to_base64, data)
        if "base64Data" in settings.output_types:
            result.imageBase64Data = encoded
        if "dataURI" in settings.output_types:
            result.imageDataURI = f"data:{CONTENT_TYPES[extension]};base64,{encoded}"
    if task.includeCost:
        result.cost = round(generated.seconds * ctx.services.config.price_per_gpu_second, 6)
    return result
