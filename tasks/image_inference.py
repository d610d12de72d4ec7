"""imageInference: text-to-image, image-to-image from a seedImage, and the edits of ``tasks/editing.py``
(inpainting, outpainting, ControlNet) with the content checks of ``tasks/content_safety.py``.

The handler reads as the path of one task:

1. ``prepare``: resolve the model and check every parameter against it, without I/O;
2. ``run``: find the weights, decode the seed image (any of the four input forms), the mask and the
   guides, and settle the output size; compose the scene (``editing.compose``: the canvas, the mask,
   the guides) and check the inputs; queue the job on the device; and as chunks of images come back,
   paste each back into the canvas (``tasks/canvas.py``), check it, encode and store it concurrently
   with the others, and yield its result item as soon as it is ready.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from PIL import Image

from imagewire.air_registry import AIR, ARCHITECTURES, ModelDefaults, ModelEntry, SamplerSpec
from imagewire.storage import OUTPUT_FORMATS, ImageFormat, encode_image, to_base64
from imagewire.tasks import (
    acceleration,
    canvas,
    content_safety,
    editing,
    image_add_ons,
    inputs,
    ip_adapters,
    references,
    schema,
)
from imagewire.tasks.context import TaskContext
from imagewire.tasks.describe import describe_annotation, nearest_valid, stepped_range
from imagewire.tasks.errors import InvalidParameter, MissingParameter, UnsupportedParameter, describe_value
from imagewire.tasks.jobs import (
    GeneratedImage,
    ImageEncoding,
    InferenceJob,
    JobEvent,
    Queued,
    RunningJob,
    StoreOnDevice,
)
from imagewire.tasks.outputs import ImageOutput, deliver_image, image_output
from imagewire.tasks.schema import ImageInference, ImageResult, Progress
from imagewire.tasks.task_type import TaskType

BLANK_PROMPT = "__BLANK__"
# A seed the server draws stays below 2^53 (with room for numberResults counting up): JavaScript reads JSON
# numbers as doubles, and a larger seed would reach a browser rounded, naming another image.
DRAWN_SEED_LIMIT = 2**53 - 20   # numberResults is at most 20
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
    edits: editing.Edits = editing.NO_EDITS
    safety: content_safety.SafetyRequest = content_safety.NO_CHECKS
    add_ons: image_add_ons.AddOns = image_add_ons.AddOns()
    upload_endpoint: str | None = None
    ttl: int | None = None
    references: tuple[str, ...] = ()   # referenceImages (FLUX.1 Kontext), as sent
    cache: acceleration.CacheSettings | None = None  # acceleration, acceleratorOptions
    ip_adapters: tuple[ip_adapters.Chosen, ...] = ()


@dataclass(frozen=True)
class AwaitingDownload:
    """A request for a Civitai checkpoint this server has not fetched yet. Only the checkpoint tells
    its architecture, so the checks that need the model wait for it: ``run`` fetches it, then
    prepares the task as it would for any model in the catalog."""

    task: ImageInference
    air: AIR


# What the newer SDK sends in ``inputs``, each the same as the top-level field of its name.
INPUT_FIELDS = ("seedImage", "maskImage", "referenceImages")


def with_inputs_folded(task: ImageInference) -> ImageInference:
    """``task`` with ``inputs`` (the newer SDK's spelling of the input images) moved into the top-level fields;
    each picture may come either way, not as two different ones."""
    if task.inputs is None:
        return task
    given = task.inputs
    unknown = sorted(key for key in given if key not in INPUT_FIELDS)
    if unknown:
        raise UnsupportedParameter(
            f"inputs.{unknown[0]} is not supported by imageInference; inputs takes {', '.join(INPUT_FIELDS)}.",
            parameter=f"inputs.{unknown[0]}")
    folded: dict[str, Any] = {}
    for name, value in given.items():
        many = name == "referenceImages"
        if not (isinstance(value, list) and all(isinstance(each, str) for each in value) if many
                else isinstance(value, str)):
            raise InvalidParameter(
                f"Invalid inputs.{name}: expected {'an array of strings' if many else 'a string'} (images as UUIDs, "
                f"data URIs, base64 data or http(s) URLs); received {describe_value(value)}.",
                parameter=f"inputs.{name}", type="array" if many else "string")
        top = getattr(task, name)
        if top is not None and top != value:
            raise InvalidParameter(f"Send {name} once: as {name} or as inputs.{name}, not two different ones.",
                                   parameter=f"inputs.{name}", type="array" if many else "string")
        folded[name] = value
    return msgspec.structs.replace(task, inputs=None, **folded)


def prepare(task: ImageInference, ctx: TaskContext) -> Prepared | AwaitingDownload:
    """Every check that needs the model but no I/O. Raises a TaskError naming the parameter."""
    task = with_inputs_folded(task)
    download = inputs.model_to_download(ctx, task.model)
    if download is not None:
        content_safety.prepare(task, ctx)  # what can be checked before the model is known
        return AwaitingDownload(task, download)
    model = inputs.model(ctx, task.model, category="checkpoint")
    defaults = model.defaults
    edits = editing.prepare(task, model, ctx)
    safety = content_safety.prepare(task, ctx)
    reference_images = references.prepare(task, model)
    if task.seedImage is None and not reference_images:
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
    output = image_output(task, ctx)
    if output.upload_endpoint is not None and task.numberResults > 1:
        # One URL takes one body: each further image would replace the one before it there.
        raise InvalidParameter(
            f"uploadEndpoint takes one image: send numberResults 1 with it (received numberResults "
            f"{task.numberResults}), or one task per image, each with its own uploadEndpoint.",
            parameter="uploadEndpoint", type="string")
    steps = task.steps if task.steps is not None else defaults.steps
    if task.seedImage is not None and int(steps * task.strength) < 1:
        raise InvalidParameter(
            f"strength x steps must leave at least one denoising step; received strength {task.strength} "
            f"with steps {steps} ({steps * task.strength:.2f} steps). Use strength of at least "
            f"{1 / steps:.3g} or more steps.", parameter="strength", type="number")
    first_seed = task.seed if task.seed is not None else secrets.randbelow(DRAWN_SEED_LIMIT)
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
        output_types=output.types,
        output_format=output.format,
        output_quality=output.quality,
        edits=edits,
        safety=safety,
        add_ons=image_add_ons.prepare(task, model, steps, ctx),
        upload_endpoint=output.upload_endpoint,
        ttl=output.ttl,
        references=reference_images,
        cache=acceleration.prepare(task, model, steps),
        ip_adapters=ip_adapters.prepare(task, model, ctx),
    )


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
    task = prepared.task
    weights = await inputs.weights(ctx, prepared.model)
    add_ons, checker, loaded, adapters = await asyncio.gather(
        image_add_ons.job_fields(prepared.add_ons, ctx), content_safety.checker_weights(ctx, prepared.safety),
        editing.load(ctx, prepared.edits), ip_adapters.job_fields(prepared.ip_adapters, ctx))
    init_image = None
    width, height = task.width, task.height
    seed: list[tuple[str, Image.Image]] = []
    if prepared.references:
        # Kontext reads the seed image and the references as one picture, at its own proportions.
        with ctx.timed("decode"):
            seed = await references.pictures(ctx, task, prepared.references)
            first = seed[0][1]
            width, height = size_from_seed(task.width, first.width), size_from_seed(task.height, first.height)
            init_image = await references.conditioning(ctx, seed)
    elif task.seedImage is not None:
        with ctx.timed("decode"):
            init_image, width, height = await _seed_image(ctx, prepared)
            seed = [("seedImage", init_image)]
    assert width is not None and height is not None
    scene = await editing.compose(prepared.edits, loaded, task, init_image, width, height)
    # A flagged input fails the task before it costs any device time.
    await content_safety.check_inputs(ctx, prepared.safety, checker, task.taskUUID,
                                      seed + editing.named_guides(prepared.edits, loaded)
                                      + [(f"ipAdapters[{index}].guideImage", adapter.guide)
                                         for index, adapter in enumerate(adapters.get("ip_adapters", ()))])
    del seed  # the reference images as sent are not kept while the task waits: only what the job reads
    progress: RunningJob[GeneratedImage]
    if scene.nothing_to_do:  # an empty mask: the results are known without spending device time
        progress = canvas.unchanged(scene, prepared.seeds)
    else:
        encoding, store_on_device = _stored_as_made(prepared, scene, checker, ctx)
        job = InferenceJob(
            task_uuid=task.taskUUID, owner=ctx.owner, model=prepared.model, weights=weights, prompt=prepared.prompt,
            negative_prompt=prepared.negative_prompt, width=scene.width, height=scene.height, steps=prepared.steps,
            cfg_scale=prepared.cfg_scale, sampler=prepared.sampler, seeds=prepared.seeds,
            init_image=scene.init_image, strength=task.strength, mask_image=scene.mask_image,
            controlnets=scene.controlnets, guide_images=scene.guide_images,
            preview=task.includeProgress and task.includePreview, cache=prepared.cache,
            report_steps=task.includeProgress, encoding=encoding, store_on_device=store_on_device,
            **add_ons, **adapters)
        progress = ctx.services.device.submit(job, on_event=_ProgressReport(task, len(prepared.seeds), ctx).on_event)
    try:
        async for produced in progress:
            chunk = await canvas.paste_back_all(ctx, scene, produced)
            # Checked as delivered: an edit's result after its paste-back, so a flagged one is black throughout.
            chunk = await content_safety.check_results(ctx, prepared.safety, checker, task.taskUUID, chunk)
            pending = [asyncio.ensure_future(_deliver(prepared, image, ctx)) for image in chunk]
            try:
                for finished in asyncio.as_completed(pending):
                    yield await finished
            finally:
                for future in pending:
                    future.cancel()
    finally:
        progress.cancel()  # the task ended early (cancelled, failed): its job stops too
        ctx.timings["queue"] = progress.queue_seconds
        ctx.timings["model"] = progress.compute_seconds


async def _seed_image(ctx: TaskContext, prepared: Prepared) -> tuple[Image.Image, int, int]:
    """The seed image at the size it is used, and the output size. Only that is kept while the task
    waits: the image as sent (its bytes, its full-size pixels) is let go here."""
    task = prepared.task
    assert task.seedImage is not None
    # Outpainting scales the seed image to the area it keeps of the result (editing.compose).
    resize = prepared.edits.outpaint is None
    target = (task.width, task.height) if resize and task.width and task.height else None
    seed = await inputs.image(ctx, task.seedImage, parameter="seedImage", target=target)
    width, height = size_from_seed(task.width, seed.width), size_from_seed(task.height, seed.height)
    if not resize:
        return seed.image, width, height
    return await inputs.resized(ctx, seed, (width, height), parameter="seedImage"), width, height


class _ProgressReport:
    """Turns the job's queue positions and steps into progress items, for getResponse and, when the
    task asked (includeProgress), for the client."""

    def __init__(self, task: ImageInference, images: int, ctx: TaskContext) -> None:
        self.task = task
        self.ctx = ctx
        self.percent = [0] * images  # per result index

    def on_event(self, event: JobEvent) -> None:
        task = self.task
        if isinstance(event, Queued):
            items = [Progress(taskType="imageInference", taskUUID=task.taskUUID, progress=0, status="processing",
                              queuePosition=event.position)]
        else:
            percent = 100 * event.done // max(event.total, 1)
            items = []
            for index in event.indexes:
                self.percent[index] = percent
                preview = event.preview if index == event.indexes[0] else None
                items.append(Progress(
                    taskType="imageInference", taskUUID=task.taskUUID, progress=percent, status="processing",
                    resultIndex=index, step=event.done, steps=event.total,
                    preview=_preview_uri(preview) if preview is not None else None))
        self.ctx.progress(items, sum(self.percent) // len(self.percent), push=task.includeProgress)


def _stored_as_made(prepared: Prepared, scene: canvas.Scene, checker: Path | None,
                    ctx: TaskContext) -> tuple[ImageEncoding | None, StoreOnDevice | None]:
    """The job's ``encoding`` and ``store_on_device`` when the task's images are stored as the device makes them:
    none pasted back into a canvas, none checked for content (both need the pixels here)."""
    if canvas.pastes_back(scene) or (prepared.safety.check_content and checker is not None):
        return None, None
    output = _output(prepared)
    return output.encoding, output.store_on_device(ctx)


def _output(prepared: Prepared) -> ImageOutput:
    return ImageOutput(prepared.output_types, prepared.output_format, prepared.output_quality,
                       upload_endpoint=prepared.upload_endpoint, ttl=prepared.ttl)


def _preview_uri(picture: Image.Image) -> str:
    preview_format = OUTPUT_FORMATS["JPG"]
    data = encode_image(picture, preview_format, quality=70)
    return f"data:{preview_format.media_type};base64,{to_base64(data)}"


async def _deliver(prepared: Prepared, generated: GeneratedImage, ctx: TaskContext) -> ImageResult:
    task = prepared.task
    return await deliver_image(ctx, generated.image, _output(prepared), task_type="imageInference",
                               task_uuid=task.taskUUID, cost_seconds=generated.seconds if task.includeCost else None,
                               seed=generated.seed, NSFWContent=generated.nsfw)


TASK_TYPE = TaskType(struct=ImageInference, prepare=prepare, run=run)
