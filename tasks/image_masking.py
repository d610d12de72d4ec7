"""imageMasking: a mask of the faces, hands or people in a picture, for inpainting them (the mask's UUID goes
unchanged into an imageInference's ``maskImage``), with the box of each one found.

``model`` names what is looked for, as the public API's ``runware:35@N`` ids do. Those ids name YOLOv8
(ultralytics, AGPL-3.0) and MediaPipe detectors; an AGPL library cannot be a dependency of this server, so
every id is served by one open-vocabulary detector from ``transformers`` with Apache-2.0 weights (OWL-ViT,
OWLv2), asked for "a human face", "a human hand" or "a person". Which catalog model that is, is the entry with
the alias ``default-masking-detector`` (the embedded tiny detector as shipped, like the other tools' defaults;
an operator's catalog file gives ``imagewire:owlv2-base@1`` or another detector that alias). The face-mesh
ids (eyes, nose, lips) have no box detector to stand for them and are refused.

1. ``prepare``: the id, the settings (top level or ``settings``, the page's defaults), the output; no I/O.
2. ``run``: the device scores every candidate box and keeps the best ``maxDetections`` above ``confidence``
   (``server/engine/masking.py``); the mask is drawn here, in a thread, at the input's size: white inside the
   boxes grown by ``maskPadding``, fading to black over ``maskBlur`` more pixels.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imagewire.air_registry import ModelEntry
from imagewire.tasks import inputs, tools
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter
from imagewire.tasks.jobs import Job
from imagewire.tasks.outputs import ImageOutput, cost, image_output, store_image
from imagewire.tasks.schema import Detection, ImageMasking, MaskImageResult, MaskingSettings
from imagewire.tasks.task_type import TaskType, name_of

TASK = "imageMasking"
DETECTOR = "default-masking-detector"

# What each public id looks for, and the words the open-vocabulary detector is asked with.
QUERIES = {"face": "a photo of a human face", "hand": "a photo of a human hand", "person": "a photo of a person"}
TARGETS: dict[str, str] = {
    "runware:35@1": "face",     # face_yolov8n
    "runware:35@2": "face",     # face_yolov8s
    "runware:35@3": "hand",     # hand_yolov8n
    "runware:35@4": "person",   # person_yolov8n-seg
    "runware:35@5": "person",   # person_yolov8s-seg
    "runware:35@6": "face",     # mediapipe_face_full
    "runware:35@7": "face",     # mediapipe_face_short
    "runware:35@8": "face",     # mediapipe_face_mesh (its face box)
}
# Face-mesh parts: landmarks, not boxes, so no box detector stands for them.
MESH_PARTS: dict[str, str] = {
    "runware:35@9": "eyes", "runware:35@15": "eyes", "runware:35@13": "nose", "runware:35@14": "lips",
    "runware:35@10": "eyes and lips", "runware:35@11": "nose and eyes", "runware:35@12": "nose and lips",
}

# The page's defaults.
DEFAULT_CONFIDENCE = 0.25
DEFAULT_MAX_DETECTIONS = 6
DEFAULT_MASK_PADDING = 4
DEFAULT_MASK_BLUR = 4


@dataclass(frozen=True)
class Box:
    """A detection in pixels of the input, its edges as the detector gave them (not rounded)."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    score: float


@dataclass(frozen=True)
class Detections:
    """The device's answer for one picture: the boxes kept, best first."""

    boxes: tuple[Box, ...]
    seconds: float   # device time spent on it, for includeCost


@dataclass(kw_only=True)
class MaskingJob(Job):
    """The device's part: score the candidate boxes of one picture for one query."""

    model: ModelEntry
    weights: Path
    image: Image.Image  # RGB
    query: str          # what the detector is asked to find
    confidence: float   # boxes scoring at or below it are dropped
    max_detections: int

    def batch_key(self) -> Hashable:
        """A detector sees every picture at its own input size: pictures asked the same query batch together."""
        return (self.model.air, self.query)


@dataclass(frozen=True)
class Settings:
    confidence: float
    max_detections: int
    padding: int
    blur: int


@dataclass(frozen=True)
class Prepared:
    task: ImageMasking
    detector: ModelEntry
    target: str
    image: str
    image_parameter: str
    settings: Settings
    output: ImageOutput


def target(model: str) -> str:
    """What the ``model`` id looks for (``face``, ``hand``, ``person``)."""
    supported = list(TARGETS)
    name = model.strip().lower()
    if name in TARGETS:
        return TARGETS[name]
    if name in MESH_PARTS:
        raise InvalidParameter(
            f"model {model!r} ({MESH_PARTS[name]}, from a face mesh) is not supported: this server finds faces, "
            f"hands and people as boxes. Supported: {', '.join(supported)}.",
            parameter="model", type="string", allowed_values=supported)
    raise InvalidParameter(
        f"Invalid model: expected one of {', '.join(supported)} (faces: @1, @2, @6, @7, @8; hands: @3; "
        f"people: @4, @5); received {model!r}.", parameter="model", type="string", allowed_values=supported)


