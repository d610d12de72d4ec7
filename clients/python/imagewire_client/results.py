"""Typed results handed to callers, converted from the server's answer items."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import msgspec

from imagewire_client import schema
from imagewire_client.errors import INVALID_RESPONSE, ImagewireError

ModelInfo = schema.ModelInfo
ModelDownloadResult = schema.ModelDownloadResult


@dataclass(frozen=True)
class ImageResult:
    """One generated image.

    ``image_url`` is set when ``URL`` output was asked for; ``image_bytes`` holds the encoded
    image (PNG, JPEG or WEBP as requested) when ``base64Data`` or ``dataURI`` output was.
    ``cost`` is set only with ``include_cost=True``.
    """

    task_uuid: str
    image_uuid: str
    seed: int | None = None
    image_url: str | None = None
    image_bytes: bytes | None = None
    image_data_uri: str | None = None
    cost: float | None = None
    nsfw_content: bool | None = None
    input_image_uuid: str | None = None   # of upscale and background removal results: the input's UUID


@dataclass(frozen=True)
class GuideImage:
    """A ControlNet guide image made by the server: pass ``uuid`` as a ControlNet's ``guide_image``."""

    task_uuid: str
    uuid: str
    input_image_uuid: str | None = None
    url: str | None = None
    image_bytes: bytes | None = None


@dataclass(frozen=True)
class Detection:
    """A face, hand or person found: its box's edges in pixels of the input (``x_min <= x < x_max``)."""

    x_min: int
    y_min: int
    x_max: int
    y_max: int
    confidence: float


@dataclass(frozen=True)
class MaskImage:
    """A mask made by the server (white where something was found): pass ``uuid`` as ``mask_image``."""

    task_uuid: str
    uuid: str
    detections: list[Detection]
    input_image_uuid: str | None = None
    url: str | None = None
    image_bytes: bytes | None = None
    cost: float | None = None


@dataclass(frozen=True)
class UploadedImage:
    """An image stored on the server: pass ``uuid`` wherever a task takes an image."""

    uuid: str
    url: str


def _convert(item: dict[str, Any], kind: type[Any]) -> Any:
    try:
        return msgspec.convert(item, kind)
    except msgspec.ValidationError as exc:
        raise ImagewireError(
            INVALID_RESPONSE, f"The server sent an answer this client cannot read: {exc}.",
            task_uuid=item.get("taskUUID"), task_type=item.get("taskType"),
        ) from exc


def _decode_base64(text: str, task_uuid: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImagewireError(INVALID_RESPONSE, "The server sent image data that is not valid base64.",
                             task_uuid=task_uuid) from exc


def _image_bytes(base64_data: str | None, data_uri: str | None, task_uuid: str) -> bytes | None:
    """An answer's image, from its base64 data or its data URI, whichever came (None: only a URL)."""
    if base64_data:
        return _decode_base64(base64_data, task_uuid)
    if data_uri and "," in data_uri:
        return _decode_base64(data_uri.split(",", 1)[1], task_uuid)
    return None


def image_result(item: dict[str, Any]) -> ImageResult:
    wire: schema.ImageResult = _convert(item, schema.ImageResult)
    image_bytes = _image_bytes(wire.imageBase64Data, wire.imageDataURI, wire.taskUUID)
    return ImageResult(
        task_uuid=wire.taskUUID, image_uuid=wire.imageUUID, seed=wire.seed, image_url=wire.imageURL,
        image_bytes=image_bytes, image_data_uri=wire.imageDataURI, cost=wire.cost, nsfw_content=wire.NSFWContent,
        input_image_uuid=wire.inputImageUUID,
    )


def guide_image(item: dict[str, Any]) -> GuideImage:
    wire: schema.GuideImageResult = _convert(item, schema.GuideImageResult)
    data = _image_bytes(wire.guideImageBase64Data, wire.guideImageDataURI, wire.taskUUID)
    return GuideImage(task_uuid=wire.taskUUID, uuid=wire.guideImageUUID, input_image_uuid=wire.inputImageUUID,
                      url=wire.guideImageURL, image_bytes=data)


def mask_image(item: dict[str, Any]) -> MaskImage:
    wire: schema.MaskImageResult = _convert(item, schema.MaskImageResult)
    data = _image_bytes(wire.maskImageBase64Data, wire.maskImageDataURI, wire.taskUUID)
    detections = [Detection(x_min=found.x_min, y_min=found.y_min, x_max=found.x_max, y_max=found.y_max,
                            confidence=found.confidence) for found in wire.detections]
    return MaskImage(task_uuid=wire.taskUUID, uuid=wire.maskImageUUID, detections=detections,
                     input_image_uuid=wire.inputImageUUID, url=wire.maskImageURL, image_bytes=data, cost=wire.cost)


def uploaded_image(item: dict[str, Any]) -> UploadedImage:
    wire: schema.UploadResult = _convert(item, schema.UploadResult)
    return UploadedImage(uuid=wire.imageUUID, url=wire.imageURL)


def model_infos(item: dict[str, Any]) -> list[ModelInfo]:
    wire: schema.ModelSearchResult = _convert(item, schema.ModelSearchResult)
    return wire.results


@dataclass(frozen=True)
class TextResult:
    """A caption, or one version of an enhanced prompt; ``cost`` only with ``include_cost=True``."""

    task_uuid: str
    text: str
    cost: float | None = None


def text_result(item: dict[str, Any]) -> TextResult:
    wire: schema.TextResult = _convert(item, schema.TextResult)
    return TextResult(task_uuid=wire.taskUUID, text=wire.text, cost=wire.cost)


UPLOAD_PHASES = 5  # validated, downloaded, optimized, stored, ready


def upload_phase(item: dict[str, Any]) -> str:
    """The phase a modelUpload answer says is done."""
    wire: schema.ModelUploadResult = _convert(item, schema.ModelUploadResult)
    return wire.status


def download_progress(item: dict[str, Any]) -> tuple[int, int]:
    """A ``downloading`` answer of modelDownload: ``(bytes done, bytes in all)``."""
    wire: schema.ModelDownloadResult = _convert(item, schema.ModelDownloadResult)
    return wire.bytesDone, wire.bytesTotal


def downloaded_model(item: dict[str, Any]) -> ModelDownloadResult:
    """modelDownload's last answer, which says the model is there (status ``ready``)."""
    wire: ModelDownloadResult = _convert(item, schema.ModelDownloadResult)
    if wire.status != "ready":
        raise ImagewireError(INVALID_RESPONSE, f"modelDownload of {wire.air} ended on status {wire.status!r}, "
                             "not 'ready'.", task_uuid=wire.taskUUID, task_type="modelDownload")
    return wire
