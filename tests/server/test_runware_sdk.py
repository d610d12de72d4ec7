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


# ---------------------------------------------------------------- flow-matching models: FLUX and SD 3


def decoded(image) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image.imageBase64Data))).convert("RGB")


@pytest.mark.parametrize("model", ["imagewire:tiny-flux@1", "imagewire:tiny-sd3@1"])
async def test_flow_models_text_to_image(sdk, model):
    def request(seed: int) -> IImageInference:
        return IImageInference(model=model, positivePrompt="a castle on a hill", width=128, height=192, steps=2,
                               numberResults=2, seed=seed, scheduler="FlowMatchEulerDiscreteScheduler",
                               outputType="base64Data", outputFormat="PNG")

    images = sorted(await sdk.imageInference(requestImage=request(21)), key=lambda image: image.seed)
    assert [image.seed for image in images] == [21, 22]
    pictures = [decoded(image) for image in images]
    assert all(picture.size == (128, 192) for picture in pictures)
    assert pictures[0].tobytes() != pictures[1].tobytes()
    again = min(await sdk.imageInference(requestImage=request(21)), key=lambda image: image.seed)
    assert decoded(again).tobytes() == pictures[0].tobytes()


@pytest.mark.parametrize("model", ["imagewire:tiny-flux@1", "imagewire:tiny-sd3@1"])
async def test_flow_models_image_to_image(sdk, tmp_path, model):
    results = {}
    for colour in ("red", "blue"):
        path = tmp_path / f"{colour}.png"
        Image.new("RGB", (256, 192), colour).save(path)
        uploaded = await sdk.uploadImage(str(path))
        images = await sdk.imageInference(requestImage=IImageInference(
            model=model, positivePrompt="a meadow", seedImage=uploaded.imageUUID, strength=0.6, steps=4,
            seed=5, outputType="base64Data", outputFormat="PNG"))
        results[colour] = decoded(images[0])
    # The seed image's own size, and its content reaches the model.
    assert results["red"].size == results["blue"].size == (256, 192)
    assert results["red"].tobytes() != results["blue"].tobytes()


async def test_a_flow_matching_scheduler_on_sd15_is_refused_naming_scheduler(sdk):
    with pytest.raises(RunwareAPIError) as caught:
        await sdk.imageInference(requestImage=IImageInference(
            model="imagewire:sd15@1", positivePrompt="a tree", width=512, height=512,
            scheduler="FlowMatchEulerDiscreteScheduler"))
    error = caught.value.error_data
    assert error["code"] == "invalidParameter" and error["parameter"] == "scheduler"
    assert "FlowMatchEulerDiscreteScheduler runs here only on flow-matching models" in error["message"]
    assert "DPM++ 2M Karras" in error["allowedValues"]


async def test_flux_dev_without_its_weights_names_the_hub_repository(sdk, empty_hf_cache):
    with pytest.raises(RunwareAPIError) as caught:
        await sdk.imageInference(requestImage=IImageInference(
            model="runware:101@1", positivePrompt="a fox", width=1024, height=1024))
    error = caught.value.error_data
    assert error["code"] == "modelNotFound" and error["parameter"] == "model"
    assert "FLUX.1 [dev] (runware:101@1)" in error["message"]
    assert "hf download black-forest-labs/FLUX.1-dev" in error["message"]
    assert "--allow-downloads" in error["message"]


async def test_an_operators_catalog_points_a_runware_id_at_local_weights(start_server, data_dir, tmp_path):
    import json

    from imagewire.air_registry.tiny import ensure_embedded

    # The tiny FLUX model stands in for an operator's own copy of FLUX.1 [dev].
    weights = ensure_embedded("tiny-flux", data_dir / "models" / "imagewire-tiny-flux-1")
    catalog = tmp_path / "models.json"
    catalog.write_text(json.dumps([
        {"air": "runware:101@1", "name": "FLUX.1 [dev], local", "architecture": "tiny-flux", "source": "folder",
         "location": str(weights)},
        {"air": "mysite:flux@1", "name": "Also FLUX", "aliases": ["civitai:618692@691639"],
         "architecture": "tiny-flux", "source": "folder", "location": str(weights)},
    ]))
    server = await start_server(catalog_files=(catalog,))
    client = Runware(api_key="test-key", url=server.url)
    await client.connect()
    try:
        pictures = []
        for model in ("runware:101@1", "civitai:618692@691639", "imagewire:tiny-flux@1"):
            [image] = await client.imageInference(requestImage=IImageInference(
                model=model, positivePrompt="a fox", width=128, height=128, steps=2, seed=3,
                outputType="base64Data", outputFormat="PNG"))
            pictures.append(decoded(image).tobytes())
    finally:
        await client.disconnect()
    assert pictures[0] == pictures[1] == pictures[2]


async def test_model_search_reports_the_flow_models_own_defaults(sdk, empty_hf_cache):
    from runware import IModelSearch

    found = await sdk.modelSearch(payload=IModelSearch(search="flux"))
    by_air = {model.air: model for model in found.results}
    schnell, dev, tiny = by_air["runware:100@1"], by_air["runware:101@1"], by_air["imagewire:tiny-flux@1"]
    assert (schnell.architecture, schnell.defaultSteps, schnell.defaultCFG) == ("flux1-schnell", 4, 0)
    assert (dev.architecture, dev.defaultSteps, dev.defaultCFG, dev.defaultWidth) == ("flux1-dev", 28, 3.5, 1024)
    assert tiny.architecture == "tiny-flux"


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
