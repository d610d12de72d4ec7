"""imageInference and imageUpload through a real server on the tiny model (PROTOCOL.md §5–7)."""

from __future__ import annotations

import asyncio
import base64
import io
import urllib.request

import pytest
from PIL import Image

from tests.timing import seconds
from tests.wire import Wire, inference


def fetch(url: str) -> tuple[str, bytes]:
    """GET an imageURL. Tests call it through asyncio.to_thread: the server shares their event loop."""
    with urllib.request.urlopen(url, timeout=seconds(10)) as response:
        return response.headers["Content-Type"], response.read()


def pixels(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def max_difference(first: bytes, second: bytes) -> int:
    assert len(first) == len(second)
    return max(abs(a - b) for a, b in zip(first, second, strict=True))


def png_bytes(size: tuple[int, int] = (200, 130), color: tuple[int, int, int] = (200, 40, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


async def test_text_to_image_returns_a_stored_image_served_at_its_url(server):
    wire = await Wire.open(server.url)
    [item] = await wire.run(inference(seed=7, width=192, height=128))
    assert item["taskType"] == "imageInference" and item["seed"] == 7
    content_type, data = await asyncio.to_thread(fetch, item["imageURL"])
    assert content_type == "image/png"
    assert Image.open(io.BytesIO(data)).size == (192, 128)
    assert item["imageURL"].endswith(f"/image/{item['imageUUID']}.png")
    await wire.close()


async def test_the_same_seed_and_request_give_the_same_pixels(server):
    wire = await Wire.open(server.url)
    [first] = await wire.run(inference(seed=1234, outputType="base64Data"))
    [second] = await wire.run(inference(seed=1234, outputType="base64Data"))
    [other] = await wire.run(inference(seed=1235, outputType="base64Data"))
    assert first["imageUUID"] != second["imageUUID"]
    assert pixels(base64.b64decode(first["imageBase64Data"])) == pixels(base64.b64decode(second["imageBase64Data"]))
    assert pixels(base64.b64decode(first["imageBase64Data"])) != pixels(base64.b64decode(other["imageBase64Data"]))
    await wire.close()


async def test_number_results_gives_one_item_each_with_consecutive_seeds(server):
    wire = await Wire.open(server.url)
    items = await wire.run(inference(seed=50, numberResults=5, outputType="base64Data"), count=5)
    assert sorted(item["seed"] for item in items) == [50, 51, 52, 53, 54]
    assert len({item["imageUUID"] for item in items}) == 5
    # Image i of a batch is the image a single request with seed 50+i gives (batched matrix
    # products may round differently in the last bit, so compare with a tolerance).
    [single] = await wire.run(inference(seed=52, outputType="base64Data"))
    decoded = {item["seed"]: pixels(base64.b64decode(item["imageBase64Data"])) for item in items}
    alone = pixels(base64.b64decode(single["imageBase64Data"]))
    assert max_difference(decoded[52], alone) <= 2
    assert max_difference(decoded[51], alone) > 2
    await wire.close()


async def test_a_drawn_seed_is_exact_in_javascript(server):
    # Without a seed the server draws one, below 2^53: a browser reads it as a double without rounding.
    wire = await Wire.open(server.url)
    task = inference(numberResults=3)
    items = await wire.run(task, count=3)
    seeds = sorted(item["seed"] for item in items)
    assert seeds == list(range(seeds[0], seeds[0] + 3)) and seeds[-1] < 2**53
    await wire.close()


async def test_output_types_and_formats(server):
    wire = await Wire.open(server.url)
    [item] = await wire.run(inference(outputType=["URL", "base64Data", "dataURI"], outputFormat="webp",
                                      outputQuality=80))
    raw = base64.b64decode(item["imageBase64Data"])
    assert item["imageDataURI"] == "data:image/webp;base64," + item["imageBase64Data"]
    assert Image.open(io.BytesIO(raw)).format == "WEBP"
    assert await asyncio.to_thread(fetch, item["imageURL"]) == ("image/webp", raw)
    [jpg] = await wire.run(inference(outputType="dataURI", outputFormat="JPG"))
    assert "imageURL" not in jpg and jpg["imageDataURI"].startswith("data:image/jpeg;base64,")
    await wire.close()


async def test_include_cost_reports_device_seconds_times_the_configured_price(start_server):
    server = await start_server(price_per_gpu_second=2.0)
    wire = await Wire.open(server.url)
    [priced] = await wire.run(inference(includeCost=True))
    [unpriced] = await wire.run(inference())
    assert priced["cost"] > 0 and "cost" not in unpriced
    await wire.close()


@pytest.mark.parametrize("scheduler", ["Euler a", "DPM++ 2M Karras", "DDIM", "UniPC", "EulerDiscreteScheduler"])
async def test_schedulers_change_the_result(server, scheduler):
    wire = await Wire.open(server.url)
    [default] = await wire.run(inference(seed=3, steps=4, outputType="base64Data"))
    [chosen] = await wire.run(inference(seed=3, steps=4, scheduler=scheduler, outputType="base64Data"))
    assert pixels(base64.b64decode(chosen["imageBase64Data"])) != pixels(base64.b64decode(default["imageBase64Data"]))
    await wire.close()


async def test_stochastic_schedulers_are_repeatable_by_seed(server):
    wire = await Wire.open(server.url)
    request = dict(seed=8, steps=4, scheduler="DPM++ SDE Karras", outputType="base64Data")
    [first] = await wire.run(inference(**request))
    [second] = await wire.run(inference(**request))
    assert pixels(base64.b64decode(first["imageBase64Data"])) == pixels(base64.b64decode(second["imageBase64Data"]))
    await wire.close()


async def test_an_unknown_scheduler_lists_the_allowed_values(server):
    wire = await Wire.open(server.url)
    error = await wire.error(inference(scheduler="Warp Drive"))
    assert error["parameter"] == "scheduler" and "Euler a" in error["allowedValues"]
    assert "Warp Drive" in error["message"]
    await wire.close()


async def seed_image_forms(wire: Wire, server) -> dict[str, str]:
    source = png_bytes()
    [upload] = await wire.run({"taskType": "imageUpload", "image": base64.b64encode(source).decode()})
    [generated] = await wire.run(inference(seed=11))
    return {
        "upload UUID": upload["imageUUID"],
        "generated UUID": generated["imageUUID"],
        "data URI": "data:image/png;base64," + base64.b64encode(source).decode(),
        "raw base64": base64.b64encode(source).decode(),
        "URL": upload["imageURL"],
    }


async def test_image_to_image_from_every_input_form(server):
    wire = await Wire.open(server.url)
    forms = await seed_image_forms(wire, server)
    for form, value in forms.items():
        [item] = await wire.run(inference(seedImage=value, width=128, height=128, strength=0.6, seed=5))
        content_type, data = await asyncio.to_thread(fetch, item["imageURL"])
        assert Image.open(io.BytesIO(data)).size == (128, 128), form
    await wire.close()


async def test_image_to_image_depends_on_the_seed_image_and_strength(server):
    wire = await Wire.open(server.url)
    red = "data:image/png;base64," + base64.b64encode(png_bytes(color=(255, 0, 0))).decode()
    blue = "data:image/png;base64," + base64.b64encode(png_bytes(color=(0, 0, 255))).decode()
    common = dict(width=128, height=128, steps=4, seed=9, outputType="base64Data")
    [from_red] = await wire.run(inference(seedImage=red, strength=0.5, **common))
    [from_blue] = await wire.run(inference(seedImage=blue, strength=0.5, **common))
    [stronger] = await wire.run(inference(seedImage=red, strength=1.0, **common))
    images = [pixels(base64.b64decode(item["imageBase64Data"])) for item in (from_red, from_blue, stronger)]
    assert len(set(images)) == 3
    await wire.close()


async def test_without_a_size_the_seed_image_size_is_rounded_to_64(server):
    wire = await Wire.open(server.url)
    seed = "data:image/png;base64," + base64.b64encode(png_bytes(size=(300, 170))).decode()
    [item] = await wire.run(inference(seedImage=seed, width=None, height=None, strength=0.5))
    _, data = await asyncio.to_thread(fetch, item["imageURL"])
    assert Image.open(io.BytesIO(data)).size == (320, 192)
    await wire.close()


async def test_bad_seed_images_get_errors_naming_seed_image(server):
    wire = await Wire.open(server.url)
    truncated = base64.b64encode(png_bytes()[:60]).decode()
    for value in ("00000000-0000-4000-8000-000000000000", "data:image/png;base64,AAAA", truncated,
                  "ftp://example.com/x.png", "http://127.0.0.1:1/nothing.png"):
        error = await wire.error(inference(seedImage=value))
        assert error["parameter"] == "seedImage", (value, error)
    # and the server still serves
    assert await wire.run(inference())
    await wire.close()


async def test_url_inputs_to_private_addresses_are_refused_by_default(start_server):
    server = await start_server()
    wire = await Wire.open(server.url)
    [upload] = await wire.run({"taskType": "imageUpload", "image": base64.b64encode(png_bytes()).decode()})
    error = await wire.error(inference(seedImage=upload["imageURL"]))
    assert error["parameter"] == "seedImage" and "private" in error["message"].lower() + "loopback"
    await wire.close()


async def test_images_are_scoped_to_the_api_key_that_created_them(start_server):
    server = await start_server(api_keys=("key-a", "key-b"))
    owner = await Wire.open(server.url, api_key="key-a")
    [upload] = await owner.run({"taskType": "imageUpload", "image": base64.b64encode(png_bytes()).decode()})
    stranger = await Wire.open(server.url, api_key="key-b")
    error = await stranger.error(inference(seedImage=upload["imageUUID"]))
    assert error["code"] == "imageNotFound"
    assert await owner.run(inference(seedImage=upload["imageUUID"], strength=0.5))
    await owner.close()
    await stranger.close()


async def test_upload_answers_uuid_and_url_and_keeps_small_pngs_as_sent(server):
    wire = await Wire.open(server.url)
    source = png_bytes()
    [item] = await wire.run({"taskType": "imageUpload", "image": "data:image/png;base64," +
                             base64.b64encode(source).decode()})
    assert set(item) == {"taskType", "taskUUID", "imageUUID", "imageURL"}
    assert await asyncio.to_thread(fetch, item["imageURL"]) == ("image/png", source)
    await wire.close()


async def test_unknown_model_and_missing_weights_are_clear_errors(server):
    wire = await Wire.open(server.url)
    error = await wire.error(inference(model="civitai:1@1"))
    assert error["code"] == "modelNotFound" and error["parameter"] == "model"
    error = await wire.error(inference(model="sd15", width=512, height=512))
    assert error["code"] == "modelNotFound" and "stable-diffusion-v1-5" in error["message"]
    await wire.close()
