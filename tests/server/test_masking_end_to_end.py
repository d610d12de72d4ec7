"""imageMasking through a real server on the embedded detector (imagewire:tiny-masking@1, random weights): its
detections are arbitrary but fixed, so these tests check what the settings do to them and to the mask, and that
the mask repaints exactly its white area when it goes into an inpainting request."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.server.test_editing import seed_picture
from tests.server.test_inference_end_to_end import fetch
from tests.server.test_rest import rest
from tests.wire import Wire, inference, new_uuid

SIZE = (128, 96)
FACES = "runware:35@1"


def png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def masking(**fields: Any) -> dict[str, Any]:
    task = {"taskType": "imageMasking", "model": FACES, "inputImage": png(seed_picture(SIZE)),
            "outputType": "base64Data", "outputFormat": "PNG", "maskPadding": 0, "maskBlur": 0}
    task.update(fields)
    return task


def mask_of(item: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["maskImageBase64Data"]))))


def boxes_of(item: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    return [(box["x_min"], box["y_min"], box["x_max"], box["y_max"]) for box in item["detections"]]


def union(boxes: list[tuple[int, int, int, int]], padding: int = 0, size: tuple[int, int] = SIZE) -> np.ndarray:
    covered = np.zeros((size[1], size[0]), dtype=bool)
    for left, top, right, bottom in boxes:
        covered[max(0, top - padding):bottom + padding, max(0, left - padding):right + padding] = True
    return covered


async def test_the_mask_is_the_inputs_size_and_white_exactly_over_the_boxes_grown_by_the_padding(server):
    wire = await Wire.open(server.url)
    [tight] = await wire.run(masking())
    assert tight["taskType"] == "imageMasking" and tight["maskImageUUID"] and tight["inputImageUUID"]
    mask = mask_of(tight)
    assert mask.shape == (SIZE[1], SIZE[0]) and set(np.unique(mask)) <= {0, 255}
    boxes = boxes_of(tight)
    assert 0 < len(boxes) <= 6  # the page's maxDetections
    assert all(0 <= left < right <= SIZE[0] and 0 <= top < bottom <= SIZE[1] for left, top, right, bottom in boxes)
    scores = [box["confidence"] for box in tight["detections"]]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0.25  # the page's confidence
    assert np.array_equal(mask == 255, union(boxes))
    [padded] = await wire.run(masking(maskPadding=6))
    assert boxes_of(padded) == boxes  # the padding grows the mask, not the detections
    grown = mask_of(padded) == 255
    assert np.array_equal(grown, union(boxes, padding=6)) and grown.sum() > (mask == 255).sum()
    await wire.close()


async def test_confidence_drops_detections_and_max_detections_caps_them(server):
    wire = await Wire.open(server.url)
    [loose] = await wire.run(masking(confidence=0.05, maxDetections=20))
    [strict] = await wire.run(masking(confidence=0.5, maxDetections=20))
    [capped] = await wire.run(masking(confidence=0.05, maxDetections=2))
    assert len(loose["detections"]) > len(strict["detections"]) > 2
    # The same detector output, thresholded and cut: the boxes kept are the best ones of the loose answer.
    assert strict["detections"] == [box for box in loose["detections"] if box["confidence"] > 0.5]
    assert capped["detections"] == loose["detections"][:2]
    assert np.array_equal(mask_of(capped) == 255, union(boxes_of(capped)))
    [nothing] = await wire.run(masking(confidence=1))
    assert nothing["detections"] == [] and mask_of(nothing).max() == 0
    await wire.close()


async def test_mask_blur_fades_the_edge_outwards_and_keeps_the_white_area(server):
    wire = await Wire.open(server.url)
    [sharp] = await wire.run(masking(maskPadding=2))
    [soft] = await wire.run(masking(maskPadding=2, maskBlur=8))
    white, blurred = mask_of(sharp) == 255, mask_of(soft)
    assert np.array_equal(blurred == 255, white)
    grey = (blurred > 0) & (blurred < 255)
    assert grey.sum() > 0
    # Only within maskBlur pixels of the white area, and never darker nearer to it.
    reach = union(boxes_of(sharp), padding=2 + 8)
    assert not (blurred[~reach] > 0).any()
    await wire.close()


async def test_the_newer_sdk_shape_gives_the_same_answer(server):
    wire = await Wire.open(server.url)
    source = png(seed_picture(SIZE))
    settings = {"confidence": 0.3, "maxDetections": 3, "maskPadding": 5, "maskBlur": 3}
    [top_level] = await wire.run(masking(inputImage=source, **settings))
    newer = masking(settings=settings, inputs={"image": source})
    for field in ("inputImage", "maskPadding", "maskBlur"):
        del newer[field]
    [nested] = await wire.run(newer)
    assert nested["detections"] == top_level["detections"]
    assert np.array_equal(mask_of(nested), mask_of(top_level))
    failure = await wire.error(masking(confidence=0.3, settings={"confidence": 0.4}))
    assert (failure["code"], failure["parameter"]) == ("invalidParameter", "settings.confidence")
    await wire.close()


async def test_the_model_id_names_what_is_looked_for(server):
    wire = await Wire.open(server.url)
    answers = {}
    for model in ("runware:35@1", "runware:35@2", "runware:35@3", "runware:35@4", "runware:35@5"):
        [item] = await wire.run(masking(model=model, confidence=0.05, maxDetections=20))
        answers[model] = item["detections"]
    assert answers["runware:35@1"] == answers["runware:35@2"]  # two face detectors: one query here
    assert answers["runware:35@4"] == answers["runware:35@5"]
    assert answers["runware:35@1"] != answers["runware:35@4"]  # faces and people are asked for differently
    await wire.close()


async def test_every_output_form_and_the_mask_uuid_is_reusable(server):
    wire = await Wire.open(server.url)
    [item] = await wire.run(masking(outputType=["URL", "base64Data", "dataURI"], maskBlur=4))
    content_type, body = await asyncio.to_thread(fetch, item["maskImageURL"])
    assert content_type == "image/png" and base64.b64decode(item["maskImageBase64Data"]) == body
    assert item["maskImageDataURI"] == "data:image/png;base64," + item["maskImageBase64Data"]
    # The mask's UUID is an image like any other: it can be masked, captioned, upscaled.
    [again] = await wire.run(masking(inputImage=item["maskImageUUID"]))
    assert mask_of(again).shape == (SIZE[1], SIZE[0])
    await wire.close()


async def test_the_mask_uuid_repaints_only_its_white_area_in_an_inpainting_request(server):
    wire = await Wire.open(server.url)
    size = (192, 128)  # sizes imageInference takes
    source = seed_picture(size)
    [masked] = await wire.run(masking(inputImage=png(source), maskPadding=4, maskBlur=4))
    mask = mask_of(masked)
    assert 0 < (mask == 255).mean() < 0.8
    # The input's and the mask's UUIDs go into the inpainting request unchanged.
    [repainted] = await wire.run(inference(model="imagewire:tiny@1", seedImage=masked["inputImageUUID"],
                                           maskImage=masked["maskImageUUID"], width=size[0], height=size[1], seed=7,
                                           steps=4, strength=1.0, outputType="base64Data", outputFormat="PNG"))
    result = np.asarray(Image.open(io.BytesIO(base64.b64decode(repainted["imageBase64Data"]))).convert("RGB"))
    seed = np.asarray(source).astype(int)
    change = np.abs(result.astype(int) - seed).max(axis=-1)
    assert change[mask == 0].max() == 0
    assert change[mask == 255].mean() > 20
    await wire.close()


async def test_masking_over_rest(server):
    status, answer = await rest(server, [dict(masking(), taskUUID=new_uuid())])
    assert status == 200, answer
    [item] = answer["data"]
    assert item["taskType"] == "imageMasking" and mask_of(item).shape == (SIZE[1], SIZE[0])


async def test_every_bad_input_gets_an_error_naming_its_parameter_the_values_allowed_and_the_value_received(server):
    wire = await Wire.open(server.url)
    cases = [
        (masking(model="runware:35@99"), "invalidParameter", "model", "'runware:35@99'"),
        (masking(model="runware:35@13"), "invalidParameter", "model", "nose"),
        (masking(model="imagewire:tiny-masking@1"), "invalidParameter", "model", "'imagewire:tiny-masking@1'"),
        (masking(confidence=1.5), "invalidParameter", "confidence", "1.5"),
        (masking(maxDetections=21), "invalidParameter", "maxDetections", "21"),
        (masking(settings={"maxDetections": 0}), "invalidParameter", "settings.maxDetections", "0"),
        (masking(maskPadding=-1), "invalidParameter", "maskPadding", "-1"),
        (masking(maskBlur=-2), "invalidParameter", "maskBlur", "-2"),
        (masking(outputFormat="GIF"), "invalidParameter", "outputFormat", "'GIF'"),
    ]
    for task, code, parameter, received in cases:
        failure = await wire.error(task)
        assert (failure["code"], failure["parameter"]) == (code, parameter), failure
        assert received in failure["message"], failure
        if parameter == "model":
            assert "runware:35@1" in failure["allowedValues"] and "runware:35@13" not in failure["allowedValues"]
    missing_model = masking()
    del missing_model["model"]
    missing_image = masking()
    del missing_image["inputImage"]
    for task, parameter in ((missing_model, "model"), (missing_image, "inputImage")):
        failure = await wire.error(task)
        assert (failure["code"], failure["parameter"]) == ("missingParameter", parameter), failure
    failure = await wire.error(masking(inputs={"mask": "x"}))
    assert (failure["code"], failure["parameter"]) == ("unsupportedParameter", "inputs.mask")
    await wire.close()


async def test_a_detector_without_its_weights_names_the_download(start_server, tmp_path: Path, empty_hf_cache):
    # An operator's catalog file makes OWLv2 the detector; its weights are not in the (empty) cache.
    catalog = tmp_path / "detector.json"
    catalog.write_text(json.dumps([{
        "air": "test:owlv2@1", "name": "OWLv2 as the detector", "aliases": ["default-masking-detector"],
        "architecture": "owlv2", "category": "masking", "source": "hub",
        "location": "google/owlv2-base-patch16-ensemble"}]))
    server = await start_server(catalog_files=(catalog,))
    wire = await Wire.open(server.url)
    failure = await wire.error(masking())
    assert (failure["code"], failure["parameter"]) == ("modelNotFound", "model")
    assert "hf download google/owlv2-base-patch16-ensemble" in failure["message"]
    await wire.close()


async def test_model_search_lists_the_detectors(server):
    wire = await Wire.open(server.url)
    [found] = await wire.run({"taskType": "modelSearch", "category": "masking"})
    assert [model["air"] for model in found["results"]] == [
        "imagewire:tiny-masking@1", "imagewire:owlv2-base@1", "imagewire:owlvit-base@1"]
    await wire.close()


async def test_an_owlv2_detector_serves_the_ids_too(start_server, tmp_path: Path):
    from imagewire.air_registry.tiny.masking import build

    build(tmp_path / "owlv2", generation="owlv2")
    catalog = tmp_path / "detector.json"
    catalog.write_text(json.dumps([{
        "air": "test:tiny-owlv2@1", "name": "a tiny OWLv2", "aliases": ["default-masking-detector"],
        "architecture": "owlv2", "category": "masking", "source": "folder", "location": str(tmp_path / "owlv2")}]))
    server = await start_server(catalog_files=(catalog,))
    wire = await Wire.open(server.url)
    wide = (160, 64)
    [item] = await wire.run(masking(inputImage=png(seed_picture(wide)), confidence=0.05, maxDetections=20))
    mask = mask_of(item)
    assert mask.shape == (wide[1], wide[0]) and item["detections"]
    assert np.array_equal(mask == 255, union(boxes_of(item), size=wide))
    await wire.close()


async def test_include_cost_prices_the_device_time(start_server):
    server = await start_server(price_per_gpu_second=2.0)
    wire = await Wire.open(server.url)
    [priced] = await wire.run(masking(includeCost=True))
    [unpriced] = await wire.run(masking())
    assert isinstance(priced["cost"], float) and priced["cost"] > 0 and "cost" not in unpriced
    await wire.close()
