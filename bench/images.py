"""Synthetic test pictures: smooth gradients with mild grain, compressing roughly like a photograph.

Pure noise would make every PNG as large as the raw pixels and every encoder look slow; a flat
colour would make them all look free. Built with numpy from a fixed seed, so every run sends the
same bytes.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

_CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg"}


def test_picture(size: int, seed: int = 7) -> Image.Image:
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    x, y = np.meshgrid(axis, axis)
    red = 0.5 + 0.5 * np.sin(6.0 * x + 2.0 * y)
    green = 0.5 + 0.5 * np.cos(4.0 * y - 3.0 * x * y)
    blue = 0.5 + 0.5 * np.sin(9.0 * (x - 0.5) ** 2 + 7.0 * (y - 0.5) ** 2)
    grain = np.random.default_rng(seed).normal(0.0, 0.04, (size, size, 3)).astype(np.float32)
    pixels = np.clip(np.stack([red, green, blue], axis=-1) + grain, 0.0, 1.0)
    return Image.fromarray((pixels * 255).astype(np.uint8), "RGB")


def encoded(image: Image.Image, image_format: str) -> bytes:
    """``image`` as a client would send it: PNG at the default level, JPEG at quality 90."""
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format=image_format)
    return buffer.getvalue()


def data_uri(data: bytes, image_format: str) -> str:
    return f"data:{_CONTENT_TYPES[image_format]};base64,{base64.b64encode(data).decode('ascii')}"
