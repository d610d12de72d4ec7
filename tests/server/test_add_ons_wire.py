"""LoRAs, embeddings, VAE, CLIP skip, prompt weighting and the refiner through a real server: over the bare
WebSocket, and from the official Runware SDK with its own request types."""

from __future__ import annotations

import base64
import logging

import numpy as np
import pytest
from runware import IEmbedding, IImageInference, ILora, IRefiner, Runware
from runware.types import EPromptWeighting

from tests.engines import HeldEngine
from tests.images import decoded, difference, pixels
from tests.server.test_scheduler import hold_the_device, queue_in_order
from tests.wire import Wire, inference, new_uuid

SAME = 2


def task(**fields: object) -> dict:
    return inference(**{"seed": 3, "outputType": "base64Data", **fields})


async def test_loras_over_the_wire_and_empty_means_none(server):
    wire = await Wire.open(server.url)
    [plain] = await wire.run(task())
    [empty] = await wire.run(task(lora=[], embeddings=[], controlNet=[], refiner={}, vae=None))
    [with_lora] = await wire.run(task(lora=[{"model": "imagewire:tiny-lora@1", "weight": 0.8}]))
    [by_alias] = await wire.run(task(lora=[{"model": "tiny-lora", "weight": 0.8}]))
    assert difference(pixels(empty), pixels(plain)) == 0
    assert difference(pixels(with_lora), pixels(plain)) > 20
    assert difference(pixels(by_alias), pixels(with_lora)) == 0
    await wire.close()


async def test_bad_add_ons_get_error_items_naming_their_path_and_others_still_run(server):
    wire = await Wire.open(server.url)
    bad = [task(lora=[{"model": "tiny-lora"}, {"model": "tiny-lora", "weight": 7}]),
           task(model="imagewire:tiny-sdxl@1", lora=[{"model": "tiny-lora"}]),
           task(embeddings=[{"model": "runware:1@1"}]),
           task(refiner={"model": "tiny-sdxl-refiner"})]
    good = task()
    await wire.send([*bad, good])
    answers = await wire.answers({item["taskUUID"]: 1 for item in (*bad, good)})
    errors = [answers[item["taskUUID"]][1][0] for item in bad]
    assert [(error["code"], error["parameter"]) for error in errors] == [
        ("invalidParameter", "lora[1].weight"), ("invalidParameter", "lora[0].model"),
        ("modelNotFound", "embeddings[0].model"), ("invalidParameter", "refiner")]
    assert "received 7" in errors[0]["message"] and "-4 to 4" in errors[0]["message"]
    assert "tiny" in errors[1]["message"]  # the architecture the LoRA fits
    assert all(error["taskUUID"] == item["taskUUID"] for error, item in zip(errors, bad, strict=True))
    assert answers[good["taskUUID"]][0]
    await wire.close()


async def test_the_refiner_runs_in_one_task_on_the_tiny_sdxl_pair(server):
    wire = await Wire.open(server.url)
    sdxl = {"model": "imagewire:tiny-sdxl@1", "steps": 4}
    [base] = await wire.run(task(**sdxl))
    [refined] = await wire.run(task(**sdxl, refiner={"model": "imagewire:tiny-sdxl-refiner@1", "startStep": 2}))
    [by_percentage] = await wire.run(task(**sdxl, refiner={"model": "tiny-sdxl-refiner", "startStepPercentage": 50}))
    assert refined["seed"] == 3 and pixels(refined).shape == (128, 128, 3)
    assert difference(pixels(refined), pixels(base)) > 5
    assert difference(pixels(by_percentage), pixels(refined)) <= SAME  # step 2 of 4 is 50 %
    await wire.close()


