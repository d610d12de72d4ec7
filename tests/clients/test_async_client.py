"""The asyncio client against a real imagewire server on the embedded tiny model."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import urllib.request
from pathlib import Path

import pytest
from imagewire_client import Client, ImageResult, ImagewireError
from imagewire_client.images import is_image_uuid
from PIL import Image, ImageChops, ImageStat
from websockets.asyncio.server import serve

from tests.engines import HeldEngine
from tests.timing import seconds
from tests.wire import API_KEY

TINY = "imagewire:tiny@1"


def png_bytes(width: int = 192, height: int = 128, color: str = "teal") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


async def fetch(url: str) -> bytes:
    # The server runs on this event loop: fetch from a thread so it can answer.
    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=seconds(10)) as response:
            return response.read()

    return await asyncio.to_thread(get)


def decoded_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def mean_difference(first: ImageResult, second: ImageResult) -> float:
    """Mean absolute pixel difference (0-255) of two generated images."""
    one, two = (Image.open(io.BytesIO(result.image_bytes or b"")).convert("RGB") for result in (first, second))
    return sum(ImageStat.Stat(ImageChops.difference(one, two)).mean) / 3


async def generate(client: Client, **overrides: object) -> list[ImageResult]:
    arguments: dict[str, object] = {"model": TINY, "positive_prompt": "a red fox in the snow", "width": 128,
                                    "height": 128, "steps": 2, "output_type": "base64Data"}
    arguments.update(overrides)
    return await client.image_inference(**arguments)  # type: ignore[arg-type]


async def drop_connections(server) -> None:
    for connection in list(server.connections):
        await connection.close()


async def stop_server(server) -> None:
    """Stop ``server`` while a client is still connected to it (its socket is closed with 1001)."""
    await server.stop(grace=seconds(1))


# ---------------------------------------------------------------- uploads


async def test_upload_accepts_a_path_bytes_a_pil_image_and_a_url(server, tmp_path: Path):
    picture = png_bytes(192, 128)
    file = tmp_path / "picture.png"
    file.write_bytes(picture)
    async with Client(server.url, API_KEY) as client:
        from_str_path = await client.upload(str(file))
        from_path = await client.upload(file)
        from_bytes = await client.upload(picture)
        from_pil = await client.upload(Image.new("RGBA", (96, 160), "orange"))
        stored = await client.upload_image(picture)
        from_url = await client.upload(stored.url)
    uuids = [from_str_path, from_path, from_bytes, from_pil, stored.uuid, from_url]
    assert all(is_image_uuid(uuid) for uuid in uuids)
    assert len(set(uuids)) == len(uuids), "every upload is stored under a new UUID"
    assert stored.url.startswith(f"http://127.0.0.1:{server.port}/") and stored.uuid in stored.url
    assert decoded_size(await fetch(stored.url)) == (192, 128)


async def test_an_unreadable_local_file_fails_before_anything_is_sent(server, tmp_path: Path):
    async with Client(server.url, API_KEY) as client:
        with pytest.raises(ImagewireError) as failure:
            await client.upload(str(tmp_path / "missing.png"))
    assert failure.value.code == "invalidImage"
    assert failure.value.parameter == "image"


async def test_bytes_that_are_not_an_image_get_the_servers_error_naming_the_parameter(server):
    async with Client(server.url, API_KEY) as client:
        with pytest.raises(ImagewireError) as failure:
            await client.upload(b"definitely not an image")
    assert failure.value.parameter == "image"
    assert failure.value.task_uuid is not None


# ---------------------------------------------------------------- inference


async def test_text_to_image_returns_typed_results_sorted_by_seed(server):
    async with Client(server.url, API_KEY) as client:
        results = await generate(client, seed=7, number_results=3, output_type=["URL", "base64Data"],
                                 include_cost=True)
    assert [result.seed for result in results] == [7, 8, 9]
    assert len({result.image_uuid for result in results}) == 3
    for result in results:
        assert result.image_bytes is not None and result.image_bytes.startswith(b"\x89PNG")
        assert decoded_size(result.image_bytes) == (128, 128)
        assert result.image_url is not None and result.image_url.endswith(f"{result.image_uuid}.png")
        assert result.cost is not None and result.cost >= 0
    assert decoded_size(await fetch(results[0].image_url)) == (128, 128)


async def test_url_output_leaves_image_bytes_empty_and_formats_are_honoured(server):
    async with Client(server.url, API_KEY) as client:
        (url_only,) = await generate(client, output_type="URL")
        (jpeg,) = await generate(client, output_type="dataURI", output_format="JPG", output_quality=60)
    assert url_only.image_bytes is None and url_only.image_url
    assert jpeg.image_data_uri is not None and jpeg.image_data_uri.startswith("data:image/jpeg;base64,")
    assert jpeg.image_bytes is not None and jpeg.image_bytes.startswith(b"\xff\xd8\xff")


async def test_image_to_image_takes_every_form_of_seed_image(server, tmp_path: Path):
    picture = png_bytes(192, 128)
    file = tmp_path / "seed.png"
    file.write_bytes(picture)
    async with Client(server.url, API_KEY) as client:
        stored = await client.upload_image(picture)
        (generated,) = await generate(client)
        forms = {
            "str path": str(file),
            "Path": file,
            "bytes": picture,
            "PIL": Image.open(io.BytesIO(picture)),
            "uploaded UUID": stored.uuid,
            "data URI": "data:image/png;base64," + base64.b64encode(picture).decode(),
            "URL": stored.url,
        }
        for form, seed_image in forms.items():
            # Without width/height the result takes the seed image's size.
            (result,) = await generate(client, seed_image=seed_image, strength=0.5, width=None, height=None)
            assert result.image_bytes is not None
            assert decoded_size(result.image_bytes) == (192, 128), form
        (from_generated,) = await generate(client, seed_image=generated.image_uuid, strength=0.6)
    assert decoded_size(from_generated.image_bytes or b"") == (128, 128)


async def test_eight_concurrent_calls_on_one_connection_each_get_their_own_results(server):
    seeds = list(range(100, 108))
    async with Client(server.url, API_KEY) as client:
        batches = await asyncio.gather(*(generate(client, seed=seed) for seed in seeds))
        assert len(server.connections) == 1
        (again,) = await generate(client, seed=103)
    assert [batch[0].seed for batch in batches] == seeds
    assert len({batch[0].task_uuid for batch in batches}) == 8
    # The same seed gives the same picture, so a result handed to the wrong call would show here.
    by_seed = {batch[0].seed: batch[0] for batch in batches}
    assert mean_difference(again, by_seed[103]) < 1
    assert all(mean_difference(again, by_seed[seed]) > 10 for seed in seeds if seed != 103)


async def test_models_lists_the_servers_models(server):
    async with Client(server.url, API_KEY) as client:
        every = await client.models()
        tiny = await client.models(TINY, category="checkpoint")
    assert TINY in [model.air for model in every]
    assert [model.air for model in tiny] == [TINY]
    assert tiny[0].defaultWidth >= 128 and tiny[0].available


async def test_text_to_image_without_a_size_takes_the_models_default(server):
    async with Client(server.url, API_KEY) as client:
        by_alias = await client.model_info("TINY")  # an alias, in any case
        assert by_alias is not None and by_alias.air == TINY and by_alias.defaultWidth == 256
        assert await client.model_info("imagewire:tiny") is None  # a part of an AIR names nothing
        assert await client.model_info("nowhere:1@1") is None
        (default,) = await generate(client, width=None, height=None)
        (taller,) = await generate(client, width=128, height=None)
        (from_seed,) = await generate(client, width=None, height=None, seed_image=png_bytes(192, 128))
    assert decoded_size(default.image_bytes or b"") == (256, 256)
    assert decoded_size(taller.image_bytes or b"") == (128, 256)
    assert decoded_size(from_seed.image_bytes or b"") == (192, 128)


# ---------------------------------------------------------------- errors


async def test_a_bad_width_raises_imagewire_error_naming_the_parameter(server):
    async with Client(server.url, API_KEY) as client:
        with pytest.raises(ImagewireError) as failure:
            await generate(client, width=500)
        (still_working,) = await generate(client)
    error = failure.value
    assert (error.code, error.parameter) == ("invalidWidth", "width")
    assert "500" in error.message and "512" in error.message
    assert error.task_uuid is not None and error.task_type == "imageInference"
    assert str(error).startswith("invalidWidth: ") and str(error).endswith("(parameter: width)")
    assert still_working.image_bytes


async def test_an_unknown_scheduler_lists_the_allowed_values(server):
    async with Client(server.url, API_KEY) as client:
        with pytest.raises(ImagewireError) as failure:
            await generate(client, scheduler="NoSuchScheduler")
    assert failure.value.parameter == "scheduler"
    assert failure.value.allowed_values and "Euler" in failure.value.allowed_values


async def test_an_unknown_model_raises_model_not_found(server):
    async with Client(server.url, API_KEY) as client:
        with pytest.raises(ImagewireError) as failure:
            await generate(client, model="civitai:1@1")
    assert failure.value.code == "modelNotFound"


async def test_a_bad_api_key_raises_invalid_api_key(server):
    with pytest.raises(ImagewireError) as failure:
        async with Client(server.url, "not-the-key"):
            pass
    assert failure.value.code == "invalidApiKey"
    assert failure.value.parameter == "apiKey"


async def test_no_server_raises_connection_failed():
    with pytest.raises(ImagewireError) as failure:
        await Client("ws://127.0.0.1:9/v1", API_KEY, connect_timeout=seconds(2)).connect()
    assert failure.value.code == "connectionFailed"


async def test_a_call_without_an_answer_times_out_and_the_client_stays_usable(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    try:
        async with Client(server.url, API_KEY) as client:
            with pytest.raises(ImagewireError) as failure:
                await generate(client, timeout=seconds(0.5))
            assert await client.models("tiny")
    finally:
        engine.release.set()
    assert failure.value.code == "timeout"
    assert failure.value.task_uuid is not None


async def test_close_is_idempotent_and_later_calls_fail_cleanly(server):
    client = Client(server.url, API_KEY)
    await client.connect()
    await client.close()
    await client.close()
    with pytest.raises(ImagewireError) as failure:
        await client.models()
    assert failure.value.code == "clientClosed"


async def test_calls_connect_on_first_use(server):
    client = Client(server.url, API_KEY)
    try:
        assert await client.models("tiny")
        assert client.connected and client.session_uuid
    finally:
        await client.close()


# ---------------------------------------------------------------- dropped connections


async def test_the_next_call_succeeds_after_the_server_drops_the_socket(server):
    async with Client(server.url, API_KEY) as client:
        (before,) = await generate(client, seed=1)
        session = client.session_uuid
        await drop_connections(server)
        (after,) = await generate(client, seed=1, timeout=seconds(30))
        assert client.session_uuid == session, "the client resumed its session"
    assert after.image_bytes == before.image_bytes


async def test_results_of_a_task_in_flight_arrive_after_a_reconnect(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    try:
        async with Client(server.url, API_KEY) as client:
            call = asyncio.create_task(generate(client, seed=5, number_results=2, timeout=seconds(30)))
            assert await asyncio.to_thread(engine.started.wait, seconds(10))
            await drop_connections(server)
            # Finished while the client has no socket: the server keeps the results for the session.
            engine.release.set()
            results = await call
    finally:
        engine.release.set()
    assert [result.seed for result in results] == [5, 6]


async def test_the_client_reconnects_to_a_restarted_server(start_server):
    first = await start_server()
    async with Client(first.url, API_KEY) as client:
        assert await client.models("tiny")
        await stop_server(first)
        second = await start_server(port=first.port)
        (result,) = await generate(client, timeout=seconds(60))
        assert second.connections, "the client is connected to the new server"
    assert result.image_bytes


async def test_calls_fail_with_connection_lost_when_the_server_stays_away(start_server):
    server = await start_server()
    async with Client(server.url, API_KEY, reconnect_attempts=2) as client:
        await stop_server(server)
        with pytest.raises(ImagewireError) as failure:
            await generate(client, timeout=seconds(30))
    assert failure.value.code == "connectionLost"


async def test_keep_alive_pings_hold_an_idle_connection_open(server):
    # Silence longer than 2 s would drop the socket; pings every 0.1 s keep it well inside that.
    async with Client(server.url, API_KEY, ping_interval=seconds(0.1), silence_timeout=seconds(2.0)) as client:
        connection = client._websocket
        await asyncio.sleep(seconds(3))
        assert client._websocket is connection, "pongs arrived, so the client never reconnected"
        assert await client.models("tiny")


async def test_a_silent_server_gets_pings_and_then_a_reconnect_that_resumes_the_session():
    """A peer that authenticates but never answers: the client pings, then gives up on the socket."""
    received: list[list[dict]] = []
    connections = 0

    async def silent_peer(websocket) -> None:
        nonlocal connections
        connections += 1
        async for frame in websocket:
            tasks = json.loads(frame)
            received.append(tasks)
            if tasks[0]["taskType"] == "authentication":
                answer = {"taskType": "authentication", "connectionSessionUUID": "5c3e0e36-61f4-4c4b-9d59-1f0e1c4f8a21"}
                await websocket.send(json.dumps({"data": [answer]}))

    def authentications() -> list[dict]:
        return [tasks[0] for tasks in received if tasks[0]["taskType"] == "authentication"]

    async with serve(silent_peer, "127.0.0.1", 0) as peer:
        port = peer.sockets[0].getsockname()[1]
        async with Client(f"ws://127.0.0.1:{port}/v1", API_KEY, ping_interval=seconds(0.1),
                          silence_timeout=seconds(1.0)) as client:
            deadline = asyncio.get_running_loop().time() + 30
            while not (len(authentications()) >= 2 and [{"taskType": "ping", "ping": True}] in received):
                assert asyncio.get_running_loop().time() < deadline, received
                await asyncio.sleep(seconds(0.05))
    assert connections >= 2, "the client dropped the silent socket and connected again"
    first, second = authentications()[:2]
    assert "connectionSessionUUID" not in first
    assert second["connectionSessionUUID"] == "5c3e0e36-61f4-4c4b-9d59-1f0e1c4f8a21"
    assert [{"taskType": "ping", "ping": True}] in received
    assert client.session_uuid == "5c3e0e36-61f4-4c4b-9d59-1f0e1c4f8a21"


async def test_add_ons_reach_the_server_and_change_the_image(server):
    async with Client(server.url, API_KEY) as client:
        [plain] = await generate(client, seed=4)
        [with_lora] = await generate(client, seed=4, lora=[("imagewire:tiny-lora@1", 0.8)])
        [skipped] = await generate(client, seed=4, clip_skip=1, prompt_weighting="compel")
        [sdxl] = await generate(client, model="imagewire:tiny-sdxl@1", seed=4, steps=4)
        [refined] = await generate(client, model="imagewire:tiny-sdxl@1", seed=4, steps=4,
                                   refiner="imagewire:tiny-sdxl-refiner@1", refiner_start_step=2)
        with pytest.raises(ImagewireError) as failure:
            await generate(client, lora=[("imagewire:tiny-lora@1", 9)])
    images = [result.image_bytes for result in (plain, with_lora, skipped, sdxl, refined)]
    assert len(set(images)) == 5
    assert failure.value.code == "invalidParameter" and failure.value.parameter == "lora[0].weight"


# ---------------------------------------------------------------- editing


async def test_inpainting_outpainting_controlnet_and_guide_images(start_server):
    import numpy as np
    from imagewire_client import ControlNet, Outpaint

    from tests.server.test_editing import BOX, mask_picture, outside, seed_picture

    server = await start_server(safety_checker="imagewire:tiny-safety@1")
    seed = seed_picture()
    async with Client(server.url, API_KEY) as client:
        # Any image form: a PIL image for the seed, bytes for the mask.
        buffer = io.BytesIO()
        mask_picture().save(buffer, "PNG")
        [inpainted] = await client.image_inference(
            model=TINY, positive_prompt="a door", seed_image=seed, mask_image=buffer.getvalue(), width=128,
            height=128, steps=2, seed=4, output_type="base64Data", mask_margin=32, check_nsfw=True)
        guide = await client.controlnet_preprocess(seed, low_threshold=50, high_threshold=150)
        [guided] = await client.image_inference(
            model=TINY, positive_prompt="a door", width=128, height=128, steps=2, seed=4, output_type="base64Data",
            control_net=[ControlNet(model="imagewire:tiny-controlnet@1", guide_image=guide.uuid, weight=0.8,
                                    end_step_percentage=50, control_mode="prompt")])
        [extended] = await client.image_inference(
            model=TINY, positive_prompt="a door", seed_image=seed, steps=2, seed=4, output_type="base64Data",
            outpaint=Outpaint(right=64, blur=8))
    result = np.asarray(Image.open(io.BytesIO(inpainted.image_bytes)).convert("RGB"))
    assert np.array_equal(result[outside(BOX)], np.asarray(seed)[outside(BOX)])
    assert inpainted.nsfw_content is False
    assert guide.image_bytes and set(np.unique(np.asarray(Image.open(io.BytesIO(guide.image_bytes))))) <= {0, 255}
    assert Image.open(io.BytesIO(guided.image_bytes)).size == (128, 128)
    assert Image.open(io.BytesIO(extended.image_bytes)).size == (192, 128)


async def test_a_mask_of_what_was_found_goes_into_an_inpainting_request(server):
    import numpy as np

    from tests.server.test_editing import seed_picture

    seed = seed_picture()
    async with Client(server.url, API_KEY) as client:
        masked = await client.mask(seed, model="runware:35@4", max_detections=3, mask_padding=2, mask_blur=0)
        [inpainted] = await client.image_inference(
            model=TINY, positive_prompt="a door", seed_image=masked.input_image_uuid, mask_image=masked.uuid,
            width=128, height=128, steps=2, seed=4, strength=1.0, output_type="base64Data")
    mask = np.asarray(Image.open(io.BytesIO(masked.image_bytes)))
    assert mask.shape == (128, 128) and 0 < len(masked.detections) <= 3 and masked.url
    white = np.zeros((128, 128), dtype=bool)
    for found in masked.detections:
        white[max(0, found.y_min - 2):found.y_max + 2, max(0, found.x_min - 2):found.x_max + 2] = True
    assert np.array_equal(mask == 255, white) and np.array_equal(mask == 0, ~white)
    result = np.asarray(Image.open(io.BytesIO(inpainted.image_bytes)).convert("RGB"))
    assert np.array_equal(result[~white], np.asarray(seed)[~white])


# ---------------------------------------------------------------- progress and cancelling


async def test_on_progress_hears_each_step_before_the_results(server):
    heard: list[dict] = []
    async with Client(server.url, API_KEY) as client:
        results = await generate(client, steps=5, number_results=2, on_progress=heard.append)
    assert len(results) == 2 and all("imageUUID" not in item for item in heard)
    for index in (0, 1):
        steps = [item["step"] for item in heard if item.get("resultIndex") == index]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 5


async def test_a_call_can_be_cancelled_by_its_task_uuid(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    async with Client(server.url, API_KEY) as client:
        task_uuid = "5b3a3f7e-8f2c-4c9e-9d3a-0c6e1a2b3c4d"
        call = asyncio.create_task(generate(client, task_uuid=task_uuid))
        assert await asyncio.to_thread(engine.started.wait, seconds(10))
        assert await client.cancel(task_uuid) is True
        with pytest.raises(ImagewireError) as failure:
            await call
        assert failure.value.code == "taskCancelled"
        assert await client.cancel(task_uuid) is False  # it has ended
        with pytest.raises(ImagewireError) as unknown:
            await client.cancel("6b3a3f7e-8f2c-4c9e-9d3a-0c6e1a2b3c4d")
        assert unknown.value.code == "taskNotFound"
    engine.release.set()


def test_each_model_upload_keyword_reaches_a_field_of_the_task():
    """``Client.upload_model`` passes its keywords on to ``requests.model_upload``, whose list is
    ``ModelUploadFields``: each of them fills a field of the modelUpload it builds."""
    import typing

    import msgspec
    from imagewire_client import requests, schema

    values: dict[str, typing.Any] = {"tags": ["mine"], "default_steps": 3, "default_cfg": 5.5,
                                     "default_strength": 0.5}
    keywords = typing.get_type_hints(requests.ModelUploadFields)
    fields = {keyword: values.get(keyword, f"value of {keyword}") for keyword in keywords}
    task = requests.model_upload("https://example.com/model.safetensors", **fields)
    required = requests.ModelUploadFields.__required_keys__
    bare = requests.model_upload("https://example.com/model.safetensors",
                                 **{keyword: fields[keyword] for keyword in required})

    def filled(made: schema.ModelUpload) -> set[str]:
        return {name for name in msgspec.structs.asdict(made) if getattr(made, name) is not None}

    assert len(filled(task) - filled(bare)) == len(keywords) - len(required)
    assert isinstance(task, schema.ModelUpload) and task.positiveTriggerWords == "value of trigger_word"
