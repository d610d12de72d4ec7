"""The official Runware Python SDK, pointed at imagewire by changing only its URL."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image
from runware import IImageInference, Runware
from runware.utils import RunwareAPIError

from tests.engines import HeldEngine
from tests.timing import seconds


@pytest.fixture
async def sdk(server):
    client = Runware(api_key="test-key", url=server.url)
    await client.connect()
    yield client
    await client.disconnect()


async def test_text_to_image(sdk):
    images = await sdk.imageInference(requestImage=IImageInference(
        model="imagewire:tiny@1", positivePrompt="a castle on a hill", width=128, height=128, steps=2,
        numberResults=2, seed=21, outputType="base64Data", outputFormat="PNG"))
    assert sorted(image.seed for image in images) == [21, 22]
    for image in images:
        assert Image.open(io.BytesIO(base64.b64decode(image.imageBase64Data))).size == (128, 128)


async def test_upload_then_image_to_image(sdk, tmp_path):
    path = tmp_path / "seed.png"
    Image.new("RGB", (256, 192), (10, 200, 30)).save(path)
    uploaded = await sdk.uploadImage(str(path))
    assert uploaded.imageUUID and uploaded.imageURL
    images = await sdk.imageInference(requestImage=IImageInference(
        model="imagewire:tiny@1", positivePrompt="a meadow", seedImage=uploaded.imageUUID, strength=0.7,
        steps=4, width=256, height=192))
    assert images[0].imageURL.endswith(".jpg")


async def test_errors_surface_with_code_and_parameter(sdk):
    with pytest.raises((RunwareAPIError, Exception)) as caught:
        await sdk.imageInference(requestImage=IImageInference(
            model="imagewire:tiny@1", positivePrompt="a tree", width=500, height=128, steps=2))
    assert "invalidWidth" in str(caught.value) or "width" in str(caught.value)


async def test_a_task_cut_off_by_a_lost_socket_is_recovered_by_the_sdk(start_server):
    """The SDK resends the task on a new socket, gets conflictTaskUUID, and asks getResponse."""
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    client = Runware(api_key="test-key", url=server.url)
    await client.connect()
    try:
        call = asyncio.create_task(client.imageInference(requestImage=IImageInference(
            model="imagewire:tiny@1", positivePrompt="a harbour at dawn", width=128, height=128, steps=2,
            numberResults=2, seed=7)))
        assert await asyncio.to_thread(engine.started.wait, seconds(10))
        for connection in list(server.connections):
            connection.abort()  # as a network failure: no closing handshake
        engine.release.set()
        images = await asyncio.wait_for(call, seconds(30))
    finally:
        engine.release.set()
        await client.disconnect()
    assert sorted(image.seed for image in images) == [7, 8]
    assert all(image.imageUUID and image.imageURL for image in images)


# ---------------------------------------------------------------- editing, as the SDK sends it


async def test_inpainting_outpainting_and_controlnet_through_the_sdk(start_server, tmp_path):
    import numpy as np
    from runware import IControlNetCanny, IControlNetGeneral, IOutpaint, ISafety

    from tests.server.test_editing import BOX, mask_picture, outside, seed_picture

    server = await start_server(safety_checker="imagewire:tiny-safety@1")
    client = Runware(api_key="test-key", url=server.url)
    await client.connect()
    try:
        seed_picture().save(tmp_path / "seed.png")
        mask_picture().save(tmp_path / "mask.png")
        # Files: the SDK sends the seed and the mask as base64 data.
        [inpainted] = await client.imageInference(requestImage=IImageInference(
            model="imagewire:tiny-inpaint@1", positivePrompt="a door", seedImage=str(tmp_path / "seed.png"),
            maskImage=str(tmp_path / "mask.png"), maskMargin=32, strength=0.9, steps=2, width=128, height=128,
            seed=8, outputType="base64Data", outputFormat="PNG", safety=ISafety(checkContent=True)))
        result = np.asarray(Image.open(io.BytesIO(base64.b64decode(inpainted.imageBase64Data))).convert("RGB"))
        assert np.array_equal(result[outside(BOX)], np.asarray(seed_picture())[outside(BOX)])
        assert inpainted.NSFWContent is False
        # Guide images are uploaded first; IControlNetCanny asks the server to pre-process its guide.
        [guided] = await client.imageInference(requestImage=IImageInference(
            model="imagewire:tiny@1", positivePrompt="a door", steps=2, width=128, height=128,
            controlNet=[IControlNetGeneral(model="imagewire:tiny-controlnet@1", guideImage=str(tmp_path / "mask.png"),
                                           weight=0.6, startStep=1, endStep=2),
                        IControlNetCanny(model="imagewire:tiny-controlnet@1", guideImage=str(tmp_path / "seed.png"),
                                         lowThresholdCanny=50, highThresholdCanny=150)]))
        assert guided.imageURL
        [extended] = await client.imageInference(requestImage=IImageInference(
            model="imagewire:tiny@1", positivePrompt="a door", seedImage=str(tmp_path / "seed.png"), steps=2,
            width=256, height=128, outpaint=IOutpaint(left=64, right=64, blur=4), outputType="base64Data"))
        assert Image.open(io.BytesIO(base64.b64decode(extended.imageBase64Data))).size == (256, 128)
    finally:
        await client.disconnect()


# ---------------------------------------------------------------- the tools, as the SDK calls them


async def test_sdk_upscale_by_two_and_four(sdk, tmp_path):
    from runware import IImageUpscale

    path = tmp_path / "small.png"
    Image.new("RGB", (40, 24), (30, 120, 200)).save(path)
    for factor in (2, 4):
        [image] = await sdk.imageUpscale(upscaleGanPayload=IImageUpscale(
            inputImage=str(path), upscaleFactor=factor, outputType="base64Data", outputFormat="PNG"))
        upscaled = Image.open(io.BytesIO(base64.b64decode(image.imageBase64Data)))
        assert upscaled.size == (40 * factor, 24 * factor)
        assert image.imageUUID and image.inputImageUUID
    # The newer request shape through the same SDK: the image under inputs, and the result's UUID reused.
    [again] = await sdk.imageUpscale(upscaleGanPayload=IImageUpscale(
        inputs={"image": image.imageUUID}, upscaleFactor=2, model="imagewire:tiny-upscaler@1"))
    assert again.inputImageUUID == image.imageUUID and again.imageURL.endswith(".jpg")


async def test_sdk_background_removal_keeps_the_size_and_adds_alpha(sdk, tmp_path):
    from runware import IImageBackgroundRemoval

    path = tmp_path / "subject.png"
    picture = Image.linear_gradient("L").resize((36, 28)).convert("RGB")
    picture.save(path)
    [image] = await sdk.imageBackgroundRemoval(removeImageBackgroundPayload=IImageBackgroundRemoval(
        inputImage=str(path), outputType="base64Data", outputFormat="PNG",
        settings={"rgba": [255, 255, 255, 0], "postProcessMask": False}))
    cutout = Image.open(io.BytesIO(base64.b64decode(image.imageBase64Data)))
    assert cutout.mode == "RGBA" and cutout.size == (36, 28)


async def test_sdk_caption_is_text(sdk, tmp_path):
    from runware import IImageCaption

    path = tmp_path / "scene.png"
    Image.new("RGB", (64, 48), (200, 180, 20)).save(path)
    caption = await sdk.imageCaption(requestImageToText=IImageCaption(inputImage=str(path)))
    assert isinstance(caption.text, str) and caption.text.strip()


async def test_sdk_prompt_enhance_gives_the_versions_asked_for(sdk):
    from runware import IPromptEnhance

    request = IPromptEnhance(prompt="a lighthouse", promptMaxLength=40, promptVersions=3)
    first = await sdk.promptEnhance(promptEnhancer=request)
    again = await sdk.promptEnhance(promptEnhancer=IPromptEnhance(prompt="a lighthouse", promptMaxLength=40,
                                                                  promptVersions=3))
    assert len(first) == 3 and all(version.text.startswith("a lighthouse") for version in first)
    assert sorted(version.text for version in first) == sorted(version.text for version in again)


async def test_sdk_tool_errors_name_the_parameter(sdk):
    from runware import IImageUpscale

    with pytest.raises(Exception) as caught:
        await sdk.imageUpscale(upscaleGanPayload=IImageUpscale(
            inputImage="6f1c2a4e-9a6b-4c7d-8e2f-1a2b3c4d5e6f", upscaleFactor=2))
    assert "imageNotFound" in str(caught.value) or "inputImage" in str(caught.value)
