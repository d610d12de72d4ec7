"""modelSearch's documented filters and result fields: ``type``, ``conditioning``, ``architecture`` in the
public API's names as well as ours, and ``type``/``conditioning``/``heroImage`` in each result."""

from __future__ import annotations

from tests.wire import Wire


async def search(wire: Wire, **filters) -> dict:
    [result] = await wire.run({"taskType": "modelSearch", "limit": 100, **filters})
    return result


def airs(result: dict) -> set[str]:
    return {model["air"] for model in result["results"]}


async def test_type_filters_checkpoints_by_what_they_do(server):
    wire = await Wire.open(server.url)
    inpainting = await search(wire, type="inpainting")
    assert {"imagewire:sd15-inpaint@1", "imagewire:sdxl-inpaint@1"} <= airs(inpainting)
    assert all(model["type"] == "inpainting" and model["category"] == "checkpoint"
               for model in inpainting["results"])
    refiner = await search(wire, type="refiner")
    assert "imagewire:sdxl-refiner@1" in airs(refiner) and all(m["type"] == "refiner" for m in refiner["results"])
    base = await search(wire, type="base")
    assert {"imagewire:sd15@1", "imagewire:sdxl-base@1", "imagewire:tiny@1"} <= airs(base)
    assert not airs(base) & (airs(inpainting) | airs(refiner))
    # Only checkpoints have a type: a LoRA is found by none of them.
    assert "imagewire:tiny-lora@1" not in airs(base) | airs(inpainting) | airs(refiner)
    assert inpainting["totalResults"] == len(inpainting["results"])
    await wire.close()


async def test_a_type_outside_the_documented_ones_is_refused_naming_them(server):
    wire = await Wire.open(server.url)
    error = await wire.error({"taskType": "modelSearch", "type": "lightning"})
    assert error["parameter"] == "type" and "lightning" in error["message"]
    assert set(error["allowedValues"]) == {"base", "inpainting", "refiner"}
    await wire.close()


async def test_the_public_architecture_names_map_to_ours(server):
    wire = await Wire.open(server.url)
    sd1x = await search(wire, architecture="sd1x")
    assert {"imagewire:sd15@1", "imagewire:sd15-inpaint@1", "imagewire:sd15-controlnet-canny@1"} <= airs(sd1x)
    assert {model["architecture"] for model in sd1x["results"]} <= {"sd15", "sd15-inpaint"}
    # The public "sdxl" is SDXL of every type; our own row name alone would miss the refiner.
    sdxl = await search(wire, architecture="sdxl")
    assert {"imagewire:sdxl-base@1", "imagewire:sdxl-refiner@1", "imagewire:sdxl-inpaint@1"} <= airs(sdxl)
    flux1d = await search(wire, architecture="flux1d")
    assert flux1d["results"] and {m["architecture"] for m in flux1d["results"]} <= {"flux1-dev", "flux1-fill"}
    flux1s = await search(wire, architecture="flux1s")
    assert flux1s["results"] and {m["architecture"] for m in flux1s["results"]} == {"flux1-schnell"}
    # Our own names still work, and combine with type.
    assert airs(await search(wire, architecture="sdxl-refiner")) == {
        m["air"] for m in sdxl["results"] if m["architecture"] == "sdxl-refiner"}
    assert airs(await search(wire, architecture="sdxl", type="refiner")) == {"imagewire:sdxl-refiner@1"}
    # A public name no model here has finds nothing, rather than being refused.
    assert (await search(wire, architecture="imagen4ultra"))["totalResults"] == 0
    await wire.close()


async def test_an_architecture_named_nowhere_is_refused_with_both_lists(server):
    wire = await Wire.open(server.url)
    error = await wire.error({"taskType": "modelSearch", "architecture": "sd9"})
    assert (error["code"], error["parameter"]) == ("invalidParameter", "architecture")
    assert "'sd9'" in error["message"]
    assert {"sd1x", "flux1d", "pony", "sd15", "tiny", "flux1-dev"} <= set(error["allowedValues"])
    await wire.close()


async def test_results_say_type_conditioning_and_hero_image(server):
    wire = await Wire.open(server.url)
    by_air = {model["air"]: model for model in (await search(wire))["results"]}
    assert by_air["imagewire:sd15@1"]["type"] == "base"
    assert by_air["imagewire:sd15-inpaint@1"]["type"] == "inpainting"
    assert by_air["imagewire:sd15-controlnet-canny@1"]["conditioning"] == "canny"
    assert by_air["imagewire:sd15-controlnet-canny@1"]["type"] is None
    # Where we do not know a value, the field is null, as the docs allow.
    assert by_air["imagewire:tiny-controlnet@1"]["conditioning"] is None
    assert by_air["imagewire:sd15@1"]["conditioning"] is None
    assert all(model["heroImage"] is None for model in by_air.values())
    await wire.close()


async def test_conditioning_filters_controlnets(server):
    wire = await Wire.open(server.url)
    canny = await search(wire, conditioning="canny")
    assert airs(canny) == {"imagewire:sd15-controlnet-canny@1", "imagewire:sdxl-controlnet-canny@1"}
    assert (await search(wire, conditioning="depth"))["totalResults"] == 0
    await wire.close()


async def test_pages_are_cut_after_every_filter(server):
    wire = await Wire.open(server.url)
    everything = await search(wire, type="base")
    [page] = await wire.run({"taskType": "modelSearch", "type": "base", "limit": 2, "offset": 1})
    assert page["totalResults"] == everything["totalResults"]
    assert [m["air"] for m in page["results"]] == [m["air"] for m in everything["results"][1:3]]
    await wire.close()


async def test_tags_find_models_with_any_of_them(server):
    wire = await Wire.open(server.url)
    either = await search(wire, tags=["inpainting", "REFINER"])
    assert {"imagewire:sd15-inpaint@1", "imagewire:sdxl-refiner@1"} <= airs(either)
    assert all({"inpainting", "refiner"} & {tag.casefold() for tag in model["tags"]} for model in either["results"])
    await wire.close()
