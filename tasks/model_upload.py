"""modelUpload: a checkpoint, a LoRA, a VAE, a ControlNet or a textual-inversion embedding fetched from the
client's ``downloadURL`` into the catalog, usable by its ``air`` once the task answers ``ready``.

``prepare`` checks everything a request can get wrong without I/O: that this server downloads at all
(``--allow-downloads``), the category and the architecture it names, the fields that apply to that category,
and the AIR (not one of a model this server has from elsewhere). ``run`` answers the public API's phases as
status items: ``validated``, then ``downloaded`` (the file fetched on a download thread, bounded as every
download is: ``air_registry/uploads.py``), ``optimized`` (the file checked: complete, of the stated
architecture, of the SHA-256 a ``uniqueIdentifier`` names where it is one), ``stored`` (kept, with its catalog
file), ``ready`` (in the catalog). A failure answers an error naming the parameter, and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from imagewire.air_registry import ARCHITECTURES, RegistryError
from imagewire.air_registry.air import AIR, parse_air
from imagewire.air_registry.architectures import PUBLIC_ARCHITECTURES
from imagewire.air_registry.samplers import resolve_sampler
from imagewire.air_registry.uploads import ModelUploads, Upload, UploadFailed
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import (
    InvalidParameter,
    MissingParameter,
    ServiceUnavailable,
    TaskError,
    UnsupportedParameter,
    describe_value,
)
from imagewire.tasks.schema import ModelUpload, ModelUploadResult
from imagewire.tasks.task_type import TaskType

# The public categories this server takes, and the catalog's category each becomes: a LyCORIS file is loaded
# as a LoRA (LoCon is; the formats diffusers cannot load are refused naming the format).
CATEGORIES = {"checkpoint": "checkpoint", "lora": "lora", "lycoris": "lora", "vae": "vae", "controlnet": "controlnet",
              "embeddings": "embeddings"}
# The families whose requests take another VAE and embeddings (``image_add_ons.ADD_ON_FAMILIES``): a VAE or an
# embedding for others is no use.
ADD_ON_FAMILIES = ("sd", "sdxl")
CHECKPOINT_TYPES = ("base", "inpainting", "refiner")
EMBEDDING_TYPES = ("positive", "negative")
# What the categories whose models only some architectures take are for, said in the refusal of another.
_FITTING = {"vae": "a VAE upload is for models whose requests take a vae (SD 1.x/2.x and SDXL)",
            "embeddings": "an embeddings upload is for models whose requests take embeddings (SD 1.x/2.x and SDXL)",
            "controlnet": "a ControlNet upload is for models whose requests take a controlNet"}
# Public names of SDXL and SD 1.x fine-tunes and distillations: their files have their base's shapes and run as it.
_FINE_TUNES = {**dict.fromkeys(("pony", "illustrious", "sdxldistilled", "sdxlhyper", "sdxllightning", "sdxlturbo",
                                "sdxllcm"), "sdxl"),
               **dict.fromkeys(("sdhyper", "sd1xlcm"), "sd1x")}
# Sources whose AIRs this server gives itself: the shipped catalog, models folders, Civitai downloads.
RESERVED_SOURCES = ("imagewire", "local", "civitai")
UPLOAD_TAG = "upload"

PHASES = {
    "validated": "Model parameters and configuration validated.",
    "downloaded": "Model downloaded from provider.",
    "optimized": "Model optimized for deployment.",
    "stored": "Model uploaded to secure storage.",
    "ready": "Model successfully deployed and ready for use.",
}

# AIRs being uploaded now: a second upload of one waits for no one, it is refused (their temporary files would
# share a folder).
_UNDER_WAY: set[str] = set()


def _architectures(name: str) -> tuple[str, ...]:
    """The architectures here that the public API's name (or ours) covers."""
    public = _FINE_TUNES.get(name.casefold(), name.casefold())
    if public in PUBLIC_ARCHITECTURES:
        return PUBLIC_ARCHITECTURES[public]
    if name in ARCHITECTURES and ARCHITECTURES[name].task == "imageInference":
        return (name,)
    return ()


