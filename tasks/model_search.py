"""modelSearch: the catalog, with the fields clients read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from imagewire.air_registry import ARCHITECTURES, ModelEntry, availability
from imagewire.air_registry.architectures import PUBLIC_ARCHITECTURES
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter
from imagewire.tasks.jobs import ModelPlacement
from imagewire.tasks.schema import CONDITIONINGS, ModelInfo, ModelSearch, ModelSearchResult, ModelType
from imagewire.tasks.task_type import TaskType


def model_type(entry: ModelEntry) -> ModelType | None:
    """A checkpoint's type as the public API names it (base, inpainting, refiner); None for other categories."""
    if entry.category != "checkpoint":
        return None
    architecture = ARCHITECTURES[entry.architecture]
    if architecture.inpainting_only:
        return "inpainting"
    return "refiner" if architecture.refines else "base"


def conditioning(entry: ModelEntry) -> str | None:
    """A ControlNet's conditioning, where one of its tags names one (``canny``); None where we do not know it."""
    if entry.category != "controlnet":
        return None
    return next((tag.casefold() for tag in entry.tags if tag.casefold() in CONDITIONINGS), None)


def downloadable(entry: ModelEntry, ctx: TaskContext) -> bool:
    """Whether modelDownload fetches this model, when it is missing: a hub model, on a server that downloads."""
    return ctx.services.settings.allow_downloads and entry.source == "hub" and not entry.problem


def download_hint(entry: ModelEntry) -> str:
    """What a missing model's comment says on a server that downloads it: how it will get here, rather than the
    command an operator would run by hand (that is for servers without --allow-downloads)."""
    return (f"the weights of {entry.label} are not on this server yet: it downloads them from Hugging Face repo "
            f"'{entry.location}' on first use, or now with a modelDownload task")


def model_info(entry: ModelEntry, *, available: bool, comment: str, loaded_on: str | None = None,
               placement: ModelPlacement | None = None, downloadable: bool = False) -> ModelInfo:
    """A catalog entry as a ``modelSearch`` result; ``loaded_on`` says where it is in memory, if it is, and
    ``placement`` how its weights are placed and quantized."""
    placed = placement if loaded_on is not None else None
    quantized = placed is not None and placed.quantization != "none"
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
        type=model_type(entry),
        conditioning=conditioning(entry),
        memoryPlan=placed.plan if placed is not None else None,
        quantization=placed.quantization if quantized and placed is not None else None,
        quantizationSavedBytes=placed.saved_bytes if quantized and placed is not None else None,
        downloadable=downloadable,
    )


@dataclass(frozen=True)
class Search:
    task: ModelSearch
    architectures: frozenset[str] | None   # the rows the architecture filter covers; None: no filter


def architectures_named(name: str) -> frozenset[str]:
    """The rows an ``architecture`` filter covers: a public name's set, else our own row; InvalidParameter
    naming both lists for any other name."""
    folded = name.casefold()
    if folded in PUBLIC_ARCHITECTURES:
        return frozenset(PUBLIC_ARCHITECTURES[folded])
    if folded in ARCHITECTURES:
        return frozenset({folded})
    allowed = sorted(PUBLIC_ARCHITECTURES) + sorted(set(ARCHITECTURES) - set(PUBLIC_ARCHITECTURES))
    raise InvalidParameter(
        f"architecture {name!r} is neither one of the public API's architecture names nor one of this server's: "
        f"use one of {', '.join(allowed)}.", parameter="architecture", type="string", allowed_values=allowed)


def prepare(task: ModelSearch, ctx: TaskContext) -> Search:
    return Search(task, None if task.architecture is None else architectures_named(task.architecture))


def _matches(entry: ModelEntry, search: Search) -> bool:
    task = search.task
    # Any of the tags, as the public API filters (a model with at least one of them), in any case.
    wanted = {tag.casefold() for tag in task.tags or ()}
    return ((not wanted or not wanted.isdisjoint(tag.casefold() for tag in entry.tags))
            and (search.architectures is None or entry.architecture.casefold() in search.architectures)
            and (task.type is None or model_type(entry) == task.type)
            and (task.conditioning is None or conditioning(entry) == task.conditioning))


async def run(search: Search, ctx: TaskContext) -> AsyncIterator[ModelSearchResult]:
    task = search.task
    services = ctx.services
    if task.visibility == "private":  # every catalog model is public ("private": false)
        yield ModelSearchResult(taskType="modelSearch", taskUUID=task.taskUUID, totalResults=0, results=[])
        return
    # The catalog filters by text and category; tags, architecture sets, type and conditioning are filtered
    # here, so the page is cut after every filter.
    _, candidates = services.catalog.search(
        text=task.search, category=task.category, limit=len(services.catalog.entries), offset=0)
    matches = [entry for entry in candidates if _matches(entry, search)]
    entries = matches[task.offset: task.offset + task.limit]
    infos = []
    loaded, plans = services.device.loaded_models, services.device.memory_plans
    for entry in entries:
        # Looking into the Hugging Face cache touches the disk: keep it off the event loop.
        available, reason = ((True, "") if not services.settings.needs_weights else
                             await asyncio.to_thread(availability, entry, data_dir=services.settings.data_dir))
        plan = plans.get(entry.air)
        fetched = not available and downloadable(entry, ctx)
        infos.append(model_info(entry, available=available, comment=download_hint(entry) if fetched else reason,
                                loaded_on=loaded.get(entry.air), placement=plan,
                                downloadable=fetched))
    yield ModelSearchResult(taskType="modelSearch", taskUUID=task.taskUUID, totalResults=len(matches), results=infos)


TASK_TYPE = TaskType(struct=ModelSearch, prepare=prepare, run=run)
