"""From a mask to the background removal's picture: transparency, the background colour, the mask alone,
its clean-up and alpha matting (pure: PIL images and numpy, no model)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from imagewire.tasks.matting import MattingSettings, alpha_matting, compose, guided_filter, post_process


def scene() -> tuple[Image.Image, Image.Image]:
    """A red square on grey, and a soft mask of it (blurred edges, as a low-resolution network gives)."""
    image = Image.new("RGB", (40, 40), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((10, 10, 29, 29), fill=(230, 20, 20))
    mask = Image.new("L", (40, 40), 0)
    ImageDraw.Draw(mask).rectangle((10, 10, 29, 29), fill=255)
    from PIL import ImageFilter

    return image, mask.filter(ImageFilter.GaussianBlur(3))


def test_a_transparent_background_keeps_the_pixels_and_takes_the_mask_as_alpha() -> None:
    image, mask = scene()
    cutout = compose(image, mask, MattingSettings(), keeps_alpha=True)
    assert cutout.mode == "RGBA" and cutout.size == image.size
    assert cutout.getchannel("A").tobytes() == mask.tobytes()
    assert cutout.convert("RGB").tobytes() == image.tobytes()


def test_an_rgba_colour_shows_where_the_subject_does_not() -> None:
    image, mask = scene()
    blue = compose(image, mask, MattingSettings(rgba=(0, 0, 255, 1.0)), keeps_alpha=True)
    assert blue.getchannel("A").getextrema() == (255, 255)
    assert blue.getpixel((0, 0)) == (0, 0, 255, 255) and blue.getpixel((20, 20))[:3] == (230, 20, 20)
    half = compose(image, mask, MattingSettings(rgba=(0, 0, 255, 0.5)), keeps_alpha=True)
    assert half.getpixel((0, 0)) == (0, 0, 255, 128)


def test_without_alpha_the_background_is_the_colour_opaque_white_by_default() -> None:
    image, mask = scene()
    white = compose(image, mask, MattingSettings(), keeps_alpha=False)
    assert white.mode == "RGB" and white.getpixel((0, 0)) == (255, 255, 255)
    green = compose(image, mask, MattingSettings(rgba=(0, 255, 0, 0.0)), keeps_alpha=False)
    assert green.getpixel((0, 0)) == (0, 255, 0) and green.getpixel((20, 20)) == (230, 20, 20)


def test_return_only_mask_answers_the_mask() -> None:
    image, mask = scene()
    assert compose(image, mask, MattingSettings(return_only_mask=True), keeps_alpha=True).tobytes() == mask.tobytes()


def test_post_processing_makes_the_mask_crisp_and_drops_specks() -> None:
    _, mask = scene()
    speckled = mask.copy()
    speckled.putpixel((2, 2), 255)
    cleaned = post_process(speckled)
    assert set(np.unique(np.asarray(cleaned))) <= {0, 255}
    assert cleaned.getpixel((2, 2)) == 0 and cleaned.getpixel((20, 20)) == 255


def test_alpha_matting_keeps_what_the_mask_is_sure_of_and_follows_the_pictures_edges_between() -> None:
    image, mask = scene()
    settings = MattingSettings(alpha_matting=True, foreground_threshold=240, background_threshold=10, erode_size=3)
    refined = np.asarray(alpha_matting(image, mask, settings), dtype=np.int32)
    original = np.asarray(mask, dtype=np.int32)
    assert refined[20, 20] == 255 and refined[0, 0] == 0
    # The picture's edge is sharp where the mask's is blurred: the refined alpha is closer to a hard edge.
    hard = np.zeros((40, 40), dtype=np.int32)
    hard[10:30, 10:30] = 255
    assert np.abs(refined - hard).sum() < np.abs(original - hard).sum()


def test_the_guided_filter_smooths_flat_regions_and_keeps_edges() -> None:
    noisy = np.random.default_rng(0).random((30, 30))
    flat_guide = np.full((30, 30), 0.5)
    assert guided_filter(flat_guide, noisy, radius=3).std() < noisy.std() / 2
    edge = np.zeros((30, 30))
    edge[:, 15:] = 1.0
    kept = guided_filter(edge, edge, radius=3, eps=1e-6)
    assert np.abs(kept - edge).max() < 0.01