def _uploadable_architectures() -> list[str]:
    public = [name for name, rows in PUBLIC_ARCHITECTURES.items() if rows]
    ours = [name for name, arch in ARCHITECTURES.items() if arch.task == "imageInference"]
    return [*public, *_FINE_TUNES, *ours]


@dataclass(frozen=True)
class Prepared:
    task_uuid: str
    upload: Upload


def prepare(task: ModelUpload, ctx: TaskContext) -> Prepared:
    services = ctx.services
    url, url_parameter = _url(task)
    if not services.settings.allow_downloads or services.uploads is None:
        raise UnsupportedParameter(
            f"{url_parameter}: this server fetches no model, as it was started without --allow-downloads; "
            "its operator can start it with --allow-downloads, or put the file in a --models-dir folder.",
            parameter=url_parameter)
    try:
        ModelUploads.parse_url(url, url_parameter)  # the address is checked when it is resolved, in run
    except UploadFailed as exc:
        raise _error(exc) from exc
    category = CATEGORIES.get(task.category)
    if category is None:
        raise InvalidParameter(
            f"Invalid category: this server takes uploads of {', '.join(map(repr, CATEGORIES))}; received "
            f"{describe_value(task.category)}.", parameter="category", type="string",
            allowed_values=list(CATEGORIES))
    architectures = _architectures(task.architecture)
    if not architectures:
        allowed = _uploadable_architectures()
        raise InvalidParameter(
            f"Invalid architecture: expected one of {', '.join(allowed)}; received "
            f"{describe_value(task.architecture)}.", parameter="architecture", type="string", allowed_values=allowed)
    if category in _FITTING and not all(_takes(category, name) for name in architectures):
        fitting = [name for name in _uploadable_architectures() if _architectures(name) and all(
            _takes(category, row) for row in _architectures(name))]
        raise InvalidParameter(
            f"Invalid architecture: {_FITTING[category]}, one of {', '.join(fitting)}; received "
            f"{describe_value(task.architecture)}.", parameter="architecture", type="string", allowed_values=fitting)
    air = _air(task, ctx)
    _check_category_fields(task, category)
    if task.private:
        raise UnsupportedParameter(
            "private: every API key of this server shares one catalog, so a model cannot be kept from the others; "
            "send private false or leave it out (uploaded models are listed with private false).",
            parameter="private", allowed_values=[False])
    # A ControlNet's conditioning and an embedding's type are kept as tags: modelSearch answers and filters a
    # ControlNet's conditioning from its tags, and shows an embedding's type among them.
    tags = [UPLOAD_TAG, *(task.tags or [])]
    if task.conditioning is not None:
        tags.append(task.conditioning)
    if category == "embeddings":
        tags.append(f"{task.type}-embedding")
    entry: dict[str, object] = {
        "air": str(air), "name": f"{task.name} {task.version}", "category": category, "tags": tags,
    }
    if category == "checkpoint":
        defaults = _defaults(task, architectures[0])
        if defaults:
            entry["defaults"] = defaults
    if category == "embeddings":
        entry["token"] = _token(task)
    return Prepared(task.taskUUID, Upload(
        air=air, url=url, url_parameter=url_parameter, category=category, architectures=architectures,
        stated=task.architecture, unique_identifier=task.uniqueIdentifier, entry=entry,
        type=task.type if category == "checkpoint" else None,
        format=task.format, stated_category=task.category))


def _url(task: ModelUpload) -> tuple[str, str]:
    if task.downloadURL is not None and task.downloadUrl is not None:
        raise InvalidParameter("downloadURL and downloadUrl are one field spelled two ways: send one.",
                               parameter="downloadUrl", type="string")
    if task.downloadURL is not None:
        return task.downloadURL, "downloadURL"
    if task.downloadUrl is not None:
        return task.downloadUrl, "downloadUrl"
    raise MissingParameter("Missing downloadURL: the URL the model file is downloaded from.",
                           parameter="downloadURL", type="string")


