"""What an imageInference request adds to its model: LoRAs, textual-inversion embeddings, a VAE, CLIP skip,
prompt weighting and an SDXL refiner.

``prepare`` checks each against the model without I/O (it is called from ``image_inference.prepare``): every
named model exists, is of the right category and fits the model's architecture, no add-on is named twice,
the refiner's hand-off leaves both models a step. ``locate`` finds their weights in ``run``, and
``job_fields`` hands them to the ``InferenceJob``. Every refusal names the parameter by its path
(``lora[1].model``), what would fit, and what was received.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imagewire.air_registry import ARCHITECTURES, ModelEntry
from imagewire.tasks import inputs
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter, UnsupportedParameter, describe_value
from imagewire.tasks.jobs import AddOn, RefinerPass
from imagewire.tasks.schema import Embedding, ImageInference, Lora

# The model families whose pipelines take embeddings, another VAE, CLIP skip and weighted prompts.
ADD_ON_FAMILIES = frozenset({"sd", "sdxl"})
# Those whose pipelines take LoRAs: diffusers' LoRA loading of FLUX and SD 3 pipelines reads their trainers'
# formats too (kohya, XLabs, ai-toolkit), into the transformer and the CLIP text encoder.
LORA_FAMILIES = ADD_ON_FAMILIES | {"flux", "flux-kontext", "sd3"}
REFINER_FAMILIES = frozenset({"sdxl"})
# Where the refiner takes over when the request says neither startStep nor startStepPercentage.
DEFAULT_REFINER_START = 0.8
# promptWeighting values, matched case-insensitively, and how they are spelled from then on.
PROMPT_SYNTAXES = {"compel": "compel", "sdembeds": "sdEmbeds"}


@dataclass(frozen=True)
class Weighted:
    model: ModelEntry
    weight: float


@dataclass(frozen=True)
class AddOns:
    """The request's add-ons, checked against its model."""

    loras: tuple[Weighted, ...] = ()
    embeddings: tuple[Weighted, ...] = ()
    vae: ModelEntry | None = None
    clip_skip: int = 0
    prompt_weighting: str | None = None
    refiner: ModelEntry | None = None
    refiner_start: float = DEFAULT_REFINER_START  # the fraction of the steps the model runs before the refiner


def prepare(task: ImageInference, model: ModelEntry, steps: int, ctx: TaskContext) -> AddOns:
    family = ARCHITECTURES[model.architecture].family
    if family not in LORA_FAMILIES:
        _refuse_add_ons(task, model, family, [("lora[0].model", task.lora)], LORA_FAMILIES)
    if family not in ADD_ON_FAMILIES:
        _refuse_add_ons(task, model, family, [
            ("embeddings[0].model", task.embeddings), ("vae", task.vae), ("clipSkip", task.clipSkip),
            ("promptWeighting", task.promptWeighting), ("usePromptWeighting", task.usePromptWeighting)],
            ADD_ON_FAMILIES)
    refiner, start = _refiner(task, model, steps, ctx)
    return AddOns(
        loras=_weighted(ctx, task.lora or [], model, name="lora", category="lora"),
        embeddings=_embeddings(ctx, task.embeddings or [], model),
        vae=fitting_add_on(ctx, task.vae, model, parameter="vae", category="vae") if task.vae else None,
        clip_skip=task.clipSkip or 0,
        prompt_weighting=_prompt_syntax(task),
        refiner=refiner,
        refiner_start=start,
    )


def _refuse_add_ons(task: ImageInference, model: ModelEntry, family: str, given: list[tuple[str, Any]],
                    families: frozenset[str]) -> None:
    """The first of ``given`` (parameter path, value) that the request sets, refused by its path: FLUX and SD 3
    pipelines read prompts with T5 too and have no embeddings, CLIP skip or weighted prompts here; LoRAs apply
    to the families in ``LORA_FAMILIES``."""
    asked = [parameter for parameter, value in given if value]
    if not asked:
        return
    fitting = [architecture.name for architecture in ARCHITECTURES.values()
               if architecture.family in families and architecture.task == "imageInference"]
    what = "LoRAs apply" if asked[0].startswith("lora") else (
        "embeddings, VAEs, clipSkip and promptWeighting apply")
    raise UnsupportedParameter(
        f"{asked[0]} is not supported for model {model.air} ({model.architecture}, {family} family): {what} "
        f"to models of the architectures {', '.join(fitting)}. Remove it from the request.",
        parameter=asked[0], allowed_values=fitting)


