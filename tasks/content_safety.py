"""Content safety for imageInference: ``checkNSFW``, ``safety.checkContent``, ``safety.mode`` and
``safety.checkInputs``, run by a real safety checker (the catalog model ``--safety-checker`` names, by
default the one diffusers' Stable Diffusion pipelines use).

- ``checkContent`` (or ``checkNSFW``, or a ``mode`` of ``fast``/``full``): every result is checked and
  carries ``NSFWContent``; a flagged result is replaced by a black image of the same size, as diffusers
  pipelines do, so that the content never leaves the server.
- ``checkInputs``: the seed image and the guide images are checked before any work; a flagged input
  fails the task with an error naming it.

Checks run on the device as ``SafetyCheckJob``s (``server/engine/safety.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from imagewire.air_registry import ModelEntry
from imagewire.tasks import inputs
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter, UnknownParameter
from imagewire.tasks.jobs import GeneratedImage, SafetyCheckJob, pixels
from imagewire.tasks.schema import ImageInference

SAFETY_FIELDS = ("checkContent", "checkInputs", "mode", "tolerance")
MODES = ("none", "fast", "full")
BLACK = (0, 0, 0)


@dataclass(frozen=True)
class SafetyRequest:
    check_content: bool
    check_inputs: bool
    parameter: str                  # what asked for it, for error messages: checkNSFW, safety.checkContent, …
    checker: ModelEntry | None      # set when anything is checked

    @property
    def active(self) -> bool:
        return self.check_content or self.check_inputs


NO_CHECKS = SafetyRequest(check_content=False, check_inputs=False, parameter="", checker=None)


def prepare(task: ImageInference, ctx: TaskContext) -> SafetyRequest:
    """What the request asks to check, and the checker that will; no I/O."""
    safety: dict[str, Any] = task.safety or {}
    unknown = sorted(set(safety) - set(SAFETY_FIELDS))
    if unknown:
        raise UnknownParameter(
            f"Unknown parameter safety.{unknown[0]}; the fields of safety are {', '.join(SAFETY_FIELDS)}.",
            parameter=f"safety.{unknown[0]}", allowed_values=list(SAFETY_FIELDS))
    for name in ("checkContent", "checkInputs"):
        if not isinstance(safety.get(name, False), bool):
            raise InvalidParameter(f"Invalid safety.{name}: expected true or false; received {safety[name]!r}.",
                                   parameter=f"safety.{name}", type="boolean")
    mode = safety.get("mode")
    if mode is not None and mode not in MODES:
        raise InvalidParameter(f"Invalid safety.mode: expected one of {', '.join(map(repr, MODES))}; received "
                               f"{mode!r}.", parameter="safety.mode", type="string", allowed_values=list(MODES))
    # mode, where given, decides over checkContent (the public API's rule); checkNSFW is the older switch.
    content = mode in ("fast", "full") if mode is not None else bool(safety.get("checkContent"))
    parameter = "safety.mode" if mode is not None else "safety.checkContent"
    if task.checkNSFW and not content:
        content, parameter = True, "checkNSFW"
    check_inputs = bool(safety.get("checkInputs"))
    if not content and not check_inputs:
        return NO_CHECKS
    if not content:
        parameter = "safety.checkInputs"
    checker = inputs.model(ctx, ctx.services.settings.safety_checker, parameter=parameter)
    if checker.category != "safety":
        raise InvalidParameter(
            f"{parameter} needs a safety checker, and this server's --safety-checker {checker.air} is a "
            f"{checker.category} model; the operator must name a catalog model of category safety.",
            parameter=parameter)
    return SafetyRequest(check_content=content, check_inputs=check_inputs, parameter=parameter, checker=checker)


async def checker_weights(ctx: TaskContext, request: SafetyRequest) -> Path | None:
    """Where the checker's weights are; a clear error naming what to download when they are not here."""
    if request.checker is None:
        return None
    return await inputs.weights(ctx, request.checker, parameter=request.parameter)


async def flags(ctx: TaskContext, request: SafetyRequest, weights: Path, task_uuid: str,
                pictures: Sequence[Image.Image]) -> list[bool]:
    """The checker's verdict on each picture (True: flagged), from the device."""
    assert request.checker is not None
    job = SafetyCheckJob(task_uuid=task_uuid, owner=ctx.owner, checker=request.checker, weights=weights,
                         pictures=list(pictures))
    found: list[bool] = []
    with ctx.timed("safety"):
        progress = ctx.services.device.submit(job)
        try:
            async for chunk in progress:
                found.extend(chunk)
        finally:
            progress.cancel()  # the task ended early (cancelled, failed): the check stops too
    return found


async def check_inputs(ctx: TaskContext, request: SafetyRequest, weights: Path | None, task_uuid: str,
                       named: Sequence[tuple[str, Image.Image]]) -> None:
    """Fail the task when any input (parameter name, picture) is flagged."""
    if not request.check_inputs or weights is None or not named:
        return
    verdicts = await flags(ctx, request, weights, task_uuid, [picture for _, picture in named])
    for (parameter, _), flagged in zip(named, verdicts, strict=True):
        if flagged:
            raise InvalidParameter(
                f"{parameter} was flagged by the content safety checker (safety.checkInputs); send another image.",
                parameter=parameter, type="string")


async def check_results(ctx: TaskContext, request: SafetyRequest, weights: Path | None, task_uuid: str,
                        chunk: Sequence[GeneratedImage]) -> list[GeneratedImage]:
    """Each result with its ``nsfw`` verdict; a flagged one replaced by a black image of its size."""
    if not request.check_content or weights is None or not chunk:
        return list(chunk)
    pictures = [pixels(generated.image) for generated in chunk]
    verdicts = await flags(ctx, request, weights, task_uuid, pictures)
    return [
        GeneratedImage(generated.index, generated.seed,
                       Image.new("RGB", picture.size, BLACK) if flagged else picture,
                       generated.seconds, nsfw=flagged)
        for generated, picture, flagged in zip(chunk, pictures, verdicts, strict=True)
    ]
