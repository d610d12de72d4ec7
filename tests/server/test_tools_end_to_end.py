"""Upscale, background removal, caption and prompt enhance through a real server on the embedded tool models,
in both spellings and both request shapes, and every bad input answered with an error naming its parameter."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from tests.server.test_inference_end_to_end import fetch
from tests.wire import Wire, eventually, new_uuid


def picture(size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A picture with structure (a disc on a gradient), so that results can be compared with it."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    ImageDraw.Draw(image).ellipse((size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4),
                                  fill=(220, 40, 60))
    return image


def encoded(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(item: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["imageBase64Data"])))


def pixel_bomb() -> str:
    """A PNG whose header claims 30000×30000 pixels: small on the wire, huge if decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(("spelling", "factor"), [("imageUpscale", 2), ("upscale", 4)])
async def test_upscale_gives_exactly_that_size_and_reusable_uuids(server, spelling, factor):
    wire = await Wire.open(server.url)
    source = picture()
    [item] = await wire.run({"taskType": spelling, "inputImage": encoded(source), "upscaleFactor": factor,
                             "outputType": ["URL", "base64Data"], "outputFormat": "PNG"})
    assert item["taskType"] == spelling
    result = decoded(item)
    assert result.size == (48 * factor, 40 * factor)
    # It is the picture enlarged: close to a plain enlargement, and not the same everywhere.
    plain = source.resize(result.size, Image.Resampling.BICUBIC)
    differences = [abs(a - b) for a, b in zip(result.convert("L").tobytes(), plain.convert("L").tobytes(),
                                              strict=True)]
    assert sum(differences) / len(differences) < 40
    content_type, _ = await asyncio.to_thread(fetch, item["imageURL"])
    assert content_type == "image/png"
    # The result and the inline input each have an image UUID that later tasks take.
    [again] = await wire.run({"taskType": "upscale", "inputs": {"image": item["inputImageUUID"]}, "upscaleFactor": 2,
                              "outputType": "base64Data"})
    assert decoded(again).size == (96, 80) and again["inputImageUUID"] == item["inputImageUUID"]
    [of_result] = await wire.run({"taskType": "caption", "inputImage": item["imageUUID"]})
    assert of_result["text"]
    await wire.close()


async def test_tiled_and_untiled_upscales_agree(start_server):
    source = encoded(picture((120, 90)))
    task = {"taskType": "upscale", "inputImage": source, "upscaleFactor": 4, "outputType": "base64Data",
            "outputFormat": "PNG"}
    results = []
    for tile in (512, 32):  # one tile, then 4x3 tiles with borrowed borders
        server = await start_server(upscale_tile_size=tile)
        wire = await Wire.open(server.url)
        [item] = await wire.run(dict(task, taskUUID=new_uuid()))
        results.append(decoded(item).convert("RGB").tobytes())
        await wire.close()
    whole, tiled = results
    assert len(whole) == len(tiled) == 480 * 360 * 3
    assert max(abs(a - b) for a, b in zip(whole, tiled, strict=True)) <= 2


async def test_background_removal_returns_the_inputs_size_with_an_alpha_channel(server):
    wire = await Wire.open(server.url)
    source = picture((50, 36))
    for spelling, fields in (("imageBackgroundRemoval", {}), ("removeBackground", {"outputFormat": "WEBP"})):
        [item] = await wire.run({"taskType": spelling, "inputImage": encoded(source, "JPEG"),
                                 "outputType": "base64Data", **fields})
        assert item["taskType"] == spelling and item["inputImageUUID"]
        cutout = decoded(item)
        assert cutout.mode == "RGBA" and cutout.size == (50, 36)
        alpha = cutout.getchannel("A")
        low, high = alpha.getextrema()
        assert low < high  # the mask follows the picture: not one value everywhere
    await wire.close()


