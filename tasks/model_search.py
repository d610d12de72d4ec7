"""modelSearch: the catalog, with the fields clients read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from air_registry.catalog import availability, model_info
from server.services import TaskContext
from tasks.schema import ModelSearch, ModelSearchResult


async def run(task: ModelSearch, ctx: TaskContext) -> AsyncIterator[ModelSearchResult]:
    services = ctx.services
    if task.visibility == "private":  # every catalog model is public ("private": false)
        yield ModelSearchResult(taskType="modelSearch", taskUUID=task.taskUUID, totalResults=0, results=[])
        return
    total, entries = services.catalog.search(
        text=task.search, category=task.category, architecture=task.architecture, tags=task.tags,
        limit=task.limit, offset=task.offset)
    infos = []
    for entry in entries:
        # Looking into the Hugging Face cache touches the disk: keep it off the event loop.
        available, reason = await asyncio.to_thread(availability, entry, data_dir=services.config.data_dir)
        infos.append(model_info(entry, available=available, comment=reason))
    yield ModelSearchResult(taskType="modelSearch", taskUUID=task.taskUUID, totalResults=total, results=infos)
