"""The image formats this server reads and writes: one row per format, every name it goes by.

Inference results, stored files, data URIs, HTTP responses and input checks all look formats up
here, so a format's extension or media type is written down exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class ImageFormat:
    name: str         # as clients write it (outputFormat) and messages show it
    pil: str          # Pillow's name for it
    extension: str    # of stored files and imageURLs
    media_type: str   # Content-Type and data URI type
    output: bool      # results can be written in it (and so it can be stored)
    inference: bool   # accepted as an input image of inference, not only of an upload


FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("JPG", "JPEG", "jpg", "image/jpeg", output=True, inference=True),
    ImageFormat("PNG", "PNG", "png", "image/png", output=True, inference=True),
    ImageFormat("WEBP", "WEBP", "webp", "image/webp", output=True, inference=True),
    ImageFormat("BMP", "BMP", "bmp", "image/bmp", output=False, inference=False),
    ImageFormat("GIF", "GIF", "gif", "image/gif", output=False, inference=False),
)

# outputFormat values, upper-cased; "JPEG" is what many clients write for JPG.
OUTPUT_FORMATS: Mapping[str, ImageFormat] = MappingProxyType(
    {fmt.name: fmt for fmt in FORMATS if fmt.output} | {"JPEG": FORMATS[0]})
OUTPUT_FORMAT_NAMES: tuple[str, ...] = tuple(fmt.name for fmt in FORMATS if fmt.output)
# What is stored is what can be written: its extension names the format.
STORED_BY_EXTENSION: Mapping[str, ImageFormat] = MappingProxyType(
    {fmt.extension: fmt for fmt in FORMATS if fmt.output})
BY_PIL: Mapping[str, ImageFormat] = MappingProxyType({fmt.pil: fmt for fmt in FORMATS})

# Input formats by Pillow name, as input checks and their messages name them.
INFERENCE_INPUTS: frozenset[str] = frozenset(fmt.pil for fmt in FORMATS if fmt.inference)
UPLOAD_INPUTS: frozenset[str] = frozenset(fmt.pil for fmt in FORMATS)


def output_format(name: str) -> ImageFormat | None:
    """The format an ``outputFormat`` value names (any case), or None."""
    return OUTPUT_FORMATS.get(name.upper())
