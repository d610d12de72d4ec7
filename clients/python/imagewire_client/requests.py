"""Build the tasks the client sends, from the shared schema structs, and encode frames.

Values are not checked here: the server is the one validator, and its errors name the
parameter and the allowed range. Fields left at ``None`` stay off the wire: the public API
treats absent and ``null`` alike, and a frame without them is easier to read in a log.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, NotRequired, TypedDict, TypeVar, Unpack

import msgspec

from imagewire_client import schema

_encoder = msgspec.json.Encoder()


def new_task_uuid() -> str:
    return str(uuid.uuid4())


def _wire_object(task: schema.Task) -> dict[str, Any]:
    wire = msgspec.to_builtins(task)  # carries the ``taskType`` tag
    # Unset members of nested objects (a refiner's other start) stay off the wire too.
    return {key: {name: member for name, member in value.items() if member is not None}
            if isinstance(value, dict) else value for key, value in wire.items() if value is not None}


def encode_tasks(tasks: Sequence[schema.Task]) -> bytes:
    """One frame: a JSON array of task objects."""
    return _encoder.encode([_wire_object(task) for task in tasks])


def authentication(api_key: str | None, session_uuid: str | None = None) -> schema.Authentication:
    return schema.Authentication(apiKey=api_key, connectionSessionUUID=session_uuid)


def ping() -> schema.Ping:
    return schema.Ping(ping=True)


def cancel_task(task_uuid: str) -> schema.CancelTask:
    return schema.CancelTask(taskUUID=task_uuid)


def image_upload(image: str, task_uuid: str | None = None) -> schema.ImageUpload:
    return schema.ImageUpload(taskUUID=task_uuid or new_task_uuid(), image=image)


def model_search(
    search: str | None = None,
    *,
    category: str | None = None,
    architecture: str | None = None,
    limit: int = 100,
    offset: int = 0,
    task_uuid: str | None = None,
) -> schema.ModelSearch:
    return schema.ModelSearch(taskUUID=task_uuid or new_task_uuid(), search=search, category=category,
                              architecture=architecture, limit=limit, offset=offset)


def model_download(model: str, *, task_uuid: str | None = None) -> schema.ModelDownload:
    return schema.ModelDownload(taskUUID=task_uuid or new_task_uuid(), model=model)


class ModelUploadFields(TypedDict):
    """A modelUpload's fields beside its URL, as keywords: the one list ``model_upload`` and
    ``Client.upload_model`` both take. ``trigger_word``: an embedding's token, the word that stands for it in
    prompts."""

    air: str
    category: str
    architecture: str
    name: str
    version: str
    unique_identifier: str
    type: NotRequired[str | None]
    tags: NotRequired[Sequence[str] | None]
    conditioning: NotRequired[str | None]
    trigger_word: NotRequired[str | None]
    default_steps: NotRequired[int | None]
    default_cfg: NotRequired[float | None]
    default_strength: NotRequired[float | None]
    default_scheduler: NotRequired[str | None]


def model_upload(download_url: str, *, task_uuid: str | None = None,
                 **fields: Unpack[ModelUploadFields]) -> schema.ModelUpload:
    tags = fields.get("tags")
    # category, type and conditioning are checked by the server, which names the values it takes.
    return schema.ModelUpload(
        taskUUID=task_uuid or new_task_uuid(), downloadURL=download_url, air=fields["air"],
        category=fields["category"],  # type: ignore[arg-type]
        architecture=fields["architecture"], format="safetensors", name=fields["name"], version=fields["version"],
        uniqueIdentifier=fields["unique_identifier"], type=fields.get("type"),  # type: ignore[arg-type]
        conditioning=fields.get("conditioning"),  # type: ignore[arg-type]
        positiveTriggerWords=fields.get("trigger_word"), tags=list(tags) if tags is not None else None,
        defaultSteps=fields.get("default_steps"), defaultCFG=fields.get("default_cfg"),
        defaultStrength=fields.get("default_strength"), defaultScheduler=fields.get("default_scheduler"))


# A LoRA or an embedding: its AIR (weight 1), an (AIR, weight) pair, or the schema's struct.
AddOnSpec = str | tuple[str, float] | schema.Lora | schema.Embedding
_Weighted = TypeVar("_Weighted", schema.Lora, schema.Embedding)


def _weighted(kind: type[_Weighted], items: Sequence[AddOnSpec]) -> list[_Weighted] | None:
    chosen = []
    for item in items:
        if isinstance(item, str):
            chosen.append(kind(model=item))
        elif isinstance(item, tuple):
            chosen.append(kind(model=item[0], weight=item[1]))
        else:
            chosen.append(kind(model=item.model, weight=item.weight))
    return chosen or None


def refiner(model: str | schema.Refiner, *, start_step: int | None = None,
            start_percentage: float | None = None) -> schema.Refiner:
    """An SDXL refiner pass: the refiner's AIR, and where it takes over (neither: the server's default)."""
    if isinstance(model, schema.Refiner):
        return model
    return schema.Refiner(model=model, startStep=start_step, startStepPercentage=start_percentage)


def image_inference(
    *,
    model: str,
    positive_prompt: str,
    negative_prompt: str | None = None,
    seed_image: str | None = None,
    strength: float | None = None,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    scheduler: str | None = None,
    seed: int | None = None,
    number_results: int = 1,
    output_type: str | list[str] = "URL",
    output_format: str = "PNG",
    output_quality: int | None = None,
    include_cost: bool = False,
    lora: Sequence[AddOnSpec] = (),
    embeddings: Sequence[AddOnSpec] = (),
    vae: str | None = None,
    clip_skip: int | None = None,
    prompt_weighting: str | None = None,
    refiner: schema.Refiner | None = None,
    mask_image: str | None = None,
    mask_margin: int | None = None,
    outpaint: schema.Outpaint | None = None,
    control_net: Sequence[schema.ControlNet] | None = None,
    check_nsfw: bool = False,
    safety: dict[str, Any] | None = None,
    include_progress: bool = False,
    include_preview: bool = False,
    task_uuid: str | None = None,
) -> schema.ImageInference:
    """An ``imageInference`` task; ``seed_image``, ``mask_image`` and guide images are already in wire form
    (see ``images.image_field``).

    ``lora`` and ``embeddings`` take AIRs (weight 1), ``(AIR, weight)`` pairs or ``schema.Lora`` /
    ``schema.Embedding``; ``refiner`` is built by ``refiner(...)``.
    """
    fields: dict[str, Any] = {
        "negativePrompt": negative_prompt, "seedImage": seed_image, "strength": strength, "width": width,
        "height": height, "steps": steps, "CFGScale": cfg_scale, "scheduler": scheduler, "seed": seed,
        "outputQuality": output_quality, "lora": _weighted(schema.Lora, lora),
        "embeddings": _weighted(schema.Embedding, embeddings), "vae": vae, "clipSkip": clip_skip,
        "promptWeighting": prompt_weighting, "refiner": refiner,
        "maskImage": mask_image, "maskMargin": mask_margin, "outpaint": outpaint,
        "controlNet": list(control_net) if control_net else None, "safety": safety,
        "checkNSFW": check_nsfw or None,
    }
    return schema.ImageInference(
        taskUUID=task_uuid or new_task_uuid(),
        model=model,
        positivePrompt=positive_prompt,
        numberResults=number_results,
        outputType=output_type,  # type: ignore[arg-type]  # not checked here: the server names bad values
        outputFormat=output_format,
        includeCost=include_cost,
        includeProgress=include_progress,
        includePreview=include_preview,
        # Unset fields keep the schema's defaults, which are the server's defaults too.
        **{name: value for name, value in fields.items() if value is not None},
    )


def image_upscale(*, image: str, upscale_factor: float, model: str | None = None, output_type: str | list[str] = "URL",
                  output_format: str = "PNG", output_quality: int | None = None, include_cost: bool = False,
                  task_uuid: str | None = None) -> schema.ImageUpscale:
    """An ``imageUpscale`` task; ``image`` is already in wire form."""
    task = schema.ImageUpscale(
        taskUUID=task_uuid or new_task_uuid(), inputImage=image, upscaleFactor=upscale_factor, model=model,
        outputType=output_type, outputFormat=output_format, includeCost=include_cost)  # type: ignore[arg-type]
    if output_quality is not None:  # unset, it keeps the schema's default, the server's too
        task.outputQuality = output_quality
    return task


def background_removal(*, image: str, model: str | None = None, output_type: str | list[str] = "URL",
                       output_format: str = "PNG", output_quality: int | None = None,
                       settings: dict[str, Any] | None = None, include_cost: bool = False,
                       task_uuid: str | None = None) -> schema.ImageBackgroundRemoval:
    """An ``imageBackgroundRemoval`` task; ``settings`` holds the public API's fields (``rgba``, …)."""
    task = schema.ImageBackgroundRemoval(
        taskUUID=task_uuid or new_task_uuid(), inputImage=image, model=model,
        outputType=output_type, outputFormat=output_format, includeCost=include_cost,  # type: ignore[arg-type]
        settings=msgspec.convert(settings, schema.BackgroundRemovalSettings) if settings else None)
    if output_quality is not None:
        task.outputQuality = output_quality
    return task


