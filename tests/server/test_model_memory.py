"""Model memory behind a real server: --preload, --max-loaded-models with --ram-models, and what modelSearch
says is loaded."""

from __future__ import annotations

import pytest

from tests.wire import Wire, inference


async def where(wire: Wire, *airs: str) -> dict[str, str | None]:
    [result] = await wire.run({"taskType": "modelSearch", "limit": 100})
    found = {model["air"]: model for model in result["results"]}
    for air in airs:
        assert found[air]["loaded"] is (found[air]["loadedOn"] is not None)
    return {air: found[air]["loadedOn"] for air in airs}


async def test_preloaded_models_and_where_they_are_after_each_request(start_server):
    server = await start_server(preload=("imagewire:tiny-sdxl@1",), max_loaded_models=1, ram_models=1)
    wire = await Wire.open(server.url)
    models = ("imagewire:tiny@1", "imagewire:tiny-sdxl@1", "imagewire:sd15@1", "imagewire:tiny-lora@1")
    # The default model loaded first, then the preload, which moved it to host RAM.
    assert await where(wire, *models) == {"imagewire:tiny@1": "ram", "imagewire:tiny-sdxl@1": "device",
                                          "imagewire:sd15@1": None, "imagewire:tiny-lora@1": None}
    await wire.run(inference(lora=[{"model": "tiny-lora"}]))
    assert await where(wire, *models) == {"imagewire:tiny@1": "device", "imagewire:tiny-sdxl@1": "ram",
                                          "imagewire:sd15@1": None, "imagewire:tiny-lora@1": "device"}
    await wire.close()


@pytest.mark.parametrize(("preload", "problem"), [
    ("nothing:here@1", "--preload 'nothing:here@1': 'nothing:here@1' is not in this server's catalog"),
    ("tiny-lora", "--preload 'tiny-lora' is a lora model; name an imageInference checkpoint"),
    ("tiny-upscaler", "--preload 'tiny-upscaler' is an upscaler model; name an imageInference checkpoint"),
])
async def test_a_preload_the_catalog_does_not_hold_stops_the_start(start_server, preload, problem):
    with pytest.raises(ValueError) as caught:
        await start_server(preload=(preload,))
    assert problem in str(caught.value)
