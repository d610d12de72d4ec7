"""The canvas of an edit, without a server: outpainting's extension, the paste-back through the mask, and
the results of a mask with nothing to repaint, which never reach the device."""

from __future__ import annotations

import numpy as np
from PIL import Image

from imagewire.tasks import canvas
from imagewire.tasks.jobs import GeneratedImage
from tests.contexts import pure_context


def picture(size: tuple[int, int], value: int) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


def test_outpainting_extends_the_edge_pixels_and_masks_only_the_extension() -> None:
    seed = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint32).reshape(64, 64, 3).astype(np.uint8))
    extended, mask = canvas.outpainted(seed, (64, 64), (8, 0, 0, 16), blur=0)
    assert extended.size == mask.size == (80, 72)
    pixels, seen = np.asarray(extended), np.asarray(seed)
    assert np.array_equal(pixels[8:, 16:], seen)
    assert np.array_equal(pixels[8:, 0], seen[:, 0]) and np.array_equal(pixels[0, 16:], seen[0])
    values = np.asarray(mask)
    assert (values[8:, 16:] == 0).all() and (values[:8] == 255).all() and (values[:, :16] == 255).all()
    _, blurred = canvas.outpainted(seed, (64, 64), (8, 0, 0, 16), blur=4)
    ramp = np.asarray(blurred)[8:, 16:]
    assert ramp[0, 20] == 255 and 0 < ramp[1, 20] < 255 and ramp[40, 40] == 0


def test_pixels_outside_the_mask_come_back_exactly() -> None:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    scene = canvas.Scene(width=64, height=64, init_image=None, canvas=picture((64, 64), 10),
                         alpha=canvas.blend_weights(mask))
    pasted = np.asarray(canvas.paste_back(scene, picture((64, 64), 200)))
    keep = np.asarray(mask) == 0
    assert (pasted[keep] == 10).all()
    edge = canvas.EDGE_PIXELS
    assert (pasted[16 + edge : 48 - edge, 16 + edge : 48 - edge] == 200).all()


async def test_without_a_canvas_the_pictures_pass_as_made_and_nothing_is_timed() -> None:
    ctx = pure_context()
    chunk = [GeneratedImage(0, 5, picture((32, 32), 1), 0.5)]
    scene = canvas.Scene(width=32, height=32, init_image=None)
    assert await canvas.paste_back_all(ctx, scene, chunk) == chunk
    assert "paste" not in ctx.timings


async def test_a_mask_with_nothing_to_repaint_gives_the_canvas_for_each_seed_without_the_device() -> None:
    seed_image = picture((32, 32), 7)
    scene = canvas.Scene(width=32, height=32, init_image=seed_image, canvas=seed_image,
                         alpha=Image.new("L", (32, 32), 0), nothing_to_do=True)
    progress = canvas.unchanged(scene, [11, 12])
    chunks = [list(chunk) async for chunk in progress]
    assert [[(g.index, g.seed, g.image, g.seconds) for g in chunk] for chunk in chunks] == [
        [(0, 11, seed_image, 0.0), (1, 12, seed_image, 0.0)]]
    progress.cancel()
    assert (progress.queue_seconds, progress.compute_seconds) == (0.0, 0.0)
    # Nothing was repainted, so nothing is pasted back either.
    assert await canvas.paste_back_all(pure_context(), scene, chunks[0]) == chunks[0]
