"""ControlNet pre-processors: guide images made from input images (``imageControlNetPreProcess``, and a
``controlNet[].preprocessor``).

The ones that need no model weights run here, on the CPU, in a worker thread: ``canny`` (OpenCV's
detector, the one canny ControlNets were trained on), ``tile`` (a blurred copy, what tile ControlNets
sharpen back), ``shuffle`` (the picture's content moved by a smooth random warp, for shuffle
ControlNets, the same warp for every picture of a size). The others the public API names need a model
of their own (depth, pose, line-art networks) that this server does not have; they are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import cv2
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class GuideOptions:
    low_threshold: int = 100     # canny's hysteresis thresholds on the gradient magnitude
    high_threshold: int = 200


def canny(image: Image.Image, options: GuideOptions) -> Image.Image:
    """White edges on black, the size of ``image``: every pixel 0 or 255."""
    gray = np.asarray(image.convert("L"))
    edges = cv2.Canny(gray, options.low_threshold, options.high_threshold)
    return Image.fromarray(edges).convert("RGB")


# Tile ControlNets are trained to restore detail to a picture seen at an eighth of its size.
_TILE_FACTOR = 8


def tile(image: Image.Image, options: GuideOptions) -> Image.Image:
    small = image.convert("RGB").resize(
        (max(1, image.width // _TILE_FACTOR), max(1, image.height // _TILE_FACTOR)), Image.Resampling.BOX)
    return small.resize(image.size, Image.Resampling.BICUBIC)


# One warp per picture size, drawn from a fixed seed: a guide image is a function of its input.
_SHUFFLE_SEED = 0
_SHUFFLE_CELL = 256  # pixels per random control point of the warp


def shuffle(image: Image.Image, options: GuideOptions) -> Image.Image:
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    rng = np.random.default_rng(_SHUFFLE_SEED)
    map_x = _smooth_noise(rng, height, width) * float(width - 1)
    map_y = _smooth_noise(rng, height, width) * float(height - 1)
    return Image.fromarray(cv2.remap(pixels, map_x, map_y, interpolation=cv2.INTER_LINEAR))


def _smooth_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Values in [0, 1] that vary smoothly over a few hundred pixels."""
    coarse = rng.random((height // _SHUFFLE_CELL + 2, width // _SHUFFLE_CELL + 2)).astype(np.float32)
    fine = cv2.resize(coarse, (width + 2 * _SHUFFLE_CELL, height + 2 * _SHUFFLE_CELL), interpolation=cv2.INTER_CUBIC)
    fine = fine[_SHUFFLE_CELL : _SHUFFLE_CELL + height, _SHUFFLE_CELL : _SHUFFLE_CELL + width]
    low, high = float(fine.min()), float(fine.max())
    return np.ascontiguousarray((fine - low) / max(high - low, 1e-6), dtype=np.float32)


Preprocess = Callable[[Image.Image, GuideOptions], Image.Image]

# The pre-processors run here, by the public API's names (and the Python SDK's for the same ones).
PREPROCESSORS: Mapping[str, Preprocess] = MappingProxyType({
    "canny": canny,
    "tile": tile,
    "tile_gaussian": tile,
    "shuffle": shuffle,
})
# The public API's other pre-processors: each needs a model of its own.
NEEDS_WEIGHTS: frozenset[str] = frozenset({
    "depth", "depth_leres", "depth_midas", "depth_zoe", "mlsd", "normalbae", "normal_bae", "openpose",
    "openpose_face", "openpose_faceonly", "openpose_full", "openpose_hand", "seg", "seg_ofade20k", "seg_ofcoco",
    "seg_ufade20k", "lineart", "lineart_anime", "lineart_coarse", "lineart_realistic", "lineart_standard",
    "scribble", "scribble_hed", "scribble_pidinet", "softedge", "softedge_hed", "softedge_hedsafe",
    "softedge_pidinet", "softedge_pidisafe", "inpaint_global_harmonious",
})
# The newer SDK names a pre-processor as a model: runware:controlnet-preprocess@canny.
MODEL_PREFIX = "runware:controlnet-preprocess@"


def names() -> list[str]:
    return [name for name in PREPROCESSORS if name != "tile_gaussian"]


def preprocessor_name(value: str) -> str:
    """``canny``, ``Canny``, ``runware:controlnet-preprocess@lineart-anime`` → ``canny``, ``lineart_anime``."""
    text = value.strip()
    if text.lower().startswith(MODEL_PREFIX):
        text = text[len(MODEL_PREFIX):]
    return text.lower().replace("-", "_")


def problem(name: str) -> str | None:
    """Why the pre-processor ``name`` (as ``preprocessor_name`` spells it) cannot run here; None when it can."""
    if name in PREPROCESSORS:
        return None
    supported = ", ".join(names())
    if name in NEEDS_WEIGHTS:
        return (f"needs model weights of its own, which this server does not have; the pre-processors it runs "
                f"are {supported}")
    return f"is not a ControlNet pre-processor; the ones this server runs are {supported}"


def fit_within(image: Image.Image, width: int | None, height: int | None) -> Image.Image:
    """``image`` scaled down (never up) to at most ``width`` × ``height``; a missing side keeps the aspect."""
    scale = min(width / image.width if width else 1.0, height / image.height if height else 1.0, 1.0)
    if scale >= 1.0:
        return image
    if width and height:
        size = (min(width, image.width), min(height, image.height))
    else:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)
