"""imageUpscale (``upscale`` in the JavaScript SDK and the newer API): a super-resolution model enlarges an
image by ``upscaleFactor`` (2 to 4).

1. ``prepare``: where the input image is, the model (the request's, else the default upscaler), the
   output settings;
2. ``run``: find the weights, decode the image, refuse a result larger than ``--max-output-megapixels``
   before any device work, keep an inline input under an image UUID (``inputImageUUID``), queue the
   job, then encode, store and answer the result like an inference image.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagewire.air_registry import ModelEntry
from imagewire.tasks import inputs, tools
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter
from imagewire.tasks.jobs import Job, ProcessedImage
from imagewire.tasks.outputs import ImageOutput, deliver_image, image_output
from imagewire.tasks.schema import ImageResult, ImageUpscale
from imagewire.tasks.task_type import TaskType, name_of

if TYPE_CHECKING:
    from PIL.Image import Image

TASK = "imageUpscale"
DEFAULT_MODEL = "default-upscaler"


@dataclass(kw_only=True)
class UpscaleJob(Job):
    model: ModelEntry
    weights: Path
    image: Image            # RGB
    width: int              # of the result: the input's size × upscaleFactor
    height: int
    tile_size: int          # the model sees tiles of at most this many input pixels a side

    def batch_key(self) -> Hashable:
        """Images of one size enlarged to one size by one model go through the network together."""
        return (self.model.air, self.image.size, self.width, self.height, self.tile_size)


@dataclass(frozen=True)
class Prepared:
    task: ImageUpscale
    model: ModelEntry
    image: str
    image_parameter: str
    output: ImageOutput


def prepare(task: ImageUpscale, ctx: TaskContext) -> Prepared:
    image, parameter = tools.input_image_field(task, purpose="upscale")
    model = tools.model(ctx, task.model, default=DEFAULT_MODEL, task=TASK)
    return Prepared(task=task, model=model, image=image, image_parameter=parameter, output=image_output(task, ctx))


def result_size(width: int, height: int, factor: float) -> tuple[int, int]:
    return max(1, round(width * factor)), max(1, round(height * factor))


def check_result_size(width: int, height: int, factor: float, max_pixels: int) -> None:
    """Refuse an upscale whose result would have more than ``max_pixels`` pixels, naming what would fit."""
    out_width, out_height = result_size(width, height, factor)
    if out_width * out_height <= max_pixels:
        return
    largest = (max_pixels / (width * height)) ** 0.5
    advice = (f"use an upscaleFactor of at most {int(largest * 100) / 100:g} or a smaller image" if largest >= 2
              else "use a smaller image")
    raise InvalidParameter(
        f"upscaleFactor {factor:g} would make the {width}x{height} input image {out_width}x{out_height} = "
        f"{out_width * out_height} pixels, more than the {max_pixels} this server makes; {advice}.",
        parameter="upscaleFactor", type="number")


async def run(prepared: Prepared, ctx: TaskContext) -> AsyncIterator[ImageResult]:
    task, settings = prepared.task, ctx.services.settings
    weights = await inputs.weights(ctx, prepared.model)
    source = await tools.input_image(ctx, prepared.image, prepared.image_parameter)
    check_result_size(source.width, source.height, task.upscaleFactor, settings.max_output_pixels)
    source_uuid = await tools.input_image_uuid(ctx, prepared.image, source)
    width, height = result_size(source.width, source.height, task.upscaleFactor)
    job = UpscaleJob(task_uuid=task.taskUUID, owner=ctx.owner, model=prepared.model, weights=weights,
                     image=source.image, width=width, height=height, tile_size=settings.upscale_tile_size,
                     # The result is stored as it comes: encoded, and stored too, where it is made.
                     encoding=prepared.output.encoding, store_on_device=prepared.output.store_on_device(ctx))
    processed: ProcessedImage
    async for processed in tools.results(ctx, job):
        yield await deliver_image(
            ctx, processed.image, prepared.output, task_type=name_of(task), task_uuid=task.taskUUID,
            cost_seconds=processed.seconds if task.includeCost else None, inputImageUUID=source_uuid)


TASK_TYPE = TaskType(struct=ImageUpscale, prepare=prepare, run=run, delivery=tools.delivery)