async def test_a_batch_mixing_lora_sets_gives_each_task_the_image_it_gets_alone(server, caplog):
    caplog.set_level(logging.INFO, logger="imagewire.device")
    wire = await Wire.open(server.url)
    sets = [[], [{"model": "tiny-lora"}], [{"model": "tiny-lora", "weight": -1.5}], [{"model": "tiny-lora"}]]
    tasks = [task(positivePrompt=f"a fox, take {index}", seed=20 + index, lora=lora) for index, lora in enumerate(sets)]
    alone = [pixels((await wire.run(dict(item)))[0]) for item in tasks]
    # Sent together behind a slow task, they wait in the queue together: the device groups them by LoRA set.
    blocker = task(numberResults=4, steps=8)
    mixed = [dict(item, taskUUID=new_uuid()) for item in tasks]
    await wire.send([blocker, *mixed])
    answers = await wire.answers({blocker["taskUUID"]: 4, **{item["taskUUID"]: 1 for item in mixed}})
    for item, expected in zip(mixed, alone, strict=True):
        data, errors = answers[item["taskUUID"]]
        assert not errors, errors
        assert difference(pixels(data[0]), expected) <= SAME
    # The two tasks with the same set shared a call; no call mixed sets.
    shared = [record.getMessage() for record in caplog.records if "share a pipeline call" in record.getMessage()]
    assert any(mixed[1]["taskUUID"] in line and mixed[3]["taskUUID"] in line for line in shared), shared
    assert not any(mixed[0]["taskUUID"] in line or mixed[2]["taskUUID"] in line for line in shared)
    await wire.close()


async def test_tasks_with_different_lora_sets_never_share_a_call_and_the_same_set_does(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine, max_batch_size=8)
    wire = await Wire.open(server.url)
    blocker = await hold_the_device(engine, wire)
    a, b = {"model": "tiny-lora", "weight": 1.0}, {"model": "tiny-lora", "weight": 0.5}
    first, other, same_set, none, weighted = (
        inference(lora=[a]), inference(lora=[b]), inference(lora=[a]), inference(),
        inference(lora=[a], promptWeighting="compel"))
    await queue_in_order(server, wire, [first, other, same_set, none, weighted])
    engine.release.set()
    everything = (blocker, first, other, same_set, none, weighted)
    answers = await wire.answers({item["taskUUID"]: 1 for item in everything})
    assert all(data and not errors for data, errors in answers.values())
    assert engine.calls == [[blocker["taskUUID"]], [first["taskUUID"], same_set["taskUUID"]], [other["taskUUID"]],
                            [none["taskUUID"]], [weighted["taskUUID"]]]
    await wire.close()


# ---------------------------------------------------------------- the official SDK, unmodified


@pytest.fixture
async def sdk(server):
    client = Runware(api_key="test-key", url=server.url)
    await client.connect()
    yield client
    await client.disconnect()


def sdk_pixels(image: object) -> np.ndarray:
    return decoded(base64.b64decode(image.imageBase64Data))  # type: ignore[attr-defined]


async def generate(sdk: Runware, **fields: object) -> np.ndarray:
    settings: dict = {"model": "imagewire:tiny@1", "positivePrompt": "a castle on a hill", "width": 128,
                      "height": 128, "steps": 2, "seed": 9, "outputType": "base64Data", "outputFormat": "PNG"}
    settings.update(fields)
    [image] = await sdk.imageInference(requestImage=IImageInference(**settings))
    return sdk_pixels(image)


async def test_the_sdk_sends_loras_embeddings_vae_clip_skip_and_prompt_weighting(sdk):
    plain = await generate(sdk)
    assert difference(await generate(sdk, lora=[ILora(model="imagewire:tiny-lora@1", weight=0.8)]), plain) > 20
    token = "<tiny-embedding>"
    assert difference(await generate(sdk, positivePrompt=f"a castle, {token}",
                                     embeddings=[IEmbedding(model="imagewire:tiny-embedding@1")]),
                      await generate(sdk, positivePrompt=f"a castle, {token}")) > 20
    assert difference(await generate(sdk, vae="imagewire:tiny-vae@1"), plain) > 20
    assert difference(await generate(sdk, clipSkip=1), plain) > 20
    # The SDK spells sdEmbeds in lower case.
    weighted = await generate(sdk, positivePrompt="a (castle:1.5) on a hill", promptWeighting=EPromptWeighting.SDEMBEDS)
    assert difference(weighted, plain) > 5


async def test_the_sdk_sends_a_refiner(sdk):
    sdxl = {"model": "imagewire:tiny-sdxl@1", "steps": 4}
    base = await generate(sdk, **sdxl)
    refined = await generate(sdk, **sdxl, refiner=IRefiner(model="imagewire:tiny-sdxl-refiner@1", startStep=2))
    assert difference(refined, base) > 5
