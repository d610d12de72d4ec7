"""civitai:MODEL@VERSION through a real server: fetched from a stand-in Civitai API on loopback with
--allow-downloads, then run; described, not fetched, without it; kept for the next start."""

from __future__ import annotations

import asyncio

import pytest
from runware import IModelSearch, Runware
from runware.utils import RunwareAPIError

from tests.civitai import fake_civitai
from tests.images import generate
from tests.timing import seconds
from tests.wire import API_KEY, Wire, eventually, inference, new_uuid

AIR = "civitai:4201@130072"


@pytest.fixture
async def api(tiny_checkpoint):
    async with fake_civitai() as civitai:
        civitai.add_version(model=4201, version=130072, data=tiny_checkpoint)
        yield civitai


async def test_a_civitai_checkpoint_is_downloaded_then_runs_and_is_kept(start_server, own_data_dir, api):
    server = await start_server(data_dir=own_data_dir, allow_downloads=True, civitai_url=api.url)
    image = await generate(server, AIR)
    # The checkpoint holds the tiny model's weights in the original layout: read back, they make its image.
    assert image == await generate(server, "imagewire:tiny@1")
    assert api.downloads() == 1
    client = Runware(api_key=API_KEY, url=server.url)
    await client.connect()
    try:
        found = await client.modelSearch(payload=IModelSearch(search="civitai:4201"))
    finally:
        await client.disconnect()
    [model] = found.results
    assert (model.air, model.architecture, model.name) == (AIR, "tiny", "Model 4201 v130072")
    # A restarted server without downloads, with the API gone, still has it.
    await api.close()
    again = await start_server(data_dir=own_data_dir)
    assert await generate(again, AIR) == image


async def test_without_downloads_the_answer_names_the_download_it_would_make(start_server, own_data_dir, api):
    server = await start_server(data_dir=own_data_dir, civitai_url=api.url)
    wire = await Wire.open(server.url)
    error = await wire.error(inference(model=AIR))
    assert error["code"] == "modelNotFound" and error["parameter"] == "model"
    assert error["message"] == (
        f"model '{AIR}' is not in this server's catalog. It names a Civitai checkpoint: with --allow-downloads "
        f"this server fetches it from Civitai: the version's details from {api.url}/api/v1/model-versions/130072, "
        f"then its primary safetensors file into {own_data_dir / 'models' / 'civitai-4201-130072'}; "
        "or add it to a --catalog file")
    assert api.requests == []
    await wire.close()


async def test_a_failed_download_is_a_clear_error_and_the_server_serves_on(start_server, own_data_dir, api):
    api.interrupted.add("model.safetensors")
    server = await start_server(data_dir=own_data_dir, allow_downloads=True, civitai_url=api.url)
    wire = await Wire.open(server.url)
    error = await wire.error(inference(model=AIR))
    assert error["code"] == "modelNotFound" and error["parameter"] == "model"
    assert error["message"].startswith(f"the weights of {AIR} could not be downloaded: the download from {api.url}")
    assert not (own_data_dir / "models" / "civitai-4201-130072").exists()
    [item] = await wire.run(inference())
    assert item["imageUUID"]
    with pytest.raises(RunwareAPIError):
        await generate(server, "civitai:4201@999")
    await wire.close()


async def test_a_civitai_default_model_is_fetched_before_the_server_listens(start_server, own_data_dir, api):
    server = await start_server(data_dir=own_data_dir, allow_downloads=True, civitai_url=api.url, default_model=AIR)
    assert api.downloads() == 1
    assert server.services.catalog.get(AIR) is not None
    await generate(server, AIR)
    assert api.downloads() == 1


async def test_a_default_model_that_does_not_exist_stops_the_start(start_server, own_data_dir, api):
    with pytest.raises(ValueError, match="--default-model 'civitai:1@2' is not on Civitai"):
        await start_server(data_dir=own_data_dir, allow_downloads=True, civitai_url=api.url,
                           default_model="civitai:1@2")
    with pytest.raises(ValueError, match="--default-model 'nothing:here@1' is not in this server's catalog"):
        await start_server(data_dir=own_data_dir, default_model="nothing:here@1")
    for other in ("imagewire:tiny-controlnet@1", "imagewire:tiny-upscaler@1"):
        with pytest.raises(ValueError, match=f"--default-model '{other}' is an? .* model; name an imageInference"):
            await start_server(data_dir=own_data_dir, default_model=other)


async def test_while_one_key_downloads_other_keys_are_served_as_usual(start_server, own_data_dir, api,
                                                                      tiny_checkpoint):
    """Six slow downloads of one key used to take every thread of asyncio's default pool, which also encodes
    results: another key's inference then waited for them. Downloads now run on threads of their own, at most
    --max-downloads-per-key of a key at once."""
    slow = []
    for version in range(1, 7):
        name = f"slow-{version}.safetensors"
        slow.append(api.add_version(model=77, version=version, data=tiny_checkpoint, file_name=name))
        api.seconds_per_chunk[name] = 0.2   # a few tens of seconds a file
    server = await start_server(data_dir=own_data_dir, allow_downloads=True, civitai_url=api.url,
                                api_keys=("downloader", "other"), max_downloads=2, max_downloads_per_key=1)
    downloader, other = (await Wire.open(server.url, api_key="downloader"),
                         await Wire.open(server.url, api_key="other"))
    await downloader.send([inference(model=air) for air in slow])
    await eventually(lambda: api.downloads() >= 1)
    started = asyncio.get_running_loop().time()
    for seed in range(3):
        [item] = await other.run(inference(seed=seed, outputType="base64Data"), timeout=seconds(15))
        assert item["imageBase64Data"]
    [found] = await other.run({"taskType": "modelSearch", "taskUUID": new_uuid(), "search": "tiny"})
    assert found["results"]
    assert asyncio.get_running_loop().time() - started < seconds(15)
    # One of the downloader's files at a time: its others wait for it, not for the server's threads.
    assert api.downloads() == 1
    await downloader.close()
    await other.close()