def fitting_add_on(ctx: TaskContext, name: str, model: ModelEntry, *, parameter: str, category: str) -> ModelEntry:
    """The add-on ``name`` names, which must be of ``category`` and made for the model's architecture (or, for
    an inpainting checkpoint, the architecture it was trained from)."""
    entry = inputs.model(ctx, name, parameter=parameter, category=category)
    fits = ARCHITECTURES[model.architecture].compatible
    if entry.architecture != fits:
        kind = inputs.CATEGORY_NAMES[category]
        fitting = [other.air for other in ctx.services.catalog.entries
                   if other.category == category and other.architecture == fits]
        raise InvalidParameter(
            f"{parameter} {entry.air} is {kind[0]} for {entry.architecture} models (the architecture it fits: "
            f"{entry.architecture}), and model {model.air} is {model.architecture}. {kind[1]} that fit "
            f"{model.architecture} here: {', '.join(fitting[:10]) or 'none'}.",
            parameter=parameter, type="string", allowed_values=fitting[:100])
    return entry


def _weighted(ctx: TaskContext, items: Sequence[Lora | Embedding], model: ModelEntry, *, name: str,
              category: str) -> tuple[Weighted, ...]:
    chosen: list[Weighted] = []
    for index, item in enumerate(items):
        parameter = f"{name}[{index}].model"
        entry = fitting_add_on(ctx, item.model, model, parameter=parameter, category=category)
        for earlier, other in enumerate(chosen):
            if other.model.air == entry.air:
                raise InvalidParameter(
                    f"{parameter} names {entry.air}, as {name}[{earlier}].model does; name each once, with the "
                    "sum of the weights you want.", parameter=parameter, type="string")
        chosen.append(Weighted(entry, item.weight))
    return tuple(chosen)


def _embeddings(ctx: TaskContext, items: Sequence[Embedding], model: ModelEntry) -> tuple[Weighted, ...]:
    chosen = _weighted(ctx, items, model, name="embeddings", category="embeddings")
    tokens: dict[str, int] = {}
    for index, item in enumerate(chosen):
        if item.model.token in tokens:
            raise InvalidParameter(
                f"embeddings[{index}].model {item.model.air} has the token {item.model.token!r}, as "
                f"embeddings[{tokens[item.model.token]}].model has; a prompt could not tell them apart.",
                parameter=f"embeddings[{index}].model", type="string")
        tokens[item.model.token] = index
    return chosen


def _prompt_syntax(task: ImageInference) -> str | None:
    if task.promptWeighting is None:
        # The JS SDK's older boolean asks for compel's syntax.
        return "compel" if task.usePromptWeighting else None
    syntax = PROMPT_SYNTAXES.get(task.promptWeighting.casefold())
    if syntax is None:
        allowed = list(PROMPT_SYNTAXES.values())
        raise InvalidParameter(
            f"Invalid promptWeighting: expected one of {', '.join(map(repr, allowed))}; received "
            f"{describe_value(task.promptWeighting)}.", parameter="promptWeighting", type="string",
            allowed_values=allowed)
    return syntax


