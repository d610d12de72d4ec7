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
