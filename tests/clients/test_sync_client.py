"""The blocking facade, called from a worker thread while the server runs on the test's loop."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import pytest
from imagewire_client import ImagewireError, SyncClient
from PIL import Image

from tests.wire import API_KEY

TINY = "imagewire:tiny@1"


def png_file(folder: Path, width: int = 192, height: int = 128) -> Path:
    path = folder / "seed.png"
    Image.new("RGB", (width, height), "purple").save(path)
    return path


def client_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "imagewire-client-loop"]


def image_size(data: bytes | None) -> tuple[int, int]:
    assert data is not None
    with Image.open(io.BytesIO(data)) as image:
        return image.size


async def test_sync_client_uploads_and_generates_text_to_image_and_image_to_image(server, tmp_path: Path):
    seed_file = png_file(tmp_path)

    def work():
        with SyncClient(server.url, API_KEY) as client:
            uploaded = client.upload(seed_file)
            text_to_image = client.image_inference(
                model=TINY, positive_prompt="a lighthouse at dusk", width=128, height=128, steps=2, seed=21,
                number_results=2, output_type="base64Data")
            image_to_image = client.image_inference(
                model=TINY, positive_prompt="a lighthouse at dawn", seed_image=uploaded, strength=0.5, steps=2,
                output_type=["URL", "base64Data"])
            models = client.models(TINY, category="checkpoint")
        return uploaded, text_to_image, image_to_image, models

    uploaded, text_to_image, image_to_image, models = await asyncio.to_thread(work)
    assert len(uploaded) == 36
    assert [result.seed for result in text_to_image] == [21, 22]
    assert all(image_size(result.image_bytes) == (128, 128) for result in text_to_image)
    assert image_size(image_to_image[0].image_bytes) == (192, 128)
    assert image_to_image[0].image_url
    assert [model.air for model in models] == [TINY]


async def test_sync_client_raises_the_servers_errors_in_the_calling_thread(server):
    def work():
        with SyncClient(server.url, API_KEY) as client:
            with pytest.raises(ImagewireError) as bad_width:
                client.image_inference(model=TINY, positive_prompt="a fox", width=500, height=128, steps=2)
            # The connection survives a refused task.
            assert client.models("tiny")
        with pytest.raises(ImagewireError) as bad_key:
            with SyncClient(server.url, "wrong-key"):
                pass
        assert not client_threads(), "a refused client leaves no thread behind"
        return bad_width.value, bad_key.value

    bad_width, bad_key = await asyncio.to_thread(work)
    assert (bad_width.code, bad_width.parameter) == ("invalidWidth", "width")
    assert bad_key.code == "invalidApiKey"


async def test_sync_client_close_is_idempotent_and_stops_its_thread(server):
    def work():
        client = SyncClient(server.url, API_KEY).connect()
        loop_threads = client_threads()
        client.close()
        client.close()
        with pytest.raises(ImagewireError) as closed:
            client.models()
        return loop_threads, closed.value

    loop_threads, closed = await asyncio.to_thread(work)
    assert loop_threads and not any(thread.is_alive() for thread in loop_threads)
    assert closed.code == "clientClosed"


async def test_the_tool_calls_of_the_blocking_client(server, tmp_path):
    picture = Image.linear_gradient("L").resize((24, 16)).convert("RGB")

    def work():
        with SyncClient(server.url, API_KEY) as client:
            upscaled = client.upscale(picture, factor=2, output_type="base64Data", include_cost=True)
            cutout = client.remove_background(upscaled.image_uuid, output_type="base64Data",
                                              settings={"returnOnlyMask": True})
            caption = client.caption(upscaled.input_image_uuid)
            versions = client.enhance_prompt("a castle", versions=2, max_length=20)
        return upscaled, cutout, caption, versions

    upscaled, cutout, caption, versions = await asyncio.to_thread(work)
    assert Image.open(io.BytesIO(upscaled.image_bytes)).size == (48, 32) and upscaled.cost is not None
    mask = Image.open(io.BytesIO(cutout.image_bytes))
    assert mask.mode == "L" and mask.size == (48, 32) and cutout.input_image_uuid == upscaled.image_uuid
    assert caption.text
    assert len(versions) == 2 and len({version.text for version in versions}) == 2
