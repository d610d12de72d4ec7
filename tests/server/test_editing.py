"""Inpainting and outpainting through a real server on the embedded models (tiny@1, tiny-inpaint@1),
compared pixel by pixel with the seed image at fixed seeds."""

from __future__ import annotations

import asyncio
import base64
import io
import urllib.request
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imagewire.tasks.canvas import EDGE_PIXELS
from tests.images import pixels
from tests.server.test_hostile_input import png_claiming
from tests.timing import seconds
from tests.wire import Wire, inference, new_uuid

SIZE = 128
BOX = (32, 40, 96, 88)  # the mask's white rectangle: left, top, right, bottom


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{b64(data)}"


def seed_picture(size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """A picture with detail everywhere, so that any change shows."""
    width, height = size
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([(x * 2) % 256, (y * 2) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def mask_picture(size: tuple[int, int] = (SIZE, SIZE), box: tuple[int, int, int, int] = BOX) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def outside(box: tuple[int, int, int, int], size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    keep = np.ones((size[1], size[0]), dtype=bool)
    left, top, right, bottom = box
    keep[top:bottom, left:right] = False
    return keep


def inside(box: tuple[int, int, int, int], size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """The mask's area less its blended edge."""
    left, top, right, bottom = box
    core = np.zeros((size[1], size[0]), dtype=bool)
    core[top + EDGE_PIXELS : bottom - EDGE_PIXELS, left + EDGE_PIXELS : right - EDGE_PIXELS] = True
    return core


def repaint(**fields: Any) -> dict[str, Any]:
    task = {"seedImage": b64(png(seed_picture())), "maskImage": b64(png(mask_picture())), "seed": 11, "steps": 4,
            "strength": 0.9, "outputType": "base64Data", "width": SIZE, "height": SIZE}
    task.update(fields)
    return inference(**task)


@pytest.mark.parametrize("model", ["imagewire:tiny@1", "imagewire:tiny-inpaint@1"], ids=["checkpoint", "9-channel"])
async def test_inpainting_changes_the_mask_and_returns_every_other_pixel_as_it_was(server, model):
    wire = await Wire.open(server.url)
    [item] = await wire.run(repaint(model=model, strength=1.0))
    result, seed = pixels(item), np.asarray(seed_picture()).astype(int)
    assert result.shape == seed.shape
    assert np.array_equal(result[outside(BOX)], seed[outside(BOX)])
    assert np.abs(result[inside(BOX)] - seed[inside(BOX)]).mean() > 20
    await wire.close()


async def test_masks_in_all_four_forms_give_the_same_result(server):
    wire = await Wire.open(server.url)
    mask = png(mask_picture())
    [upload] = await wire.run({"taskType": "imageUpload", "image": b64(mask)})
    [baseline] = await wire.run(repaint(maskImage=b64(mask)))
    for form in (upload["imageUUID"], data_uri(mask), upload["imageURL"]):
        [item] = await wire.run(repaint(maskImage=form))
        assert np.array_equal(pixels(item), pixels(baseline)), form[:40]
    await wire.close()


async def test_a_mask_of_another_size_is_scaled_to_the_seed_image(server):
    wire = await Wire.open(server.url)
    small = mask_picture((64, 64), tuple(side // 2 for side in BOX))  # type: ignore[arg-type]
    [item] = await wire.run(repaint(maskImage=b64(png(small))))
    result, seed = pixels(item), np.asarray(seed_picture()).astype(int)
    # Scaling up blurs the mask's edge by a pixel or two: compare beyond that.
    grown = (BOX[0] - 2, BOX[1] - 2, BOX[2] + 2, BOX[3] + 2)
    assert np.array_equal(result[outside(grown)], seed[outside(grown)])
    assert np.abs(result[inside(BOX)] - seed[inside(BOX)]).mean() > 10
    await wire.close()


async def test_an_empty_mask_returns_the_seed_image_and_a_full_one_repaints_everything(server):
    wire = await Wire.open(server.url)
    seed = np.asarray(seed_picture()).astype(int)
    empties = await wire.run(repaint(maskImage=b64(png(Image.new("L", (SIZE, SIZE), 0))), numberResults=2), count=2)
    assert sorted(item["seed"] for item in empties) == [11, 12]
    assert all(np.array_equal(pixels(item), seed) for item in empties)
    [full] = await wire.run(repaint(maskImage=b64(png(Image.new("L", (SIZE, SIZE), 255))), strength=1.0))
    assert (np.abs(pixels(full) - seed).max(axis=-1) > 8).mean() > 0.9
    await wire.close()


async def test_mask_margin_repaints_a_crop_at_full_size_and_pastes_it_back(server):
    wire = await Wire.open(server.url)
    box = (56, 56, 72, 72)  # a small area: the crop around it is scaled up to 128²
    mask = b64(png(mask_picture(box=box)))
    [plain] = await wire.run(repaint(maskImage=mask))
    [zoomed] = await wire.run(repaint(maskImage=mask, maskMargin=32))
    seed = np.asarray(seed_picture()).astype(int)
    for item in (plain, zoomed):
        result = pixels(item)
        assert result.shape == seed.shape
        assert np.array_equal(result[outside(box)], seed[outside(box)])
        assert np.abs(result[inside(box)] - seed[inside(box)]).mean() > 10
    assert not np.array_equal(pixels(plain), pixels(zoomed))
    await wire.close()


async def test_outpainting_extends_the_canvas_and_keeps_the_original(server):
    wire = await Wire.open(server.url)
    seed = np.asarray(seed_picture()).astype(int)
    # Without width and height the result is the seed image plus the extensions.
    [item] = await wire.run(repaint(maskImage=..., width=..., height=..., outpaint={"left": 64, "top": 64},
                                    strength=1.0))
    result = pixels(item)
    assert result.shape == (SIZE + 64, SIZE + 64, 3)
    assert np.array_equal(result[64:, 64:], seed)
    # The new area is generated, not the seed's edge pixels drawn out.
    stretched = np.pad(seed, ((64, 0), (64, 0), (0, 0)), mode="edge")
    assert np.abs(result[:64] - stretched[:64]).mean() > 20
    # With width and height they are the result's size; blur softens the boundary inside the original.
    [soft] = await wire.run(repaint(maskImage=..., width=256, height=128, outpaint={"right": 128, "blur": 16}))
    result = pixels(soft)
    assert result.shape == (128, 256, 3)
    assert np.array_equal(result[:, :128 - 16], seed[:, :128 - 16])
    assert not np.array_equal(result[:, 128 - 16 : 128], seed[:, 128 - 16 :])
    await wire.close()


async def test_outpainting_sizes_that_do_not_add_up_get_errors_naming_them(server):
    wire = await Wire.open(server.url)
    error = await wire.error(repaint(maskImage=..., width=128, height=128, outpaint={"left": 64, "right": 64}))
    assert (error["code"], error["parameter"]) == ("invalidParameter", "outpaint")
    assert "width and height are the size of the result" in error["message"]
    big = b64(png(seed_picture((2048, 128))))
    error = await wire.error(repaint(seedImage=big, maskImage=..., width=..., height=..., outpaint={"right": 64}))
    assert (error["code"], error["parameter"]) == ("invalidWidth", "width")
    await wire.close()


async def test_bad_masks_get_errors_naming_mask_image(start_server):
    server = await start_server(api_keys=("key-a", "key-b"))
    other = await Wire.open(server.url, api_key="key-b")
    [theirs] = await other.run({"taskType": "imageUpload", "image": b64(png(mask_picture()))})
    wire = await Wire.open(server.url, api_key="key-a")
    gif = data_uri(png(mask_picture(), "GIF"), "image/gif")
    for mask, code in ((gif, "invalidParameter"), (b64(png_claiming(100_000, 100_000)), "invalidParameter"),
                       ("not an image", "invalidParameter"), (theirs["imageUUID"], "imageNotFound")):
        error = await wire.error(repaint(maskImage=mask))
        assert (error["code"], error["parameter"]) == (code, "maskImage"), error
        assert "maskImage" in error["message"]
    await wire.close()
    await other.close()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=seconds(10)) as response:
        return bytes(response.read())


async def test_inpainting_results_are_stored_like_any_other(server):
    wire = await Wire.open(server.url)
    [item] = await wire.run(repaint(outputType="URL", taskUUID=new_uuid()))
    data = await asyncio.to_thread(fetch, item["imageURL"])
    assert Image.open(io.BytesIO(data)).size == (SIZE, SIZE)
    await wire.close()


# ---------------------------------------------------------------- flow-matching models (FLUX, SD 3)


@pytest.mark.parametrize("model", ["imagewire:tiny-flux@1", "imagewire:tiny-sd3@1"], ids=["flux", "sd3"])
async def test_flow_models_inpaint_and_return_every_other_pixel_as_it_was(server, model):
    wire = await Wire.open(server.url)
    [item] = await wire.run(repaint(model=model, strength=1.0, steps=2))
    result, seed = pixels(item), np.asarray(seed_picture()).astype(int)
    assert np.array_equal(result[outside(BOX)], seed[outside(BOX)])
    assert np.abs(result[inside(BOX)] - seed[inside(BOX)]).mean() > 20
    await wire.close()


async def test_what_a_flow_model_cannot_do_is_refused_naming_the_parameter_and_the_server_goes_on(server):
    wire = await Wire.open(server.url)
    # FLUX.1 Kontext has no inpainting pipeline; refused before its weights are even looked for.
    error = await wire.error(repaint(model="runware:106@1"))
    assert (error["code"], error["parameter"]) == ("unsupportedParameter", "maskImage")
    assert "flux1-kontext" in error["message"] and "flux1-dev" in error["message"]
    error = await wire.error(repaint(model="runware:106@1", maskImage=..., outpaint={"left": 64}))
    assert (error["code"], error["parameter"]) == ("unsupportedParameter", "outpaint")
    # No ControlNet fits a flow-matching model.
    guide = b64(png(mask_picture()))
    error = await wire.error(inference(model="imagewire:tiny-flux@1", controlNet=[
        {"model": "imagewire:tiny-controlnet@1", "guideImage": guide}]))
    assert (error["code"], error["parameter"]) == ("unsupportedParameter", "controlNet[0].model")
    assert "Architectures that take ControlNets: tiny, sd15" in error["message"]
    [fine] = await wire.run(inference(model="imagewire:tiny-flux@1", steps=2))
    assert fine["imageUUID"]
    await wire.close()
