"""The canvas of an edit in imageInference: the picture the generated ones are pasted back into, and
the geometry of getting there. Image operations only; what a request may ask is checked in
``tasks/editing.py``, which builds the ``Scene`` from these parts.

- ``outpainted``: the seed image on a larger area, the new part filled by extending its edge pixels,
  and the mask of that part.
- ``blend_weights`` and ``crop_box``: how much of the generated picture each canvas pixel takes, and
  with ``maskMargin`` the box around the mask that the pipeline repaints at full size.
- ``paste_back``: each generated picture into the canvas through the mask. Where the mask is black the
  canvas comes back as it was, pixel for pixel; the generated picture shows where it is white, blended
  with the canvas over ``EDGE_PIXELS`` inside the mask's edge, and gray mask values mix the two in
  proportion.
- ``unchanged``: a mask without a white or gray pixel leaves nothing to repaint; the canvas is every
  result, and the device is not used.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from imagewire.tasks.context import TaskContext
from imagewire.tasks.jobs import ControlNetUse, GeneratedImage, RunningJob, pixels

# Generated pixels are blended with the canvas over this many pixels inside the mask's edge.
EDGE_PIXELS = 4


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


def outpainted(seed: Image.Image, kept: tuple[int, int], sides: tuple[int, int, int, int],
               blur: int) -> tuple[Image.Image, Image.Image]:
    """The seed image, at the ``kept`` size, extended by ``sides`` (top, right, bottom, left) pixels of its
    own edges, and the mask of the extension."""
    top, right, bottom, left = sides
    if seed.size != kept:
        seed = seed.resize(kept, Image.Resampling.LANCZOS)
    pixels = np.pad(np.asarray(seed.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    height, width = pixels.shape[:2]
    mask = np.full((height, width), 255, dtype=np.uint8)
    mask[top : top + kept[1], left : left + kept[0]] = 0
    picture = Image.fromarray(mask)
    if blur:
        # The boundary as a gradient: kept pixels closer than blur to the new area are partly repainted,
        # from almost all at the boundary to none at blur pixels from it.
        from scipy import ndimage  # imported on first use: it is a quarter of the server's start time

        distance = ndimage.distance_transform_edt(mask == 0)
        ramp = np.clip(1 - (distance - 1) / blur, 0, 1) * 255
        picture = Image.fromarray(np.maximum(mask, ramp).astype(np.uint8))
    return Image.fromarray(pixels), picture


def blend_weights(mask: Image.Image) -> Image.Image:
    """Per pixel, how much of the generated picture a result takes: the mask's value, falling off to 0
    over ``EDGE_PIXELS`` inside its edge, and exactly 0 wherever the mask is 0."""
    from scipy import ndimage  # imported on first use: it is a quarter of the server's start time

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


def pastes_back(scene: Scene) -> bool:
    """Whether the device's pictures are pasted back into a canvas before they are results."""
    return scene.canvas is not None and scene.alpha is not None and not scene.nothing_to_do


async def paste_back_all(ctx: TaskContext, scene: Scene, chunk: Sequence[GeneratedImage]) -> list[GeneratedImage]:
    """The chunk's pictures pasted back into the canvas (in a thread); as they came without one."""
    if not pastes_back(scene):
        return list(chunk)
    with ctx.timed("paste"):
        pictures = await asyncio.to_thread(lambda: [paste_back(scene, pixels(g.image)) for g in chunk])
    return [GeneratedImage(g.index, g.seed, picture, g.seconds, g.nsfw)
            for g, picture in zip(chunk, pictures, strict=True)]


def unchanged(scene: Scene, seeds: Sequence[int]) -> RunningJob[GeneratedImage]:
    """The results of a scene with nothing to repaint: the canvas once per seed, without the device."""
    assert scene.nothing_to_do and scene.canvas is not None
    return _Unchanged([GeneratedImage(index, seed, scene.canvas, 0.0) for index, seed in enumerate(seeds)])


class _Unchanged:
    def __init__(self, images: list[GeneratedImage]) -> None:
        self.images = images
        self.queue_seconds = 0.0
        self.compute_seconds = 0.0

    async def __aiter__(self) -> AsyncIterator[Sequence[GeneratedImage]]:
        yield self.images

    def cancel(self) -> None:
        """Nothing runs on the device: nothing to stop."""