async def test_background_removal_settings_and_formats(server):
    wire = await Wire.open(server.url)
    source = encoded(picture((40, 30)))
    base = {"taskType": "removeBackground", "inputImage": source, "outputType": "base64Data"}
    [cutout] = await wire.run(dict(base))
    [mask] = await wire.run(dict(base, settings={"returnOnlyMask": True}))
    [jpg] = await wire.run(dict(base, outputFormat="JPG", settings={"rgba": [0, 0, 255, 0]}))
    [opaque] = await wire.run(dict(base, settings={"rgba": [0, 0, 255, 1]}))
    alpha = decoded(cutout).getchannel("A")
    assert decoded(mask).mode == "L" and decoded(mask).tobytes() == alpha.tobytes()
    # JPG keeps no alpha: the subject over the rgba colour, opaque.
    assert decoded(jpg).mode == "RGB" and decoded(jpg).size == (40, 30)
    composed = decoded(opaque)
    assert composed.getchannel("A").getextrema() == (255, 255)
    weakest = min(range(40 * 30), key=lambda index: alpha.tobytes()[index])
    x, y = weakest % 40, weakest // 40
    assert composed.getpixel((x, y))[2] > decoded(cutout).getpixel((x, y))[2] - 1  # blue shows through
    await wire.close()


async def test_captions_are_text_in_both_spellings(server):
    wire = await Wire.open(server.url)
    uploaded = (await wire.run({"taskType": "imageUpload", "image": encoded(picture())}))[0]["imageUUID"]
    [first] = await wire.run({"taskType": "imageCaption", "inputImage": uploaded})
    [second] = await wire.run({"taskType": "caption", "inputs": {"image": uploaded},
                               "model": "imagewire:tiny-caption@1"})
    assert first["taskType"] == "imageCaption" and second["taskType"] == "caption"
    assert isinstance(first["text"], str) and first["text"].strip()
    assert first["text"] == second["text"]  # greedy decoding: one picture, one caption
    [prompted] = await wire.run({"taskType": "caption", "inputImage": uploaded, "prompt": "a photo of"})
    assert prompted["text"].startswith("a photo of")
    await wire.close()


def tiny_prompt_tokens(server, text: str) -> int:
    from transformers import AutoTokenizer

    folder = Path(server.config.data_dir) / "models" / "imagewire-tiny-prompt-1"
    return len(AutoTokenizer.from_pretrained(str(folder))(text, add_special_tokens=False)["input_ids"])


async def test_prompt_enhance_gives_that_many_texts_within_the_length_the_same_for_the_same_seed(server):
    wire = await Wire.open(server.url)
    task = {"taskType": "promptEnhance", "prompt": "a red fox", "promptMaxLength": 24, "promptVersions": 4}
    first = await wire.run(dict(task, seed=7), count=4)
    again = await wire.run(dict(task, seed=7), count=4)
    other = await wire.run(dict(task, seed=8), count=4)
    texts = [item["text"] for item in first]
    assert len(set(texts)) == 4 and all(text.startswith("a red fox") for text in texts)
    assert all(tiny_prompt_tokens(server, text) <= 24 for text in texts)
    assert texts == [item["text"] for item in again]
    assert texts != [item["text"] for item in other]
    # Without a seed, the same request gives the same texts too.
    unseeded = [[item["text"] for item in await wire.run(dict(task), count=4)] for _ in range(2)]
    assert unseeded[0] == unseeded[1]
    too_short = await wire.error({"taskType": "promptEnhance", "prompt": "x" * 30, "promptMaxLength": 20,
                                  "promptVersions": 1})
    assert (too_short["code"], too_short["parameter"]) == ("invalidParameter", "promptMaxLength")
    await wire.close()


async def test_every_bad_input_gets_an_error_naming_its_parameter(server):
    wire = await Wire.open(server.url)
    small = encoded(picture((20, 20)))
    cases = [
        ({"taskType": "imageUpscale", "upscaleFactor": 2}, "missingParameter", "inputImage"),
        ({"taskType": "removeBackground"}, "missingParameter", "inputImage"),
        ({"taskType": "caption", "inputs": {}}, "missingParameter", "inputImage"),
        ({"taskType": "upscale", "inputImage": small, "upscaleFactor": 5}, "invalidParameter", "upscaleFactor"),
        ({"taskType": "upscale", "inputImage": pixel_bomb(), "upscaleFactor": 2}, "invalidParameter", "inputImage"),
        ({"taskType": "caption", "inputs": {"image": pixel_bomb()}}, "invalidParameter", "inputs.image"),
        ({"taskType": "upscale", "inputImage": encoded(Image.new("RGB", (1100, 1000))), "upscaleFactor": 4},
         "invalidParameter", "upscaleFactor"),
        ({"taskType": "upscale", "inputImage": small, "upscaleFactor": 2, "model": "imagewire:tiny@1"},
         "invalidParameter", "model"),
        ({"taskType": "removeBackground", "inputImage": small, "outputFormat": "GIF"}, "invalidParameter",
         "outputFormat"),
        ({"taskType": "upscale", "inputImage": small, "upscaleFactor": 2, "targetMegapixels": 4},
         "unsupportedParameter", "targetMegapixels"),
    ]
    for task, code, parameter in cases:
        failure = await wire.error(dict(task))
        assert (failure["code"], failure["parameter"]) == (code, parameter), failure
        assert failure["taskType"] == task["taskType"]
    await wire.close()


