"""ipAdapters on the diffusers engine with the embedded tiny IP-Adapter (``imagewire:tiny-ip-adapter@1``, fitting
``imagewire:tiny@1``): at a fixed seed an adapter changes the image, its guide image matters, weight 0 is no
adapter, two work at once, the cached pipeline is clean for the next job, and equal adapter sets batch while
different ones never share a call. Through a server: the guide image in the four input forms, and refusals that
name the parameter's path."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imagewire.air_registry.catalog import Catalog
from imagewire.air_registry.weights import locate_weights
from imagewire.server.engine import DiffusersEngine
from imagewire.tasks.jobs import InferenceJob, IpAdapterUse
from tests.engines import diffusers_engine
from tests.images import difference, images, pixels
from tests.wire import API_KEY, Wire, inference, new_uuid

CATALOG = Catalog.load()
TINY, ADAPTER = CATALOG.resolve("tiny"), CATALOG.resolve("tiny-ip-adapter")
# Batched and single calls, and a process's first call, may round differently in the last bit; a guide image
# moves pixels by far more.
SAME = 2
CHANGED = 20


def solid(color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


RED, BLUE = solid((220, 30, 40)), solid((30, 40, 220))


@pytest.fixture(scope="module")
def engine(module_data_dir: Path) -> DiffusersEngine:
    engine = diffusers_engine(module_data_dir)
    # The first call of a process sets its CPU threads: out of the comparisons.
    images(engine, make_job(module_data_dir))
    return engine


def make_job(data: Path, *adapters: tuple[Image.Image, float], seed: int = 5,
             prompt: str = "a red fox") -> InferenceJob:
    weights = locate_weights(ADAPTER, data_dir=data, allow_downloads=False)
    # Solid guides: their colour stands for their pixels in the batch key.
    uses = tuple(IpAdapterUse(ADAPTER, weights, weight, guide, f"{guide.getpixel((0, 0))}")
                 for guide, weight in adapters)
    return InferenceJob(task_uuid=f"{prompt}-{seed}", model=TINY,
                        weights=locate_weights(TINY, data_dir=data, allow_downloads=False), prompt=prompt,
                        negative_prompt=None, width=128, height=128, steps=3, cfg_scale=7.0, sampler=None,
                        seeds=[seed], ip_adapters=uses)


@pytest.fixture
def job(module_data_dir: Path) -> Callable[..., InferenceJob]:
    def make(*adapters: tuple[Image.Image, float], **fields: Any) -> InferenceJob:
        return make_job(module_data_dir, *adapters, **fields)

    return make


def test_an_ip_adapter_changes_the_image_by_its_guide_and_weight_zero_is_none(engine, job):
    [plain] = images(engine, job())
    [red] = images(engine, job((RED, 1.0)))
    [blue] = images(engine, job((BLUE, 1.0)))
    [half] = images(engine, job((RED, 0.5)))
    [zero] = images(engine, job((RED, 0.0)))
    assert difference(red, plain) > CHANGED and difference(blue, red) > CHANGED and difference(half, red) > CHANGED
    # Scale 0 multiplies the adapter's attention by zero: the pixels of no adapter at all.
    assert difference(zero, plain) <= SAME
    [again] = images(engine, job((RED, 1.0)))
    assert difference(again, red) <= SAME  # deterministic at a fixed seed


def test_two_adapters_at_once_and_a_clean_pipeline_after(engine, job):
    [plain] = images(engine, job())
    [red] = images(engine, job((RED, 1.0)))
    [both] = images(engine, job((RED, 1.0), (BLUE, 1.0)))
    [swapped_weights] = images(engine, job((RED, 1.0), (BLUE, 0.3)))
    assert difference(both, red) > CHANGED and difference(both, plain) > CHANGED
    assert difference(swapped_weights, both) > CHANGED  # each adapter has its own scale
    [second_off] = images(engine, job((RED, 1.0), (BLUE, 0.0)))
    assert difference(second_off, red) <= SAME
    # The UNet's attention, its projection and the pipeline's image encoder are as loaded again.
    [after] = images(engine, job())
    assert difference(after, plain) <= SAME
    pipe = engine.pipelines.text_to_image(TINY)
    assert pipe.image_encoder is None and pipe.unet.encoder_hid_proj is None
    assert not any("IPAdapter" in type(p).__name__ for p in pipe.unet.attn_processors.values())


def test_equal_sets_batch_and_different_ones_do_not(engine, job):
    red, red_other_seed, blue = job((RED, 1.0)), job((RED, 1.0), seed=9, prompt="a boat"), job((BLUE, 1.0))
    assert red.batch_key() == red_other_seed.batch_key()
    assert red.batch_key() != blue.batch_key() != job().batch_key()
    assert red.batch_key() != job((RED, 0.5)).batch_key() != job((RED, 1.0), (BLUE, 1.0)).batch_key()
    together = images(engine, red, red_other_seed)
    alone = [images(engine, red)[0], images(engine, red_other_seed)[0]]
    assert all(difference(a, b) <= SAME for a, b in zip(together, alone, strict=True))


# ---------------------------------------------------------------- through a server


def png(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def guided(*adapters: dict, **fields: object) -> dict:
    return inference(seed=4, outputType="base64Data", ipAdapters=list(adapters), **fields)


async def test_the_guide_image_in_every_form(server):
    wire = await Wire.open(server.url)
    red = png(RED)
    [upload] = await wire.run({"taskType": "imageUpload", "taskUUID": new_uuid(), "image": red})
    forms = [upload["imageUUID"], f"data:image/png;base64,{red}", red, upload["imageURL"]]
    results = [pixels((await wire.run(guided({"model": "imagewire:tiny-ip-adapter@1", "guideImage": form})))[0])
               for form in forms]
    assert all(difference(results[0], other) <= SAME for other in results[1:])
    [plain] = await wire.run(inference(seed=4, outputType="base64Data"))
    assert difference(pixels(plain), results[0]) > CHANGED
    # A UUID is reusable, and a result's UUID guides too.
    [reused] = await wire.run(guided({"model": "tiny-ip-adapter", "guideImage": upload["imageUUID"], "weight": 1}))
    assert difference(pixels(reused), results[0]) <= SAME
    [two] = await wire.run(guided({"model": "tiny-ip-adapter", "guideImage": upload["imageUUID"]},
                                  {"model": "tiny-ip-adapter", "guideImage": plain["imageUUID"], "weight": 0.7}))
    assert difference(pixels(two), results[0]) > CHANGED
    [none] = await wire.run(guided({"model": "tiny-ip-adapter", "guideImage": red, "weight": 0}))
    assert difference(pixels(none), pixels(plain)) <= SAME
    await wire.close()


async def test_what_cannot_be_done_is_refused_naming_the_path(server):
    wire = await Wire.open(server.url)
    red = png(RED)
    wrong = await wire.error(guided({"model": "runware:55@5", "guideImage": red}))
    assert (wrong["code"], wrong["parameter"]) == ("invalidParameter", "ipAdapters[0].model")
    assert "runware:55@5" in wrong["message"] and "sd15" in wrong["message"]
    assert wrong["allowedValues"] == ["imagewire:tiny-ip-adapter@1"]
    unknown = await wire.error(guided({"model": "tiny-ip-adapter", "guideImage": red},
                                      {"model": "nobody:404@1", "guideImage": red}))
    assert unknown["parameter"] == "ipAdapters[1].model" and "nobody:404@1" in unknown["message"]
    not_adapter = await wire.error(guided({"model": "tiny-lora", "guideImage": red}))
    assert (not_adapter["parameter"], not_adapter["allowedValues"][:1]) == (
        "ipAdapters[0].model", ["imagewire:tiny-ip-adapter@1"])
    heavy = await wire.error(guided({"model": "tiny-ip-adapter", "guideImage": red},
                                    {"model": "tiny-ip-adapter", "guideImage": red, "weight": 1.5}))
    assert (heavy["code"], heavy["parameter"]) == ("invalidParameter", "ipAdapters[1].weight")
    assert "from 0 to 1" in heavy["message"] and "received 1.5" in heavy["message"]
    flux = await wire.error(guided({"model": "runware:105@1", "guideImage": red}, model="imagewire:tiny-flux@1"))
    assert (flux["code"], flux["parameter"]) == ("unsupportedParameter", "ipAdapters")
    assert {"sd15", "sdxl", "tiny"} <= set(flux["allowedValues"]) and "FLUX" in flux["message"]
    broken = await wire.error(guided({"model": "tiny-ip-adapter", "guideImage": "bm90IGFuIGltYWdl"}))
    assert broken["parameter"] == "ipAdapters[0].guideImage"
    missing = await wire.error(guided({"model": "tiny-ip-adapter", "guideImage": new_uuid()}))
    assert (missing["code"], missing["parameter"]) == ("imageNotFound", "ipAdapters[0].guideImage")
    await wire.close()


async def test_adapters_work_with_inpainting_and_controlnets(server):
    wire = await Wire.open(server.url)
    red, blue = png(RED), png(BLUE)
    mask = png(Image.new("RGB", (128, 128), (255, 255, 255)))
    edits = [
        {"model": "imagewire:tiny-inpaint@1", "seedImage": blue, "maskImage": mask},
        {"controlNet": [{"model": "imagewire:tiny-controlnet@1", "guideImage": blue}]},
        {"seedImage": blue, "strength": 0.9},
    ]
    for fields in edits:
        [without] = await wire.run(inference(seed=4, outputType="base64Data", **fields))
        [adapted] = await wire.run(guided({"model": "tiny-ip-adapter", "guideImage": red}, **fields))
        assert difference(pixels(adapted), pixels(without)) > CHANGED, fields
        [again] = await wire.run(inference(seed=4, outputType="base64Data", **fields))
        assert difference(pixels(again), pixels(without)) <= SAME, fields  # nothing left on the shared model
    await wire.close()


async def test_the_python_sdk_sends_ip_adapters(server):
    from runware import IImageInference, IIpAdapter, Runware

    red = png(RED)
    wire = await Wire.open(server.url)
    [upload] = await wire.run({"taskType": "imageUpload", "taskUUID": new_uuid(), "image": png(BLUE)})
    [expected] = await wire.run(guided({"model": "tiny-ip-adapter", "guideImage": red, "weight": 0.8},
                                       {"model": "tiny-ip-adapter", "guideImage": upload["imageUUID"]}))
    await wire.close()
    client = Runware(api_key=API_KEY, url=server.url)
    await client.connect()
    try:
        [image] = await client.imageInference(requestImage=IImageInference(
            model="imagewire:tiny@1", positivePrompt="a red fox in the snow", width=128, height=128, steps=2, seed=4,
            outputType="base64Data", outputFormat="PNG",
            ipAdapters=[IIpAdapter(model="imagewire:tiny-ip-adapter@1", guideImage=f"data:image/png;base64,{red}",
                                   weight=0.8),
                        IIpAdapter(model="imagewire:tiny-ip-adapter@1", guideImage=upload["imageUUID"])]))
    finally:
        await client.disconnect()
    assert difference(pixels({"imageBase64Data": image.imageBase64Data}), pixels(expected)) <= SAME
