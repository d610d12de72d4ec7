"""Images for the tests that compare them at a fixed seed: made by the diffusers engine directly or by a server
through the Python SDK, and the measures they are compared by."""

from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tests.engines import Collect
from tests.wire import API_KEY

if TYPE_CHECKING:
    from imagewire.server.engine import DiffusersEngine
    from imagewire.tasks.jobs import InferenceJob


def images(engine: DiffusersEngine, *jobs: InferenceJob) -> list[np.ndarray]:
    """Run ``jobs`` in one engine call (they must share a batch key); the first image of each, as signed integers so
    that differences do not wrap."""
    made = Collect(len(jobs))
    engine.run(list(jobs), made)
    return [np.asarray(made.results[index][0].image).astype(int) for index in range(len(jobs))]


def image(engine: DiffusersEngine, job: InferenceJob) -> np.ndarray:
    return images(engine, job)[0]


def difference(first: Any, second: Any) -> int:
    """The largest difference of one pixel's channel between two images (arrays or PIL images): a feature that acts
    moves some pixel far; rounding, a level or two."""
    return int(np.abs(np.asarray(first, dtype=int) - np.asarray(second, dtype=int)).max())


def psnr(first: Any, second: Any) -> float:
    """Peak signal-to-noise ratio (dB) of two 8-bit images (arrays or PIL images): infinite when they are equal."""
    error = np.mean((np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)) ** 2)
    return math.inf if error == 0 else 10 * math.log10(255**2 / error)


def decoded(png: bytes) -> np.ndarray:
    """An image file's RGB pixels, as signed integers."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def pixels(item: dict[str, Any]) -> np.ndarray:
    """The pixels of an answer item's ``imageBase64Data``."""
    return decoded(base64.b64decode(item["imageBase64Data"]))


async def generate(server: Any, model: str, *, steps: int = 2, seed: int = 11) -> bytes:
    """``model``'s PNG of one fixed prompt, made by ``server`` through the Python SDK."""
    from runware import IImageInference, Runware

    client = Runware(api_key=API_KEY, url=server.url)
    await client.connect()
    try:
        [made] = await client.imageInference(requestImage=IImageInference(
            model=model, positivePrompt="a lighthouse at dawn", width=128, height=128, steps=steps, seed=seed,
            outputType="base64Data", outputFormat="PNG"))
        return base64.b64decode(made.imageBase64Data)
    finally:
        await client.disconnect()