def image_caption(*, image: str, model: str | None = None, prompt: str | None = None, include_cost: bool = False,
                  task_uuid: str | None = None) -> schema.ImageCaption:
    return schema.ImageCaption(taskUUID=task_uuid or new_task_uuid(), inputImage=image, model=model, prompt=prompt,
                               includeCost=include_cost)


def prompt_enhance(*, prompt: str, max_length: int = 380, versions: int = 1, model: str | None = None,
                   seed: int | None = None, include_cost: bool = False,
                   task_uuid: str | None = None) -> schema.PromptEnhance:
    return schema.PromptEnhance(taskUUID=task_uuid or new_task_uuid(), prompt=prompt, promptMaxLength=max_length,
                                promptVersions=versions, model=model, seed=seed, includeCost=include_cost)


def controlnet_preprocess(
    *,
    input_image: str,
    preprocessor: str = "canny",
    width: int | None = None,
    height: int | None = None,
    low_threshold: int | None = None,
    high_threshold: int | None = None,
    output_type: str | list[str] = "URL",
    output_format: str = "PNG",
    task_uuid: str | None = None,
) -> schema.ImageControlNetPreProcess:
    """An ``imageControlNetPreProcess`` task; ``input_image`` is already in wire form."""
    fields: dict[str, Any] = {"width": width, "height": height, "lowThresholdCanny": low_threshold,
                              "highThresholdCanny": high_threshold}
    return schema.ImageControlNetPreProcess(
        taskUUID=task_uuid or new_task_uuid(), inputImage=input_image, preProcessorType=preprocessor,
        outputType=output_type,  # type: ignore[arg-type]  # not checked here: the server names bad values
        outputFormat=output_format, **{name: value for name, value in fields.items() if value is not None})


def image_masking(
    *,
    input_image: str,
    model: str,
    confidence: float | None = None,
    max_detections: int | None = None,
    mask_padding: int | None = None,
    mask_blur: int | None = None,
    output_type: str | list[str] = "URL",
    output_format: str = "PNG",
    include_cost: bool = False,
    task_uuid: str | None = None,
) -> schema.ImageMasking:
    """An ``imageMasking`` task; ``input_image`` is already in wire form. Unset settings are left to the server."""
    fields: dict[str, Any] = {"confidence": confidence, "maxDetections": max_detections, "maskPadding": mask_padding,
                              "maskBlur": mask_blur}
    return schema.ImageMasking(
        taskUUID=task_uuid or new_task_uuid(), inputImage=input_image, model=model,
        outputType=output_type,  # type: ignore[arg-type]  # not checked here: the server names bad values
        outputFormat=output_format, includeCost=include_cost,
        **{name: value for name, value in fields.items() if value is not None})
