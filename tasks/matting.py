"""From a segmentation mask to the picture a background removal answers: the mask's clean-up
(``postProcessMask``), edge refinement (``alphaMatting``) and the composition with the background colour
(``rgba``). Pure functions on PIL images and numpy arrays, run in a thread: no device work.

Alpha matting here is a trimap and a guided filter: pixels the mask is sure of (above the foreground
threshold, below the background threshold, each region shrunk by the erode size) keep their value; in
the band between them the alpha follows the picture's own edges (He, Sun and Tang's guided filter, with
the picture as guide), which recovers soft boundaries such as hair that a low-resolution mask blurs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

TRANSPARENT = (0, 0, 0, 0.0)


@dataclass(frozen=True)
class MattingSettings:
    """The background removal ``settings`` of the public API, with its defaults."""

    rgba: tuple[int, int, int, float] | None = None   # None: transparent
    post_process_mask: bool = False
    return_only_mask: bool = False
    alpha_matting: bool = False
    foreground_threshold: int = 240
    background_threshold: int = 10
    erode_size: int = 10


def post_process(mask: Image.Image) -> Image.Image:
    """A cleaner mask: specks removed (a morphological opening), then edges smoothed and made crisp."""
    opened = mask.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))
    return opened.filter(ImageFilter.GaussianBlur(2)).point(lambda value: 255 if value >= 128 else 0)


def _box_mean(values: np.ndarray, radius: int) -> np.ndarray:
    """The mean over a (2r+1)² window around each pixel, windows cut at the borders (summed-area table)."""
    height, width = values.shape
    table = np.zeros((height + 1, width + 1), dtype=np.float64)
    table[1:, 1:] = values.cumsum(0).cumsum(1)
    rows, cols = np.arange(height), np.arange(width)
    top, bottom = np.clip(rows - radius, 0, height), np.clip(rows + radius + 1, 0, height)
    left, right = np.clip(cols - radius, 0, width), np.clip(cols + radius + 1, 0, width)
    sums = (table[bottom][:, right] - table[top][:, right] - table[bottom][:, left] + table[top][:, left])
    counts = (bottom - top)[:, None] * (right - left)[None, :]
    return sums / counts


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float = 1e-3) -> np.ndarray:
    """``source`` smoothed where ``guide`` is flat and kept sharp where ``guide`` has edges (both in 0–1)."""
    mean_guide, mean_source = _box_mean(guide, radius), _box_mean(source, radius)
    covariance = _box_mean(guide * source, radius) - mean_guide * mean_source
    variance = _box_mean(guide * guide, radius) - mean_guide * mean_guide
    slope = covariance / (variance + eps)
    offset = mean_source - slope * mean_guide
    return _box_mean(slope, radius) * guide + _box_mean(offset, radius)


def _eroded(region: np.ndarray, size: int) -> np.ndarray:
    if size <= 1:
        return region
    picture = Image.fromarray(region.astype(np.uint8) * 255)
    return np.asarray(picture.filter(ImageFilter.MinFilter(size | 1))) > 127


def alpha_matting(image: Image.Image, mask: Image.Image, settings: MattingSettings) -> Image.Image:
    """The mask refined along the picture's edges in the band the mask is unsure of."""
    alpha = np.asarray(mask, dtype=np.float64) / 255
    levels = alpha * 255
    sure_foreground = _eroded(levels > settings.foreground_threshold, settings.erode_size)
    sure_background = _eroded(levels < settings.background_threshold, settings.erode_size)
    guide = np.asarray(image.convert("L"), dtype=np.float64) / 255
    refined = np.clip(guided_filter(guide, alpha, radius=max(2, settings.erode_size)), 0, 1)
    refined[sure_foreground] = 1.0
    refined[sure_background] = 0.0
    return Image.fromarray(np.round(refined * 255).astype(np.uint8))


def compose(image: Image.Image, mask: Image.Image, settings: MattingSettings, *, keeps_alpha: bool) -> Image.Image:
    """The answer picture: the mask alone, or the subject over the background colour.

    With an output format that keeps alpha (PNG, WEBP) the background is ``rgba`` (transparent by
    default); with one that does not (JPG) it is ``rgba``'s colour, opaque (white by default).
    """
    if settings.post_process_mask:
        mask = post_process(mask)
    if settings.alpha_matting:
        mask = alpha_matting(image, mask, settings)
    if settings.return_only_mask:
        return mask
    red, green, blue, opacity = settings.rgba or ((0, 0, 0, 0.0) if keeps_alpha else (255, 255, 255, 1.0))
    if not keeps_alpha:
        opacity = 1.0
    if opacity == 0:
        cutout = image.convert("RGBA")
        cutout.putalpha(mask)
        return cutout
    foreground = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    alpha = (np.asarray(mask, dtype=np.float64) / 255)[..., None]
    background = np.array([red, green, blue], dtype=np.float64) / 255
    # The subject "over" the background: alphas combine, colours mix in proportion to what each shows.
    out_alpha = alpha + opacity * (1 - alpha)
    colour = (foreground * alpha + background * opacity * (1 - alpha)) / np.maximum(out_alpha, 1e-6)
    pixels = np.concatenate([colour, out_alpha], axis=-1)
    composed = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))  # 4 channels: RGBA
    return composed if keeps_alpha else composed.convert("RGB")
