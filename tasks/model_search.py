"""modelSearch: the catalog, with the fields clients read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from imagewire.air_registry import ModelEntry, availability
from imagewire.tasks.context import TaskContext
from imagewire.tasks.schema import ModelInfo, ModelSearch, ModelSearchResult
from imagewire.tasks.task_type import TaskType, unchanged


def model_info(entry: ModelEntry, *, available: bool, comment: str, loaded_on: str | None = None,
               memory_plan: str | None = None) -> ModelInfo:
    """A catalog entry as a ``modelSearch`` result; ``loaded_on`` says where it is in memory, if it is, and
    ``memory_plan`` how its weights are placed."""
    return ModelInfo(
        air=entry.air,
        name=entry.name,
        version=entry.version,
        category=entry.category,
        architecture=entry.architecture,
        tags=list(entry.tags),
        private=False,
        defaultWidth=entry.defaults.width,
        defaultHeight=entry.defaults.height,
        defaultSteps=entry.defaults.steps,
        defaultScheduler=entry.defaults.scheduler,
        defaultCFG=entry.defaults.cfg_scale,
        defaultStrength=entry.defaults.strength,
        aliases=list(entry.aliases),
        available=available,
        comment=comment,
        positiveTriggerWords=entry.token,
        loaded=loaded_on is not None,
        loadedOn="device" if loaded_on == "device" else "ram" if loaded_on == "ram" else None,
        memoryPlan=memory_plan if loaded_on is not None else None,
    )


async def run(task: ModelSearch, ctx: TaskContext) -> AsyncIterator[ModelSearchResult]:
    services = ctx.services
    if task.visibility == "private":  # every catalog model is public ("private": false)
        yield ModelSearchResult(taskType="modelSearch", taskUUID=task.taskUUID, totalResults=0, results=[])
        return
    total, entries = services.catalog.search(
        text=task.search, category=task.category, architecture=task.architecture, tags=task.tags,
        limit=task.limit, offset=task.offset)
    infos = []
    loaded, plans = services.device.loaded_models, services.device.memory_plans
    for entry in entries:
        # Looking into the Hugging Face cache touches the disk: keep it off the event loop.
        available, reason = ((True, "") if not services.settings.needs_weights else
                             await asyncio.to_thread(availability, entry, data_dir=services.settings.data_dir))
        plan = plans.get(entry.air)
        infos.append(model_info(entry, available=available, comment=reason, loaded_on=loaded.get(entry.air),
                                memory_plan=plan.plan if plan is not None else None))
    yield ModelSearchResult(taskType="modelSearch", taskUUID=task.taskUUID, totalResults=total, results=infos)


TASK_TYPE = TaskType(struct=ModelSearch, prepare=unchanged, run=run)
