"""imageBackgroundRemoval (``removeBackground`` in the JavaScript SDK and the newer API): a segmentation
model finds the subject, and the answer is the subject with the background made transparent (or the
colour ``settings.rgba`` names), or the mask alone (``settings.returnOnlyMask``).

The device computes the mask; the clean-up, matting and composition (``tasks/matting.py``) run in a
thread of the handler, so the device goes on with the next job meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagewire.air_registry import ModelEntry
from imagewire.tasks import inputs, tools
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter
from imagewire.tasks.jobs import Job, ProcessedImage, pixels
from imagewire.tasks.matting import MattingSettings, compose
from imagewire.tasks.outputs import ImageOutput, deliver_image, image_output
from imagewire.tasks.schema import BackgroundRemovalSettings, ImageBackgroundRemoval, ImageResult
from imagewire.tasks.task_type import TaskType, name_of

if TYPE_CHECKING:
    from PIL.Image import Image

TASK = "imageBackgroundRemoval"
DEFAULT_MODEL = "default-background-remover"
# Output formats whose pictures keep an alpha channel; JPG results show the background colour instead.
ALPHA_FORMATS = frozenset({"PNG", "WEBP"})

# Wire name → MattingSettings field
_SETTINGS = {
    "rgba": "rgba", "postProcessMask": "post_process_mask", "returnOnlyMask": "return_only_mask",
    "alphaMatting": "alpha_matting", "alphaMattingForegroundThreshold": "foreground_threshold",
    "alphaMattingBackgroundThreshold": "background_threshold", "alphaMattingErodeSize": "erode_size",
}
assert set(_SETTINGS) == set(BackgroundRemovalSettings.__struct_fields__)


@dataclass(kw_only=True)
class BackgroundRemovalJob(Job):
    """The device's part: the subject's mask, at the input's size."""

    model: ModelEntry
    weights: Path
    image: Image   # RGB

    def batch_key(self) -> Hashable:
        """A segmentation model sees every picture at its own input size: any pictures batch together."""
        return self.model.air


@dataclass(frozen=True)
class Prepared:
    task: ImageBackgroundRemoval
    model: ModelEntry
    image: str
    image_parameter: str
    output: ImageOutput
    settings: MattingSettings


def matting_settings(task: ImageBackgroundRemoval) -> MattingSettings:
    """``settings``, merged with the same fields at the top level (where the Python SDK puts them)."""
    chosen: dict[str, Any] = {}
    for wire_name, attribute in _SETTINGS.items():
        top = getattr(task, wire_name)
        nested = getattr(task.settings, wire_name) if task.settings is not None else None
        if top is not None and nested is not None and top != nested:
            raise InvalidParameter(
                f"{wire_name} and settings.{wire_name} disagree ({top!r} and {nested!r}); send it once.",
                parameter=f"settings.{wire_name}")
        value = nested if nested is not None else top
        if value is not None:
            chosen[attribute] = tuple(value) if wire_name == "rgba" else value
    settings = MattingSettings(**chosen)
    if settings.alpha_matting and settings.background_threshold >= settings.foreground_threshold:
        raise InvalidParameter(
            f"settings.alphaMattingBackgroundThreshold ({settings.background_threshold}) must be below "
            f"settings.alphaMattingForegroundThreshold ({settings.foreground_threshold}).",
            parameter="settings.alphaMattingBackgroundThreshold", type="integer")
    return settings


def prepare(task: ImageBackgroundRemoval, ctx: TaskContext) -> Prepared:
    image, parameter = tools.input_image_field(task, purpose="cut out")
    model = tools.model(ctx, task.model, default=DEFAULT_MODEL, task=TASK)
    return Prepared(task=task, model=model, image=image, image_parameter=parameter, output=image_output(task, ctx),
                    settings=matting_settings(task))


async def run(prepared: Prepared, ctx: TaskContext) -> AsyncIterator[ImageResult]:
    task = prepared.task
    weights = await inputs.weights(ctx, prepared.model)
    source = await tools.input_image(ctx, prepared.image, prepared.image_parameter)
    source_uuid = await tools.input_image_uuid(ctx, prepared.image, source)
    job = BackgroundRemovalJob(task_uuid=task.taskUUID, owner=ctx.owner, model=prepared.model, weights=weights,
                               image=source.image)
    keeps_alpha = prepared.output.format.name in ALPHA_FORMATS
    mask: ProcessedImage
    async for mask in tools.results(ctx, job):
        with ctx.timed("matting"):
            picture = await asyncio.to_thread(compose, source.image, pixels(mask.image), prepared.settings,
                                              keeps_alpha=keeps_alpha)
        yield await deliver_image(
            ctx, picture, prepared.output, task_type=name_of(task), task_uuid=task.taskUUID,
            cost_seconds=mask.seconds if task.includeCost else None, inputImageUUID=source_uuid)


TASK_TYPE = TaskType(struct=ImageBackgroundRemoval, prepare=prepare, run=run, delivery=tools.delivery)