def _refiner(task: ImageInference, model: ModelEntry, steps: int,
             ctx: TaskContext) -> tuple[ModelEntry | None, float]:
    refiner = task.refiner
    if refiner is None:
        return None, DEFAULT_REFINER_START
    family = ARCHITECTURES[model.architecture].family
    if family not in REFINER_FAMILIES:
        raise InvalidParameter(
            f"refiner is for SDXL models; model {model.air} is {model.architecture} ({family} family).",
            parameter="refiner", type="object")
    if task.seedImage is not None:
        raise InvalidParameter(
            "refiner finishes a text-to-image generation; to refine an existing image, send the refiner model "
            "as model with the image as seedImage.", parameter="refiner", type="object")
    entry = inputs.model(ctx, refiner.model, parameter="refiner.model", category="checkpoint")
    if not _refines(entry, model):
        fitting = [other.air for other in ctx.services.catalog.entries
                   if other.category == "checkpoint" and _refines(other, model)]
        raise InvalidParameter(
            f"refiner.model {entry.air} ({entry.architecture}) does not refine {model.architecture} models like "
            f"model {model.air}. Refiners that do here: {', '.join(fitting[:10]) or 'none'}.",
            parameter="refiner.model", type="string", allowed_values=fitting[:100])
    if steps < 2:
        raise InvalidParameter(
            f"refiner needs at least 2 steps, one for the model and one for the refiner; received steps {steps}.",
            parameter="refiner", type="object")
    if refiner.startStep is not None and refiner.startStepPercentage is not None:
        raise InvalidParameter(
            "refiner.startStepPercentage and refiner.startStep are alternatives: give one; received startStep "
            f"{refiner.startStep} and startStepPercentage {refiner.startStepPercentage}.",
            parameter="refiner.startStepPercentage", type="number")
    if refiner.startStep is not None:
        if refiner.startStep >= steps:
            low = min(2, steps - 1)
            raise InvalidParameter(
                f"Invalid refiner.startStep: must be from {low} to {steps - 1} with steps {steps}, so that the "
                f"refiner has a step to run; received {refiner.startStep}.", parameter="refiner.startStep",
                type="integer", allowed_values=list(range(low, steps)))
        return entry, refiner.startStep / steps
    if refiner.startStepPercentage is not None:
        start = refiner.startStepPercentage / 100
        if not 1 <= _base_steps(steps, start) <= steps - 1:
            usable = [percent for percent in range(1, 100) if 1 <= _base_steps(steps, percent / 100) <= steps - 1]
            raise InvalidParameter(
                f"Invalid refiner.startStepPercentage: with steps {steps} it must leave the model and the refiner "
                f"a step each, from {usable[0]} to {usable[-1]}; received {refiner.startStepPercentage}.",
                parameter="refiner.startStepPercentage", type="number")
        return entry, start
    return entry, min(steps - 1, max(1, _base_steps(steps, DEFAULT_REFINER_START))) / steps


def _base_steps(steps: int, start: float) -> int:
    """How many steps the model runs before a refiner taking over at ``start`` (half steps round up)."""
    return math.floor(steps * start + 0.5)


def _refines(refiner: ModelEntry, model: ModelEntry) -> bool:
    """A refiner architecture names what it refines; any model of the base's own architecture refines it too."""
    return (model.architecture in ARCHITECTURES[refiner.architecture].refines
            or refiner.architecture == model.architecture)


async def job_fields(add_ons: AddOns, ctx: TaskContext) -> dict[str, Any]:
    """The ``InferenceJob`` fields for ``add_ons``, with each one's weights found (on the disk, in threads)."""

    async def located(entry: ModelEntry, weight: float, parameter: str) -> AddOn:
        return AddOn(entry, await inputs.weights(ctx, entry, parameter=parameter), weight)

    loras, embeddings = await asyncio.gather(
        asyncio.gather(*(located(item.model, item.weight, f"lora[{i}].model") for i, item in enumerate(add_ons.loras))),
        asyncio.gather(*(located(item.model, item.weight, f"embeddings[{i}].model")
                         for i, item in enumerate(add_ons.embeddings))))
    fields: dict[str, Any] = {"loras": tuple(loras), "embeddings": tuple(embeddings), "clip_skip": add_ons.clip_skip,
                              "prompt_weighting": add_ons.prompt_weighting}
    if add_ons.vae is not None:
        fields["vae"] = await located(add_ons.vae, 1.0, "vae")
    if add_ons.refiner is not None:
        weights = await inputs.weights(ctx, add_ons.refiner, parameter="refiner.model")
        fields["refiner"] = RefinerPass(add_ons.refiner, weights, add_ons.refiner_start)
    return fields