def _air(task: ModelUpload, ctx: TaskContext) -> AIR:
    try:
        air = parse_air(task.air)
    except RegistryError as exc:
        raise InvalidParameter(exc.describe("air"), parameter="air", type="string") from exc
    if air.source in RESERVED_SOURCES:
        raise InvalidParameter(
            f"Invalid air: the sources {', '.join(RESERVED_SOURCES)} name models this server has from its own "
            f"catalog, its models folders and Civitai; choose a source of your own; received {task.air!r}.",
            parameter="air", type="string")
    known = ctx.services.catalog.get(str(air))
    if known is not None and UPLOAD_TAG not in known.tags:
        raise InvalidParameter(
            f"Invalid air: {air} is {known.label}, a model this server has from elsewhere; an upload may replace "
            "only an earlier upload. Choose another id or version.", parameter="air", type="string")
    if str(air) in _UNDER_WAY:
        raise InvalidParameter(f"Invalid air: an upload of {air} is under way; send this one once it has ended.",
                               parameter="air", type="string")
    return air


def _check_category_fields(task: ModelUpload, category: str) -> None:
    """The fields of another category than the task's are refused by name, never ignored."""
    types = {"checkpoint": CHECKPOINT_TYPES, "embeddings": EMBEDDING_TYPES}.get(category)
    if types is not None:
        what = "a checkpoint's" if category == "checkpoint" else "an embedding's"
        if task.type is None:
            raise MissingParameter(f"Missing type: {what} type, one of {', '.join(types)}.", parameter="type",
                                   type="string", allowed_values=list(types))
        if task.type not in types:
            raise InvalidParameter(
                f"Invalid type: {what} type is one of {', '.join(types)}; received {task.type!r}.",
                parameter="type", type="string", allowed_values=list(types))
    checkpoint_only = {"defaultScheduler": task.defaultScheduler, "defaultSteps": task.defaultSteps,
                       "defaultCFG": task.defaultCFG, "defaultStrength": task.defaultStrength}
    refused = {**({"type": task.type} if types is None else {}),
               **(checkpoint_only if category != "checkpoint" else {}),
               **({"conditioning": task.conditioning} if category != "controlnet" else {})}
    for parameter, value in refused.items():
        if value is not None:
            raise InvalidParameter(
                f"{parameter} does not apply to category {task.category!r}; received {describe_value(value)}. "
                "Remove it from the request.", parameter=parameter, type="string")
    if task.positiveTriggerWords is not None and category != "embeddings":
        # An embedding's are its token; a checkpoint's or a LoRA's would be a hint modelSearch has no place for.
        raise UnsupportedParameter(
            f"positiveTriggerWords: only an embedding's are kept here (its token, the word that stands for it in "
            f"prompts); for category {task.category!r} leave it out.", parameter="positiveTriggerWords")


def _token(task: ModelUpload) -> str:
    """An embedding's token: the one word of ``positiveTriggerWords``, which prompts then name it by; without
    it, the model's ``name`` made one word (lower case, other characters as ``_``), as AUTOMATIC1111 names an
    embedding by its file. modelSearch answers the token either way."""
    words = task.positiveTriggerWords
    if words is None:
        return re.sub(r"[^a-z0-9_-]+", "_", task.name.strip().lower()).strip("_-") or "embedding"
    listed = [words] if isinstance(words, str) else words
    parameter = "positiveTriggerWords" if isinstance(words, str) else "positiveTriggerWords[0]"
    if len(listed) != 1:
        raise InvalidParameter(
            f"Invalid positiveTriggerWords: an embedding has one token, the word that stands for it in prompts; "
            f"received {len(listed)} words.", parameter="positiveTriggerWords", type="string")
    token = listed[0]
    if not token or any(character.isspace() or character == "," for character in token):
        raise InvalidParameter(
            f"Invalid {parameter}: an embedding's token is one word, with no spaces or commas, that prompts name it "
            f"by; received {describe_value(token)}.", parameter=parameter, type="string")
    return token


