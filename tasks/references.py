"""referenceImages: the pictures FLUX.1 Kontext reads beside the prompt (the public API's way to give it its input
images: "the same person as a chef", "this jacket on that model").

The public API's compatibility table allows FLUX.1 Kontext 2 images and Ace++ 1 (not run here); every other
architecture answers ``unsupportedParameter``. Each image comes in any of the four input forms.

Kontext reads one conditioning image. Several pictures are given to it as the published Kontext workflows do:
side by side in one image, each scaled to the same height so that none is distorted; a seedImage sent with them
comes first. The strip keeps its own proportions (Kontext's pipeline scales it to the trained resolution of the
nearest aspect ratio); the result's size is the request's, or the first picture's.
"""

from __future__ import annotations

import asyncio
import math

from PIL import Image

from imagewire.air_registry import ARCHITECTURES, ModelEntry
from imagewire.tasks import inputs, schema
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter, UnsupportedParameter

PARAMETER = "referenceImages"
# The most reference images each family takes (the public API's table: FLUX.1 Kontext, 2).
MOST: dict[str, int] = {"flux-kontext": 2}
# Kontext's largest trained resolutions are about a megapixel: a strip larger than twice that only costs memory.
MAX_STRIP_PIXELS = 2 * 1024 * 1024


def takers() -> list[str]:
    """The architectures that take referenceImages."""
    return [name for name, architecture in ARCHITECTURES.items() if architecture.family in MOST]


def prepare(task: schema.ImageInference, model: ModelEntry) -> tuple[str, ...]:
    """The reference images a request sends, checked against its model; () for none."""
    references = tuple(task.referenceImages or ())
    if not references:
        return ()
    architecture = ARCHITECTURES[model.architecture]
    most = MOST.get(architecture.family)
    if most is None:
        raise UnsupportedParameter(
            f"referenceImages is not supported by model {model.air} ({architecture.name}). Architectures that take "
            f"referenceImages: {', '.join(takers())} (FLUX.1 Kontext, up to {MOST['flux-kontext']} images).",
            parameter=PARAMETER, type="array", allowed_values=takers())
    if len(references) > most:
        raise InvalidParameter(
            f"referenceImages takes at most {most} images with model {model.air} ({architecture.name}), so "
            f"{PARAMETER}[{most}] is one too many; received {len(references)}.",
            parameter=f"{PARAMETER}[{most}]", type="string")
    return references


async def pictures(ctx: TaskContext, task: schema.ImageInference,
                   references: tuple[str, ...]) -> list[tuple[str, Image.Image]]:
    """The seed image (when sent) and each reference, decoded, named by their parameters."""
    named = ([("seedImage", task.seedImage)] if task.seedImage is not None else []) + [
        (f"{PARAMETER}[{index}]", value) for index, value in enumerate(references)]
    decoded = await asyncio.gather(*(inputs.image(ctx, value, parameter=name) for name, value in named))
    return [(name, picture.image) for (name, _), picture in zip(named, decoded, strict=True)]


async def conditioning(ctx: TaskContext, named: list[tuple[str, Image.Image]]) -> Image.Image:
    """The one image Kontext reads: the pictures side by side at one height, counted against the pixel budget in
    place of the pictures themselves."""
    strip = await asyncio.to_thread(stitch, [picture for _, picture in named])
    ctx.let_go_of_pixels(sum(picture.width * picture.height for _, picture in named))
    ctx.hold_pixels(strip.width * strip.height, parameter=named[0][0])
    return strip


def stitch(pictures: list[Image.Image]) -> Image.Image:
    """``pictures`` left to right, each scaled to the smallest one's height (none is enlarged), the whole at
    most MAX_STRIP_PIXELS."""
    height = min(picture.height for picture in pictures)
    widths = [max(1, round(picture.width * height / picture.height)) for picture in pictures]
    scale = min(1.0, math.sqrt(MAX_STRIP_PIXELS / (sum(widths) * height)))
    height = max(1, round(height * scale))
    widths = [max(1, round(width * scale)) for width in widths]
    if len(pictures) == 1 and (widths[0], height) == pictures[0].size:
        return pictures[0].convert("RGB")
    strip = Image.new("RGB", (sum(widths), height))
    left = 0
    for picture, width in zip(pictures, widths, strict=True):
        strip.paste(picture.convert("RGB").resize((width, height), Image.Resampling.LANCZOS), (left, 0))
        left += width
    return strip
