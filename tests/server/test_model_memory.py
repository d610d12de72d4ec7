"""Model memory behind a real server: --preload, --max-loaded-models with --ram-models, and what modelSearch
says is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imagewire.air_registry.weights import local_model_dir
from tests.server.test_metrics import scrape, value
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


async def test_a_budget_below_the_models_size_runs_and_says_its_plan_in_model_search_and_metrics(
        start_server, models_dir: Path, tmp_path: Path):
    from imagewire.air_registry.catalog import Catalog
    from imagewire.air_registry.loader import PipelineCache
    from imagewire.air_registry.memory_plan import MODEL_OFFLOAD, peak_of, read_sizes

    # The budget model offload needs for the tiny model (in float32, at the server's default batch size):
    # less than all on the device needs.
    folder = models_dir / "imagewire-tiny-1"
    entry = Catalog.load().resolve("imagewire:tiny@1")
    unbounded = PipelineCache(device="cpu", data_dir=tmp_path, max_batch_size=4).plan(entry, folder)
    size = read_sizes(folder, 4)
    assert size is not None
    budget = peak_of(MODEL_OFFLOAD, size, unbounded.activation_bytes)[1]
    assert budget < unbounded.peak_bytes
    server = await start_server(device_memory_bytes=budget)
    wire = await Wire.open(server.url)
    [image] = await wire.run(inference())
    assert image["imageUUID"]
    [result] = await wire.run({"taskType": "modelSearch", "search": "imagewire:tiny@1"})
    [found] = [model for model in result["results"] if model["air"] == "imagewire:tiny@1"]
    assert (found["loadedOn"], found["memoryPlan"]) == ("device", MODEL_OFFLOAD)
    samples = await scrape(server)
    # Offloaded: every byte of its weights waits in host RAM between calls.
    assert value(samples, "imagewire_model_bytes", model="imagewire:tiny@1", device="cpu") == size.total
    await wire.close()


def _refiner_pair_budget(models_dir: Path, max_batch_size: int) -> tuple[int, Any, Any]:
    """A budget where the tiny SDXL model alone goes all on the device, its refiner then fits in no placement
    beside it, and the two fit together offloaded: (budget, model entry, refiner entry)."""
    from imagewire.air_registry.catalog import Catalog
    from imagewire.air_registry.loader import PipelineCache
    from imagewire.air_registry.memory_plan import MODEL_OFFLOAD, PLACEMENTS, ModelSize, peak_of, read_sizes
    from imagewire.air_registry.weights import local_model_dir

    catalog = Catalog.load()
    model, refiner = catalog.resolve("imagewire:tiny-sdxl@1"), catalog.resolve("imagewire:tiny-sdxl-refiner@1")
    model_size, refiner_size = (read_sizes(models_dir / local_model_dir(entry, Path(".")).name, 4)
                                for entry in (model, refiner))
    assert model_size is not None and refiner_size is not None
    alone = PipelineCache(device="cpu", data_dir=models_dir, max_batch_size=max_batch_size).plan(
        model, models_dir / local_model_dir(model, Path(".")).name)
    refiner_least = min(peak_of(placement, refiner_size, alone.activation_bytes)[1] for placement in PLACEMENTS)
    together = peak_of(MODEL_OFFLOAD, ModelSize.of_models([model_size, refiner_size]), alone.activation_bytes)[1]
    budget = max(alone.peak_bytes, together)
    assert budget < alone.resident_bytes + refiner_least, "the pair fits one beside the other: no test"
    return budget, model, refiner


def test_a_refiner_that_fits_nowhere_beside_its_model_gets_one_plan_with_it(models_dir: Path, tmp_path: Path):
    from imagewire.air_registry.loader import PipelineCache, placement_of
    from imagewire.air_registry.memory_plan import ALL_ON_DEVICE

    budget, model, refiner = _refiner_pair_budget(models_dir, max_batch_size=4)
    cache = PipelineCache(device="cpu", data_dir=tmp_path, max_batch_size=4, memory_budget=budget, max_loaded=2)
    weights = {entry.air: models_dir / local_model_dir(entry, Path(".")).name for entry in (model, refiner)}
    base = cache.text_to_image(model, weights[model.air])
    assert cache.plans[model.air].placement == ALL_ON_DEVICE  # alone, it has the fastest placement
    refining = cache.image_to_image(refiner, weights[refiner.air], keep={model.air})
    plans = cache.plans
    # One placement for both, the fastest the pair fits in, and every call within the budget beside the other.
    assert plans[model.air].placement == plans[refiner.air].placement != ALL_ON_DEVICE
    assert placement_of(base) == placement_of(refining) == plans[model.air].placement
    for air in (model.air, refiner.air):
        assert cache.resident_bytes(besides={air}) + plans[air].peak_bytes <= budget


async def test_a_refiner_task_on_a_budget_that_needs_one_plan_for_both_gives_the_same_image(
        start_server, models_dir: Path):
    from imagewire.server.config import Config
    from tests.images import difference, pixels

    budget, _, _ = _refiner_pair_budget(models_dir, max_batch_size=Config().max_batch_size)
    request = inference(model="imagewire:tiny-sdxl@1", steps=4, seed=11, outputType="base64Data",
                        refiner={"model": "imagewire:tiny-sdxl-refiner@1", "startStep": 2})
    images = []
    for settings in ({}, {"device_memory_bytes": budget, "max_loaded_models": 2}):
        server = await start_server(**settings)
        wire = await Wire.open(server.url)
        [image] = await wire.run(dict(request))
        images.append(pixels(image))
        await wire.close()
    assert difference(images[0], images[1]) <= 1