# Wire name → (Settings field, the page's default)
_SETTINGS = {"confidence": ("confidence", DEFAULT_CONFIDENCE),
             "maxDetections": ("max_detections", DEFAULT_MAX_DETECTIONS),
             "maskPadding": ("padding", DEFAULT_MASK_PADDING), "maskBlur": ("blur", DEFAULT_MASK_BLUR)}
assert set(_SETTINGS) == set(MaskingSettings.__struct_fields__)


def masking_settings(task: ImageMasking) -> Settings:
    """The settings sent at the top level or in ``settings`` (once, or the same in both), else the page's."""
    chosen: dict[str, Any] = {}
    for wire_name, (attribute, fallback) in _SETTINGS.items():
        top = getattr(task, wire_name)
        nested = getattr(task.settings, wire_name) if task.settings is not None else None
        if top is not None and nested is not None and top != nested:
            raise InvalidParameter(
                f"{wire_name} and settings.{wire_name} disagree ({top!r} and {nested!r}); send it once.",
                parameter=f"settings.{wire_name}")
        value = nested if nested is not None else top
        chosen[attribute] = value if value is not None else fallback
    return Settings(**chosen)


def prepare(task: ImageMasking, ctx: TaskContext) -> Prepared:
    image, parameter = tools.input_image_field(task, purpose="mask")
    found = target(task.model)
    detector = inputs.model(ctx, DETECTOR, task=TASK)
    return Prepared(task=task, detector=detector, target=found, image=image, image_parameter=parameter,
                    settings=masking_settings(task), output=image_output(task, ctx))


def pixel_boxes(boxes: Sequence[Box], width: int, height: int) -> list[Detection]:
    """The detections as whole pixels of a ``width`` × ``height`` picture: each box widened to the pixels it
    touches and cut to the picture; boxes with nothing inside the picture are left out."""
    found = []
    for box in boxes:
        x_min, y_min = max(0, math.floor(box.x_min)), max(0, math.floor(box.y_min))
        x_max, y_max = min(width, math.ceil(box.x_max)), min(height, math.ceil(box.y_max))
        if x_min < x_max and y_min < y_max:
            found.append(Detection(x_min=x_min, y_min=y_min, x_max=x_max, y_max=y_max,
                                   confidence=round(box.score, 4)))
    return found


def draw_mask(width: int, height: int, detections: Sequence[Detection], padding: int, blur: int) -> Image.Image:
    """The mask (mode ``L``): 255 inside every box grown by ``padding`` pixels on each side; outside, a pixel
    at distance d from the nearest grown box is 255 × (1 − d / (blur + 1)) while that is positive, so the
    white area fades to black over ``blur`` pixels; 0 beyond."""
    grown = [(max(0, box.x_min - padding), max(0, box.y_min - padding),
              min(width, box.x_max + padding), min(height, box.y_max + padding)) for box in detections]
    if blur == 0:
        mask = np.zeros((height, width), dtype=np.uint8)
        for x_min, y_min, x_max, y_max in grown:
            mask[y_min:y_max, x_min:x_max] = 255
        return Image.fromarray(mask, "L")
    columns = np.arange(width, dtype=np.float32)
    rows = np.arange(height, dtype=np.float32)
    # Squared distance, in whole pixels, from each pixel to the nearest grown box (0 inside one).
    nearest = np.full((height, width), np.inf, dtype=np.float32)
    for x_min, y_min, x_max, y_max in grown:
        across = np.maximum(np.maximum(x_min - columns, columns - (x_max - 1)), 0)
        down = np.maximum(np.maximum(y_min - rows, rows - (y_max - 1)), 0)
        np.minimum(nearest, down[:, None] ** 2 + across[None, :] ** 2, out=nearest)
    level = np.clip(1 - np.sqrt(nearest) / (blur + 1), 0, 1)
    return Image.fromarray(np.rint(level * 255).astype(np.uint8), "L")


async def run(prepared: Prepared, ctx: TaskContext) -> AsyncIterator[MaskImageResult]:
    task, settings = prepared.task, prepared.settings
    weights = await inputs.weights(ctx, prepared.detector)
    source = await tools.input_image(ctx, prepared.image, prepared.image_parameter)
    source_uuid = await tools.input_image_uuid(ctx, prepared.image, source)
    job = MaskingJob(task_uuid=task.taskUUID, owner=ctx.owner, model=prepared.detector, weights=weights,
                     image=source.image, query=QUERIES[prepared.target], confidence=settings.confidence,
                     max_detections=settings.max_detections)
    width, height = source.image.size
    found: Detections
    async for found in tools.results(ctx, job):
        detections = pixel_boxes(found.boxes, width, height)
        with ctx.timed("mask"):
            mask = await asyncio.to_thread(draw_mask, width, height, detections, settings.padding, settings.blur)
        stored = await store_image(ctx, mask, prepared.output)
        yield MaskImageResult(
            taskType=name_of(task), taskUUID=task.taskUUID, maskImageUUID=stored.uuid, detections=detections,
            inputImageUUID=source_uuid, maskImageURL=stored.url, maskImageBase64Data=stored.base64_data,
            maskImageDataURI=stored.data_uri, uploaded=stored.uploaded,
            cost=cost(ctx, found.seconds) if task.includeCost else None)


TASK_TYPE = TaskType(struct=ImageMasking, prepare=prepare, run=run, delivery=tools.delivery)