async def test_an_image_of_another_api_key_is_not_found(start_server):
    server = await start_server(api_keys=("test-key", "other-key"))
    mine, theirs = await Wire.open(server.url), await Wire.open(server.url, api_key="other-key")
    [stored] = await theirs.run({"taskType": "imageUpload", "image": encoded(picture((20, 20)))})
    for spelling in ("upscale", "imageBackgroundRemoval", "caption"):
        task = {"taskType": spelling, "inputImage": stored["imageUUID"],
                **({"upscaleFactor": 2} if spelling == "upscale" else {})}
        failure = await mine.error(task)
        assert (failure["code"], failure["parameter"]) == ("imageNotFound", "inputImage")
    await mine.close()
    await theirs.close()


async def test_a_curated_id_without_its_weights_names_the_download(server):
    wire = await Wire.open(server.url)
    failure = await wire.error({"taskType": "upscale", "inputImage": encoded(picture()), "upscaleFactor": 4,
                                "model": "runware:504@1"})
    assert (failure["code"], failure["parameter"]) == ("modelNotFound", "model")
    assert "hf download ai-forever/Real-ESRGAN RealESRGAN_x4.pth" in failure["message"]
    await wire.close()


async def test_model_search_lists_the_tool_models_by_category(server):
    wire = await Wire.open(server.url)
    [found] = await wire.run({"taskType": "modelSearch", "category": "upscaler"})
    assert [model["air"] for model in found["results"]] == ["imagewire:tiny-upscaler@1", "runware:504@1"]
    assert found["results"][0]["available"] is True and found["results"][1]["available"] is False
    for category, air in (("background-removal", "runware:112@5"), ("caption", "imagewire:tiny-caption@1"),
                          ("prompt-enhancer", "imagewire:tiny-prompt@1")):
        [found] = await wire.run({"taskType": "modelSearch", "category": category, "limit": 100})
        assert air in [model["air"] for model in found["results"]]
    await wire.close()


async def test_cost_and_the_log_line_cover_the_tools(start_server, caplog):
    server = await start_server(price_per_gpu_second=2.0)
    wire = await Wire.open(server.url)
    with caplog.at_level(logging.INFO, logger="imagewire.task"):
        [upscaled] = await wire.run({"taskType": "upscale", "inputImage": encoded(picture()), "upscaleFactor": 2,
                                     "includeCost": True})
        [caption] = await wire.run({"taskType": "caption", "inputImage": upscaled["imageUUID"], "includeCost": True})
        versions = await wire.run({"taskType": "promptEnhance", "prompt": "a fox", "promptMaxLength": 16,
                                   "promptVersions": 2, "includeCost": True}, count=2)
        for task_uuid, kind in ((upscaled["taskUUID"], "upscale"), (caption["taskUUID"], "caption"),
                                (versions[0]["taskUUID"], "promptEnhance")):
            # A task's line is written once its last answer is sent.
            [line] = await eventually(lambda task_uuid=task_uuid: [
                record.getMessage() for record in caplog.records
                if f"taskUUID={task_uuid}" in record.getMessage() and "outcome=" in record.getMessage()])
            assert f"taskType={kind} outcome=success" in line and "model_ms=" in line and "queue_ms=" in line
    for item in (upscaled, caption, *versions):
        assert isinstance(item["cost"], float) and item["cost"] > 0
    await wire.close()


async def test_async_delivery_and_get_response(server):
    wire = await Wire.open(server.url)
    task = {"taskType": "removeBackground", "taskUUID": new_uuid(), "inputImage": encoded(picture()),
            "deliveryMethod": "async"}
    [ack] = await wire.run(task)
    assert ack == {"taskType": "removeBackground", "taskUUID": task["taskUUID"]}
    for _ in range(200):
        [answer] = await wire.run({"taskType": "getResponse", "taskUUID": task["taskUUID"]})
        if answer.get("status") == "success":
            break
        await asyncio.sleep(0.05)
    assert answer["status"] == "success" and answer["taskType"] == "removeBackground" and answer["imageUUID"]
    await wire.close()
