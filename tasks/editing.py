"""Editing in imageInference: inpainting (``maskImage``, ``maskMargin``), outpainting (``outpaint``) and
ControlNet (``controlNet``), in the three steps of the handler.

1. ``prepare`` (no I/O): every value checked against the model and the steps.
2. ``load`` and ``compose`` (I/O, threads): the mask and guide images decoded through ``tasks/inputs``
   (all four input forms, errors naming the parameter); the canvas built (outpainting extends the seed
   image by its edge pixels), the mask brought to its size, and with ``maskMargin`` the region around
   the mask cropped and scaled up to the full ``width`` × ``height``.
3. ``finish``: each generated picture pasted back into the canvas through the mask. Where the mask is
   black the canvas comes back as it was, pixel for pixel; the generated picture shows where it is
   white, blended with the canvas over ``EDGE_PIXELS`` inside the mask's edge, and gray mask values
   mix the two in proportion.

A mask of another size than the canvas is scaled to it. A mask without a white or gray pixel leaves
nothing to repaint: the results are the canvas itself, and the device is not used (``nothing_to_do``).
A mask that is white everywhere repaints the whole picture (image-to-image with the inpainting
pipeline). Transparent mask pixels count as white (inputs are flattened onto white).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
from PIL import Image
from scipy import ndimage

from imagewire.air_registry import ARCHITECTURES, ModelEntry
from imagewire.tasks import content_safety, guides, inputs, schema
from imagewire.tasks.content_safety import SafetyRequest
from imagewire.tasks.context import TaskContext
from imagewire.tasks.controlnet_preprocess import check_preprocessor, check_thresholds
from imagewire.tasks.describe import nearest_valid, stepped_range
from imagewire.tasks.errors import InvalidParameter, MissingParameter, UnsupportedParameter
from imagewire.tasks.jobs import ControlNetUse, GeneratedImage, InferenceJob, JobEvent, RunningJob

# Generated pixels are blended with the canvas over this many pixels inside the mask's edge.
EDGE_PIXELS = 4
_SIZE = stepped_range(msgspec.inspect.type_info(schema.Width))
_MIN_KEPT = 64  # outpainting keeps at least this much of the seed image on each axis
DEFAULT_CONTROL_MODE = "balanced"


@dataclass(frozen=True)
class ControlNetRequest:
    parameter: str                     # controlNet[i], for messages
    model: ModelEntry
    guide: str                         # guideImage as sent
    weight: float
    start: float                       # fractions of the denoising steps
    end: float
    mode: str
    preprocessor: guides.Preprocess | None
    options: guides.GuideOptions


@dataclass(frozen=True)
class Edits:
    mask: str | None = None
    mask_margin: int | None = None
    outpaint: schema.Outpaint | None = None
    controlnets: tuple[ControlNetRequest, ...] = ()
    safety: SafetyRequest = content_safety.NO_CHECKS

    @property
    def repaints(self) -> bool:
        return self.mask is not None or self.outpaint is not None


NO_EDITS = Edits()


def prepare(task: schema.ImageInference, model: ModelEntry, ctx: TaskContext) -> Edits:
    """Check the editing parameters against the model; no I/O."""
    architecture = ARCHITECTURES[model.architecture]
    if model.category != "checkpoint":
        raise InvalidParameter(
            f"model {model.air} is a {model.category} model, not a checkpoint"
            + ("; name it in controlNet[].model" if model.category == "controlnet" else "") + ".",
            parameter="model", type="string")
    outpaint = task.outpaint
    if outpaint is not None and not any((outpaint.top, outpaint.right, outpaint.bottom, outpaint.left)):
        outpaint = None  # nothing added: no outpainting
    for name, value in (("maskImage", task.maskImage), ("outpaint", outpaint)):
        if value is not None and task.seedImage is None:
            raise MissingParameter(f"{name} repaints part of a seedImage: send the seedImage with it.",
                                   parameter="seedImage", type="string")
    if task.maskImage is not None and outpaint is not None:
        raise InvalidParameter("outpaint makes its own mask (the added area): send maskImage or outpaint, not both.",
                               parameter="outpaint", type="object")
    if task.maskMargin is not None and task.maskImage is None and outpaint is None:
        raise InvalidParameter("maskMargin sets the context around the maskImage's area: send a maskImage with it.",
                               parameter="maskMargin", type="integer")
    if not architecture.masks:
        for name, value in (("maskImage", task.maskImage), ("outpaint", outpaint)):
            if value is not None:
                raise UnsupportedParameter(
                    f"{name} is not supported by model {model.air} ({architecture.name}): it cannot repaint part "
                    f"of an image. Architectures that can: {', '.join(_able('masks'))}.",
                    parameter=name, type="string" if name == "maskImage" else "object")
    if task.controlNet and not architecture.controlnets:
        raise UnsupportedParameter(
            f"controlNet is not supported by model {model.air} ({architecture.name}): no ControlNet runs with "
            f"{architecture.name} models here. Architectures that take ControlNets: {', '.join(_able('controlnets'))}.",
            parameter="controlNet[0].model", type="string")
    if architecture.inpainting_only and task.seedImage is not None and task.maskImage is None and outpaint is None:
        raise MissingParameter(
            f"model {model.air} is an inpainting model: send a maskImage (white = repaint) or outpaint with the "
            "seedImage.", parameter="maskImage", type="string")
    if architecture.inpainting_only and task.seedImage is None:
        raise MissingParameter(
            f"model {model.air} is an inpainting model: send a seedImage with a maskImage or outpaint.",
            parameter="seedImage", type="string")
    steps = task.steps if task.steps is not None else model.defaults.steps
    controlnets = tuple(_controlnet(ctx, index, control, model, steps)
                        for index, control in enumerate(task.controlNet or ()))
    return Edits(mask=task.maskImage, mask_margin=task.maskMargin, outpaint=outpaint, controlnets=controlnets,
                 safety=content_safety.prepare(task, ctx))


def _able(feature: str) -> list[str]:
    """The image model architectures whose ``feature`` flag (``masks``, ``controlnets``) is set."""
    return [name for name, architecture in ARCHITECTURES.items()
            if architecture.task == "imageInference" and getattr(architecture, feature)]


def _controlnet(ctx: TaskContext, index: int, control: schema.ControlNet, model: ModelEntry,
                steps: int) -> ControlNetRequest:
    at = f"controlNet[{index}]"
    entry = inputs.model(ctx, control.model, parameter=f"{at}.model")
    if entry.category != "controlnet":
        raise InvalidParameter(f"{at}.model {entry.air} is a {entry.category} model, not a ControlNet.",
                               parameter=f"{at}.model", type="string")
    fits, wanted = ARCHITECTURES[entry.architecture].compatible, ARCHITECTURES[model.architecture].compatible
    if fits != wanted:
        raise InvalidParameter(
            f"{at}.model {entry.air} is a ControlNet for {fits} models; model {model.air} is {wanted}.",
            parameter=f"{at}.model", type="string")
    start = _fraction(at, "start", control.startStep, control.startStepPercentage, steps, default=0.0)
    end = _fraction(at, "end", control.endStep, control.endStepPercentage, steps, default=1.0)
    if end <= start:
        name = f"{at}.endStep" if control.endStep is not None else f"{at}.endStepPercentage"
        raise InvalidParameter(
            f"{name} must come after the start: received a start at {start:.0%} and an end at {end:.0%} of the steps.",
            parameter=name, type="integer")
    preprocessor = None
    options = guides.GuideOptions()
    if control.preprocessor is not None:
        preprocessor = check_preprocessor(control.preprocessor, parameter=f"{at}.preprocessor")
        options = check_thresholds(
            control.lowThresholdCanny if control.lowThresholdCanny is not None else options.low_threshold,
            control.highThresholdCanny if control.highThresholdCanny is not None else options.high_threshold,
            prefix=f"{at}.")
    return ControlNetRequest(
        parameter=at, model=entry, guide=control.guideImage,
        weight=control.weight if control.weight is not None else 1.0, start=start, end=end,
        mode=control.controlMode or DEFAULT_CONTROL_MODE, preprocessor=preprocessor, options=options)


def _fraction(at: str, which: str, step: int | None, percentage: int | None, steps: int, *, default: float) -> float:
    """Where a ControlNet starts or ends, as a fraction of the steps: ``startStep`` 1 is the first step."""
    if step is not None and percentage is not None:
        raise InvalidParameter(f"{at}.{which}Step and {at}.{which}StepPercentage: send one of them, not both.",
                               parameter=f"{at}.{which}StepPercentage", type="integer")
    if step is not None:
        if step > steps:
            raise InvalidParameter(f"Invalid {at}.{which}Step: must be from 1 to steps ({steps}); received {step}.",
                                   parameter=f"{at}.{which}Step", type="integer")
        return (step - 1) / steps if which == "start" else step / steps
    if percentage is not None:
        return percentage / 100
    return default


# ---------------------------------------------------------------- I/O: decoding the inputs


@dataclass
class Loaded:
    """The decoded inputs of the edits, before the canvas is known."""

    mask: Image.Image | None = None
    guides: list[Image.Image] = field(default_factory=list)
    controlnet_weights: list[Path] = field(default_factory=list)
    checker_weights: Path | None = None


async def load(ctx: TaskContext, edits: Edits) -> Loaded:
    loaded = Loaded(checker_weights=await content_safety.checker_weights(ctx, edits.safety))
    for control in edits.controlnets:
        path = await inputs.weights(ctx, control.model, parameter=f"{control.parameter}.model")
        loaded.controlnet_weights.append(path)
    with ctx.timed("decode"):
        if edits.mask is not None:
            loaded.mask = (await inputs.image(ctx, edits.mask, parameter="maskImage")).image
        for control in edits.controlnets:
            guide = (await inputs.image(ctx, control.guide, parameter=f"{control.parameter}.guideImage")).image
            if control.preprocessor is not None:
                guide = await asyncio.to_thread(control.preprocessor, guide, control.options)
            loaded.guides.append(guide)
    return loaded


# ---------------------------------------------------------------- the canvas


@dataclass
class Scene:
    """What the pipeline gets, and how its pictures go back into the canvas."""

    width: int                               # of the pipeline call, and of the results
    height: int
    init_image: Image.Image | None
    mask_image: Image.Image | None = None    # "L", width × height (the crop's, scaled, with maskMargin)
    canvas: Image.Image | None = None        # the full picture results are pasted into
    alpha: Image.Image | None = None         # "L" over the canvas: 255 takes the generated picture
    crop: tuple[int, int, int, int] | None = None   # the canvas box repainted at full size (maskMargin)
    nothing_to_do: bool = False              # an empty mask: the canvas is the result
    controlnets: tuple[ControlNetUse, ...] = ()
    guide_images: tuple[Image.Image, ...] = ()


async def compose(ctx: TaskContext, edits: Edits, loaded: Loaded, task: schema.ImageInference,
                  init_image: Image.Image | None, width: int, height: int) -> Scene:
    """The scene of one request: ``init_image`` is the seed image at width × height, or, when outpainting,
    as decoded (it is scaled to the area it keeps)."""
    scene = await asyncio.to_thread(_compose, edits, loaded, task, init_image, width, height)
    named = [("seedImage", init_image)] if init_image is not None else []
    named += [(f"{control.parameter}.guideImage", guide)
              for control, guide in zip(edits.controlnets, loaded.guides, strict=True)]
    await content_safety.check_inputs(ctx, edits.safety, loaded.checker_weights, task.taskUUID,
                                      [(name, picture) for name, picture in named if picture is not None])
    return scene


def _compose(edits: Edits, loaded: Loaded, task: schema.ImageInference, init_image: Image.Image | None,
             width: int, height: int) -> Scene:
    scene = Scene(width=width, height=height, init_image=init_image)
    if edits.outpaint is not None:
        assert init_image is not None
        scene.canvas, mask = _outpaint_canvas(edits.outpaint, init_image, task.width, task.height, width, height)
        scene.width, scene.height = scene.canvas.size
    elif loaded.mask is not None:
        assert init_image is not None
        scene.canvas = init_image
        mask = loaded.mask.convert("L")
        if mask.size != init_image.size:
            mask = mask.resize(init_image.size, Image.Resampling.BILINEAR)
    else:
        mask = None
    guides_full = [guide if guide.size == (scene.width, scene.height)
                   else guide.resize((scene.width, scene.height), Image.Resampling.LANCZOS) for guide in loaded.guides]
    if mask is not None:
        assert scene.canvas is not None
        scene.alpha = blend_weights(mask)
        if mask.getextrema()[1] == 0:
            scene.nothing_to_do = True
        scene.init_image, scene.mask_image = scene.canvas, mask
        if edits.mask_margin is not None and not scene.nothing_to_do:
            scene.crop = crop_box(mask, edits.mask_margin, (scene.width, scene.height))
            if scene.crop == (0, 0, scene.width, scene.height):
                scene.crop = None
        if scene.crop is not None:
            size = (scene.width, scene.height)
            scene.init_image = scene.canvas.crop(scene.crop).resize(size, Image.Resampling.LANCZOS)
            scene.mask_image = mask.crop(scene.crop).resize(size, Image.Resampling.BILINEAR)
            guides_full = [guide.crop(scene.crop).resize(size, Image.Resampling.LANCZOS) for guide in guides_full]
    scene.controlnets = tuple(
        ControlNetUse(model=control.model, weights=path, weight=control.weight, start=control.start, end=control.end,
                      mode=control.mode)
        for control, path in zip(edits.controlnets, loaded.controlnet_weights, strict=True))
    scene.guide_images = tuple(guides_full)
    return scene


def _outpaint_canvas(outpaint: schema.Outpaint, seed: Image.Image, asked_width: int | None,
                     asked_height: int | None, width: int, height: int) -> tuple[Image.Image, Image.Image]:
    """The seed image on a larger canvas, the new area filled by extending its edge pixels, and the mask."""
    top, right, bottom, left = (outpaint.top or 0, outpaint.right or 0, outpaint.bottom or 0, outpaint.left or 0)
    # width and height are the result's size when sent; otherwise the seed image's, plus the extensions.
    canvas_width = asked_width if asked_width is not None else width + left + right
    canvas_height = asked_height if asked_height is not None else height + top + bottom
    for name, size, code in (("width", canvas_width, "invalidWidth"), ("height", canvas_height, "invalidHeight")):
        assert _SIZE is not None
        if size > (_SIZE.le or size):
            nearest = nearest_valid(_SIZE, size)
            raise InvalidParameter(
                f"Invalid {name}: the seed image's {name} plus the outpaint extensions is {size}, more than "
                f"{_SIZE.le}; send {name} (the result's size) or smaller extensions.", parameter=name,
                type="integer", allowed_values=nearest, code=code)
    kept = (canvas_width - left - right, canvas_height - top - bottom)
    if min(kept) < _MIN_KEPT:
        raise InvalidParameter(
            f"outpaint extensions ({top} top, {right} right, {bottom} bottom, {left} left) leave "
            f"{kept[0]}×{kept[1]} of a {canvas_width}×{canvas_height} result for the seed image; at least "
            f"{_MIN_KEPT} pixels a side must remain. width and height are the size of the result, extensions "
            "included.", parameter="outpaint", type="object")
    if seed.size != kept:
        seed = seed.resize(kept, Image.Resampling.LANCZOS)
    pixels = np.pad(np.asarray(seed.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full((canvas_height, canvas_width), 255, dtype=np.uint8)
    mask[top : top + kept[1], left : left + kept[0]] = 0
    picture = Image.fromarray(mask)
    if outpaint.blur:
        # The boundary as a gradient: kept pixels closer than blur to the new area are partly repainted,
        # from almost all at the boundary to none at blur pixels from it.
        distance = ndimage.distance_transform_edt(mask == 0)
        ramp = np.clip(1 - (distance - 1) / outpaint.blur, 0, 1) * 255
        picture = Image.fromarray(np.maximum(mask, ramp).astype(np.uint8))
    return Image.fromarray(pixels), picture


def blend_weights(mask: Image.Image) -> Image.Image:
    """Per pixel, how much of the generated picture a result takes: the mask's value, falling off to 0
    over ``EDGE_PIXELS`` inside its edge, and exactly 0 wherever the mask is 0."""
    values = np.asarray(mask, dtype=np.float32) / 255
    spread = ndimage.uniform_filter(values, size=2 * EDGE_PIXELS + 1, mode="nearest")
    return Image.fromarray(np.round(np.minimum(values, spread) * 255).astype(np.uint8))


def crop_box(mask: Image.Image, margin: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box around the mask's area plus ``margin``, grown to the result's aspect ratio, inside the canvas."""
    rows, columns = np.nonzero(np.asarray(mask))
    left, top = int(columns.min()) - margin, int(rows.min()) - margin
    right, bottom = int(columns.max()) + 1 + margin, int(rows.max()) + 1 + margin
    width, height = size
    box_width, box_height = right - left, bottom - top
    if box_width * height < box_height * width:
        box_width = min(width, round(box_height * width / height))
    else:
        box_height = min(height, round(box_width * height / width))
    box_width, box_height = min(box_width, width), min(box_height, height)
    centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
    left = int(min(max(round(centre_x - box_width / 2), 0), width - box_width))
    top = int(min(max(round(centre_y - box_height / 2), 0), height - box_height))
    return left, top, left + box_width, top + box_height


