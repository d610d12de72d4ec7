"""imageCaption (``caption`` in the JavaScript SDK and the newer API): a captioning model describes an
image in words. ``prompt``, when given, is how the caption begins (BLIP's conditional captioning); the
official Python SDK sends it as a list of strings, which are joined.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagewire.air_registry import ModelEntry
from imagewire.tasks import inputs, tools
from imagewire.tasks.context import TaskContext
from imagewire.tasks.jobs import GeneratedText, Job
from imagewire.tasks.outputs import cost
from imagewire.tasks.schema import ImageCaption, TextResult
from imagewire.tasks.task_type import TaskType, name_of

if TYPE_CHECKING:
    from PIL.Image import Image

TASK = "imageCaption"
DEFAULT_MODEL = "default-captioner"


@dataclass(kw_only=True)
class CaptionJob(Job):
    model: ModelEntry
    weights: Path
    image: Image            # RGB
    prompt: str | None      # how the caption begins

    def batch_key(self) -> Hashable:
        """Captions by one model from one prompt are generated together, whatever the pictures."""
        return (self.model.air, self.prompt)


@dataclass(frozen=True)
class Prepared:
    task: ImageCaption
    model: ModelEntry
    image: str
    image_parameter: str
    prompt: str | None


def prepare(task: ImageCaption, ctx: TaskContext) -> Prepared:
    image, parameter = tools.input_image_field(task, purpose="caption")
    model = tools.model(ctx, task.model, default=DEFAULT_MODEL, task=TASK)
    prompt = " ".join(task.prompt) if isinstance(task.prompt, list) else task.prompt
    return Prepared(task=task, model=model, image=image, image_parameter=parameter,
                    prompt=prompt.strip() or None if prompt is not None else None)


async def run(prepared: Prepared, ctx: TaskContext) -> AsyncIterator[TextResult]:
    task = prepared.task
    weights = await inputs.weights(ctx, prepared.model)
    source = await tools.input_image(ctx, prepared.image, prepared.image_parameter)
    job = CaptionJob(task_uuid=task.taskUUID, owner=ctx.owner, model=prepared.model, weights=weights,
                     image=source.image, prompt=prepared.prompt)
    caption: GeneratedText
    async for caption in tools.results(ctx, job):
        yield TextResult(taskType=name_of(task), taskUUID=task.taskUUID, text=caption.text,
                         cost=cost(ctx, caption.seconds) if task.includeCost else None)


TASK_TYPE = TaskType(struct=ImageCaption, prepare=prepare, run=run, delivery=tools.delivery)