def _takes(category: str, architecture: str) -> bool:
    """Whether requests for models of ``architecture`` take a model of ``category``."""
    if category == "controlnet":
        return ARCHITECTURES[architecture].controlnets
    return ARCHITECTURES[architecture].family in ADD_ON_FAMILIES


def _defaults(task: ModelUpload, architecture: str) -> dict[str, object]:
    defaults: dict[str, object] = {}
    if task.defaultScheduler is not None:
        try:
            spec = resolve_sampler(task.defaultScheduler, ARCHITECTURES[architecture].sampling)
        except RegistryError as exc:
            raise InvalidParameter(exc.describe("defaultScheduler"), parameter="defaultScheduler", type="string",
                                   allowed_values=exc.allowed_values) from exc
        if spec is not None:
            defaults["scheduler"] = spec.name
    for key, value in (("steps", task.defaultSteps), ("CFGScale", task.defaultCFG),
                       ("strength", task.defaultStrength)):
        if value is not None:
            defaults[key] = value
    return defaults


def _phase(upload: Upload, task_uuid: str, status: str) -> ModelUploadResult:
    return ModelUploadResult(taskType="modelUpload", taskUUID=task_uuid, status=status, message=PHASES[status],
                             air=str(upload.air))


async def run(prepared: Prepared, ctx: TaskContext) -> AsyncIterator[ModelUploadResult]:
    task_uuid, upload = prepared.task_uuid, prepared.upload
    services = ctx.services
    uploads, downloads = services.uploads, services.downloads
    assert uploads is not None and downloads is not None  # prepare refuses uploads without them
    if str(upload.air) in _UNDER_WAY:  # another upload of it passed prepare meanwhile
        raise InvalidParameter(f"Invalid air: an upload of {upload.air} is under way; send this one once it has "
                               "ended.", parameter="air", type="string")
    _UNDER_WAY.add(str(upload.air))
    stop = threading.Event()
    partial: Path | None = None
    try:
        yield _phase(upload, task_uuid, "validated")
        try:
            if not await asyncio.to_thread(uploads.kept, upload):
                if str(upload.air) in services.device.loaded_models:
                    # The loaded pipelines (or adapters) hold the earlier file's weights under this AIR, and would
                    # go on answering with them.
                    raise InvalidParameter(
                        f"Invalid air: {upload.air} is loaded now with the weights of its earlier upload, which "
                        "would go on answering for it; upload the new file as a new version (the same id, another "
                        "version), as the public API advises.", parameter="air", type="string")
                partial = uploads.partial(upload)
                with ctx.timed("download"):
                    await downloads.run(ctx.owner, uploads.download, upload, partial, stop)
            yield _phase(upload, task_uuid, "downloaded")
            with ctx.timed("store"):
                entry = await downloads.run(ctx.owner, uploads.store, upload, partial)
        except UploadFailed as exc:
            raise _error(exc) from exc
        yield _phase(upload, task_uuid, "optimized")
        yield _phase(upload, task_uuid, "stored")
        services.catalog.add(entry)
        yield _phase(upload, task_uuid, "ready")
    finally:
        # A cancelled task leaves its download thread running: it stops at its next chunk, and what it wrote
        # goes (the file is gone already where it was stored or refused).
        stop.set()
        if partial is not None:
            partial.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                partial.parent.rmdir()  # only if nothing else is in it
        _UNDER_WAY.discard(str(upload.air))


def _error(exc: UploadFailed) -> TaskError:
    if exc.server_side:
        return ServiceUnavailable(exc.problem, parameter=exc.parameter)
    return InvalidParameter(exc.problem, parameter=exc.parameter, type="string", allowed_values=exc.allowed_values)


TASK_TYPE = TaskType(struct=ModelUpload, prepare=prepare, run=run)