# ---------------------------------------------------------------- the device, and back


def submit(ctx: TaskContext, scene: Scene, job: InferenceJob,
           on_event: Callable[[JobEvent], None] | None = None) -> RunningJob[GeneratedImage]:
    """Queue the job (``on_event`` hears of its queue position and steps), unless the mask leaves nothing
    to repaint: then the canvas is every result."""
    if scene.nothing_to_do:
        assert scene.canvas is not None
        return _Unchanged([GeneratedImage(index, seed, scene.canvas, 0.0) for index, seed in enumerate(job.seeds)])
    progress: RunningJob[GeneratedImage] = ctx.services.device.submit(job, on_event=on_event)
    return progress


class _Unchanged:
    def __init__(self, images: list[GeneratedImage]) -> None:
        self.images = images
        self.queue_seconds = 0.0
        self.compute_seconds = 0.0

    async def __aiter__(self) -> AsyncIterator[Sequence[GeneratedImage]]:
        yield self.images

    def cancel(self) -> None:
        """Nothing runs on the device: nothing to stop."""


async def finish(ctx: TaskContext, edits: Edits, loaded: Loaded, scene: Scene, task_uuid: str,
                 chunk: Sequence[GeneratedImage]) -> list[GeneratedImage]:
    """The results: pictures pasted back into the canvas, then checked for unwanted content."""
    if scene.canvas is not None and scene.alpha is not None and not scene.nothing_to_do:
        with ctx.timed("paste"):
            pictures = await asyncio.to_thread(lambda: [paste_back(scene, g.image) for g in chunk])
        chunk = [GeneratedImage(g.index, g.seed, picture, g.seconds, g.nsfw)
                 for g, picture in zip(chunk, pictures, strict=True)]
    return await content_safety.check_results(ctx, edits.safety, loaded.checker_weights, task_uuid, chunk)


def paste_back(scene: Scene, generated: Image.Image) -> Image.Image:
    assert scene.canvas is not None and scene.alpha is not None
    canvas = scene.canvas.convert("RGB")
    if scene.crop is None:
        return Image.composite(generated.convert("RGB"), canvas, scene.alpha)
    left, top, right, bottom = scene.crop
    region = generated.convert("RGB").resize((right - left, bottom - top), Image.Resampling.LANCZOS)
    result = canvas.copy()
    result.paste(Image.composite(region, canvas.crop(scene.crop), scene.alpha.crop(scene.crop)), (left, top))
    return result
