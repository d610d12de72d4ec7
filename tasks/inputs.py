"""The one boundary between the ground floors and the wire: what a task names (an image, a model, a
sampler) resolved through ``storage`` and ``air_registry``, whose own errors become error items here.

One helper per kind of input, each given the request field it reads, so ``seedImage``,
``maskImage``, guide images and ``inputImage`` get the same checks and the same messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from imagewire.air_registry import (
    AIR,
    ARCHITECTURES,
    DIFFUSION,
    MalformedAIR,
    ModelEntry,
    RegistryError,
    SamplerSpec,
    UnknownModel,
    WeightsMissing,
    locate_weights,
    parse_air,
    resolve_sampler,
)
from imagewire.air_registry.civitai import Civitai
from imagewire.storage import (
    INFERENCE_INPUTS,
    ImageNotStored,
    InputImage,
    StorageError,
    StoredImage,
    StoreFailed,
    resolve_image_input,
)
from imagewire.tasks import errors
from imagewire.tasks.context import TaskContext
from imagewire.tasks.jobs import Job

J = TypeVar("J", bound=Job)

def task_error(exc: StorageError | RegistryError, parameter: str) -> errors.TaskError:
    """The error item for a ground-floor failure concerning the request field ``parameter``."""
    message = exc.describe(parameter)
    allowed = exc.allowed_values
    if isinstance(exc, ImageNotStored):
        return errors.ImageNotFound(message, parameter=parameter, type="string")
    if isinstance(exc, StoreFailed):
        return errors.StorageError(message)
    if isinstance(exc, (UnknownModel, WeightsMissing)):
        return errors.ModelNotFound(message, parameter=parameter, type="string", allowed_values=allowed)
    # Anything else is a value the client sent that cannot be used: not an image, not an AIR id, …
    return errors.InvalidParameter(message, parameter=parameter, type="string", allowed_values=allowed)


async def image(
    ctx: TaskContext, value: str, *, parameter: str, formats: frozenset[str] = INFERENCE_INPUTS,
    target: tuple[int, int] | None = None,
) -> InputImage:
    """An input image in any of the four forms (UUID, data URI, base64, URL), decoded and checked.

    Its decoded pixels count against the server's budget until the task is over (``ctx.hold_pixels``).
    ``target``: the size the caller will resize it to, when known, so that a larger picture is decoded
    (or reduced right away) to near that size rather than held at the size it was sent.
    """
    services, settings = ctx.services, ctx.services.settings
    try:
        decoded = await resolve_image_input(
            value, owner=ctx.owner, store=services.store, fetcher=services.fetcher,
            max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes, allowed_formats=formats,
            target=target)
    except StorageError as exc:
        raise task_error(exc, parameter) from exc
    ctx.hold_pixels(decoded.image.width * decoded.image.height, parameter=parameter)
    return decoded


async def resized(ctx: TaskContext, picture: InputImage, size: tuple[int, int], *, parameter: str) -> Image.Image:
    """``picture`` at ``size`` (Lanczos, in a thread), counted against the budget in its place: the caller
    keeps the result and lets ``picture`` go."""
    original = picture.image
    if original.size == size:
        return original
    result = await asyncio.to_thread(original.resize, size, Image.Resampling.LANCZOS)
    ctx.let_go_of_pixels(original.width * original.height)
    ctx.hold_pixels(size[0] * size[1], parameter=parameter)
    return result


# How a failure to store a task's result names it ("The result image could not be stored: …").
RESULT_IMAGE = "The result image"


async def store(ctx: TaskContext, data: bytes, *, extension: str, what: str = RESULT_IMAGE,
                ttl: float | None = None) -> StoredImage:
    """Keep a result or an upload under a new image UUID (for ``ttl`` seconds, when given); ``what`` names it in
    an error."""
    try:
        return await ctx.services.store.put(data, extension=extension, owner=ctx.owner, ttl=ttl)
    except StorageError as exc:
        raise task_error(exc, what) from exc


# How messages name each category of model: one, and several.
CATEGORY_NAMES = {"checkpoint": ("a checkpoint", "Checkpoints"), "lora": ("a LoRA", "LoRAs"),
                  "embeddings": ("an embedding", "Embeddings"), "vae": ("a VAE", "VAEs"),
                  "ip-adapter": ("an IP-Adapter", "IP-Adapters")}


def model(ctx: TaskContext, name: str, *, parameter: str = "model", task: str = "imageInference",
          category: str | None = None) -> ModelEntry:
    """The catalog entry a request's AIR id or alias names, a model of the task type ``task``; with
    ``category``, it must be of that category."""
    catalog = ctx.services.catalog
    try:
        entry = catalog.resolve(name)
    except UnknownModel as exc:
        civitai, air = ctx.services.civitai, _air(name)
        # Only imageInference's model is fetched (``model_to_download``); other fields name catalog models.
        fetchable = task == "imageInference" and parameter == "model"
        if fetchable and civitai is not None and air is not None and Civitai.names(air):
            # Say what would fetch it: the server may, or the operator may add it to a catalog file.
            message = (f"{parameter} {str(air)!r} is not in this server's catalog. It names a Civitai checkpoint: "
                       f"{civitai.describe_download(air)}; or add it to a --catalog file")
            raise errors.ModelNotFound(message, parameter=parameter, type="string") from exc
        raise task_error(exc, parameter) from exc
    except RegistryError as exc:
        raise task_error(exc, parameter) from exc
    if entry.problem:
        # A broken file of a models folder: listed by modelSearch, never run.
        raise errors.ModelNotFound(f"{parameter} {entry.label} cannot be used: {entry.problem}",
                                   parameter=parameter, type="string")
    serves = ARCHITECTURES[entry.architecture].task
    if serves != task:
        fitting = [candidate.air for candidate in catalog.serving(task)]
        raise errors.InvalidParameter(
            f"{parameter} {entry.label} is a {entry.category} model for {serves} tasks, not for {task}; "
            f"models for {task}: {', '.join(fitting[:10]) or 'none'}.",
            parameter=parameter, type="string", allowed_values=fitting[:100])
    if category is not None and entry.category != category:
        (wanted, plural), (found, _) = (CATEGORY_NAMES.get(c, (f"a {c} model", f"{c} models"))
                                        for c in (category, entry.category))
        fitting = [other.air for other in catalog.entries if other.category == category]
        raise errors.InvalidParameter(
            f"{parameter} must name {wanted}; {entry.air} is {found}. {plural} here: "
            f"{', '.join(fitting[:10]) or 'none'}{' and more (see modelSearch)' if len(fitting) > 10 else ''}.",
            parameter=parameter, type="string", allowed_values=fitting[:100])
    return entry


def model_to_download(ctx: TaskContext, name: str) -> AIR | None:
    """The Civitai checkpoint a request names when the catalog does not hold it yet and this server may
    fetch it (``download_model`` does, in ``run``); None for every other name."""
    civitai, air = ctx.services.civitai, _air(name)
    if civitai is None or air is None or not ctx.services.settings.allow_downloads or not Civitai.names(air):
        return None
    try:
        ctx.services.catalog.resolve(name)
    except RegistryError:
        return air
    return None


async def download_model(ctx: TaskContext, air: AIR, *, parameter: str = "model") -> ModelEntry:
    """Fetch a Civitai checkpoint (on a download thread: minutes, with a progress bar) and add it to the catalog."""
    civitai, downloads = ctx.services.civitai, ctx.services.downloads
    assert civitai is not None and downloads is not None  # model_to_download names none without them
    try:
        entry = await downloads.run(ctx.owner, civitai.fetch, air)
    except RegistryError as exc:
        raise task_error(exc, parameter) from exc
    ctx.services.catalog.add(entry)
    return entry


def _air(name: str) -> AIR | None:
    try:
        return parse_air(name)
    except MalformedAIR:
        return None


async def weights(ctx: TaskContext, entry: ModelEntry, *, parameter: str = "model") -> Path:
    """Where the model's weights are (a look at the disk and the Hugging Face cache, in a thread). An engine
    that reads no weights (``Settings.needs_weights``) gets the catalog's location unchecked: it never opens it, and
    so does a device that finds them itself (``Settings.weights_on_device``)."""
    settings = ctx.services.settings
    if not settings.needs_weights or settings.weights_on_device:
        return Path(entry.location)
    try:
        return await asyncio.to_thread(
            locate_weights, entry, data_dir=settings.data_dir, allow_downloads=settings.allow_downloads)
    except RegistryError as exc:
        raise task_error(exc, parameter) from exc


def located_weights(job: J, *, data_dir: Path, allow_downloads: bool) -> J:
    """``job`` with the weights of every model it names (its own, its add-ons', its checker's) looked for on this
    machine: a device that finds weights itself (``Settings.weights_on_device``) is handed them unchecked. Raises
    the TaskError naming the request field of a model whose weights are missing."""

    def locate(entry: ModelEntry) -> Path:
        try:
            return locate_weights(entry, data_dir=data_dir, allow_downloads=allow_downloads)
        except RegistryError as exc:
            naming = getattr(job, "parameter_naming", None)
            raise task_error(exc, naming(entry.air) if callable(naming) else "model") from exc

    def with_weights(part: Any) -> Any:
        changes: dict[str, Any] = {}
        for each in dataclasses.fields(part):
            value = getattr(part, each.name)
            if each.name == "weights" and isinstance(value, Path):
                entry = getattr(part, "model", None) or getattr(part, "checker", None)
                if isinstance(entry, ModelEntry):
                    changes["weights"] = locate(entry)
            elif _has_weights(value):
                changes[each.name] = with_weights(value)
            elif isinstance(value, tuple) and any(_has_weights(item) for item in value):
                changes[each.name] = tuple(with_weights(item) if _has_weights(item) else item for item in value)
        return dataclasses.replace(part, **changes) if changes else part

    located: J = with_weights(job)
    return located


def _has_weights(value: Any) -> bool:
    """Whether ``value`` is a part of a job that names a model and its weights (an add-on, a ControlNet, …)."""
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)
            and any(each.name == "weights" for each in dataclasses.fields(value)))


def sampler(ctx: TaskContext, name: str | None, *, parameter: str = "scheduler",
            sampling: str = DIFFUSION) -> SamplerSpec | None:
    """The sampler a ``scheduler`` value names (None: the model's own), if it fits the model's
    ``sampling`` and this device can run it."""
    try:
        spec = resolve_sampler(name, sampling)
    except RegistryError as exc:
        raise task_error(exc, parameter) from exc
    if spec is not None:
        why = ctx.services.device.unavailable_samplers.get(spec.name)
        if why is not None:
            raise errors.InvalidParameter(f"{parameter} {spec.name} {why}; choose another scheduler",
                                          parameter=parameter, type="string")
    return spec
