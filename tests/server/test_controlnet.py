"""ControlNet and its pre-processing task through a real server, on tiny@1 and tiny-controlnet@1."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tests.images import pixels
from tests.server.test_editing import b64, mask_picture, png, seed_picture
from tests.wire import Wire, inference

CONTROLNET = "imagewire:tiny-controlnet@1"


def guide(shape: str) -> str:
    picture = Image.new("RGB", (128, 128))
    draw = ImageDraw.Draw(picture)
    if shape == "square":
        draw.rectangle((20, 20, 100, 100), outline=(255, 255, 255), width=6)
    else:
        draw.ellipse((10, 40, 118, 88), fill=(255, 255, 255))
    return b64(png(picture))


def guided(controls: list[dict[str, Any]] | None, **fields: Any) -> dict[str, Any]:
    task: dict[str, Any] = {"seed": 5, "steps": 3, "CFGScale": 5, "outputType": "base64Data"}
    if controls is not None:
        task["controlNet"] = controls
    task.update(fields)
    return inference(**task)


def mean_difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(first - second).mean())


async def test_the_guide_image_steers_the_result_and_weight_zero_is_no_controlnet(server):
    wire = await Wire.open(server.url)
    [plain] = await wire.run(guided(None))
    [square] = await wire.run(guided([{"model": CONTROLNET, "guideImage": guide("square")}]))
    [ellipse] = await wire.run(guided([{"model": CONTROLNET, "guideImage": guide("ellipse")}]))
    [off] = await wire.run(guided([{"model": CONTROLNET, "guideImage": guide("square"), "weight": 0}]))
    assert mean_difference(pixels(square), pixels(ellipse)) > 5
    assert mean_difference(pixels(square), pixels(plain)) > 5
    assert np.abs(pixels(off) - pixels(plain)).max() <= 2
    await wire.close()


async def test_several_controlnets_modes_and_step_ranges(server):
    wire = await Wire.open(server.url)
    one = {"model": CONTROLNET, "guideImage": guide("square")}
    [single] = await wire.run(guided([one]))
    # The JS SDK always sends controlMode ("controlnet" unless told otherwise); null fields as the Python SDK.
    results = {}
    for mode in ("balanced", "prompt", "controlnet"):
        [results[mode]] = await wire.run(guided([{**one, "controlMode": mode, "weight": None, "startStep": None}]))
    assert np.array_equal(pixels(results["balanced"]), pixels(single))
    assert mean_difference(pixels(results["prompt"]), pixels(single)) > 1
    assert mean_difference(pixels(results["controlnet"]), pixels(results["prompt"])) > 1
    [both] = await wire.run(guided([one, {"model": "tiny-controlnet", "guideImage": guide("ellipse"), "weight": 0.5,
                                          "startStepPercentage": 0, "endStepPercentage": 50}]))
    assert mean_difference(pixels(both), pixels(single)) > 1
    [late] = await wire.run(guided([{**one, "startStep": 2, "endStep": 3}]))
    assert mean_difference(pixels(late), pixels(single)) > 1
    await wire.close()


async def test_controlnet_with_a_seed_image_and_with_a_mask(server):
    wire = await Wire.open(server.url)
    control = [{"model": CONTROLNET, "guideImage": guide("square")}]
    seed = b64(png(seed_picture()))
    [image_to_image] = await wire.run(guided(control, seedImage=seed, strength=0.8))
    [inpainted] = await wire.run(guided(control, model="imagewire:tiny-inpaint@1", seedImage=seed,
                                        maskImage=b64(png(mask_picture())), outputFormat="PNG"))
    [unguided] = await wire.run(guided(None, model="imagewire:tiny-inpaint@1", seedImage=seed,
                                       maskImage=b64(png(mask_picture())), outputFormat="PNG"))
    assert pixels(image_to_image).shape == (128, 128, 3)
    assert mean_difference(pixels(inpainted), pixels(unguided)) > 0.5
    await wire.close()


def preprocess(**fields: Any) -> dict[str, Any]:
    task = {"taskType": "imageControlNetPreProcess", "preProcessorType": "canny", "outputFormat": "PNG",
            "outputType": ["URL", "base64Data"]}
    task.update(fields)
    return task


def guide_pixels(item: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["guideImageBase64Data"]))).convert("RGB"))


async def test_canny_makes_a_binary_edge_map_of_the_inputs_size_with_a_reusable_uuid(server):
    wire = await Wire.open(server.url)
    picture = Image.new("RGB", (192, 128), (20, 20, 20))
    ImageDraw.Draw(picture).rectangle((40, 30, 150, 100), fill=(230, 230, 230))
    [item] = await wire.run(preprocess(inputImage=b64(png(picture))))
    edges = guide_pixels(item)
    assert edges.shape == (128, 192, 3)
    assert set(np.unique(edges)) == {0, 255}
    assert edges[30, 40:150].max() == 255 and edges[60, 60:130].max() == 0  # on the outline, not inside
    assert item["taskType"] == "imageControlNetPreProcess" and item["guideImageURL"].endswith(".png")
    assert item["inputImageUUID"] and item["inputImageUUID"] != item["guideImageUUID"]
    # Reusable like any image: as a guide image, and the input's UUID as a seed image.
    [generated] = await wire.run(guided([{"model": CONTROLNET, "guideImage": item["guideImageUUID"]}],
                                        seedImage=item["inputImageUUID"], width=192, height=128))
    assert pixels(generated).shape == (128, 192, 3)
    await wire.close()


async def test_the_thresholds_and_the_other_spelling_and_shape(server):
    wire = await Wire.open(server.url)
    x, y = np.meshgrid(np.arange(128), np.arange(128))
    soft = Image.fromarray(((np.sin(x / 6) + np.sin(y / 9)) * 60 + 128).astype(np.uint8)).convert("RGB")
    [low] = await wire.run(preprocess(inputImage=b64(png(soft)), lowThresholdCanny=10, highThresholdCanny=30))
    [high] = await wire.run(preprocess(inputImage=b64(png(soft)), lowThresholdCanny=150, highThresholdCanny=250))
    assert (guide_pixels(low) > 0).sum() > (guide_pixels(high) > 0).sum()
    # The newer SDK: controlNetPreprocess, the pre-processor as a model, the image under inputs.
    [newer] = await wire.run({"taskType": "controlNetPreprocess", "model": "runware:controlnet-preprocess@canny",
                              "inputs": {"image": b64(png(soft))}, "lowThresholdCanny": 10, "highThresholdCanny": 30,
                              "outputFormat": "PNG", "outputType": "base64Data"})
    assert newer["taskType"] == "controlNetPreprocess"
    assert np.array_equal(guide_pixels(newer), guide_pixels(low))
    for kind in ("tile", "shuffle"):
        [other] = await wire.run(preprocess(inputImage=b64(png(soft)), preProcessorType=kind, width=64))
        assert guide_pixels(other).shape == (64, 64, 3)
    await wire.close()


async def test_preprocess_errors_name_the_parameter(server):
    wire = await Wire.open(server.url)
    image = b64(png(seed_picture()))
    cases = [
        (preprocess(inputImage=image, preProcessorType="depth"), "preProcessorType", "weights"),
        (preprocess(inputImage=image, preProcessorType="sharpen"), "preProcessorType", "canny"),
        (preprocess(inputImage=image, lowThresholdCanny=200, highThresholdCanny=100), "lowThresholdCanny", "less"),
        (preprocess(), "inputImage", "required"),
        (preprocess(inputImage="not an image"), "inputImage", "inputImage"),
        (preprocess(inputs={"image": "nope"}), "inputs.image", "inputs.image"),
        (preprocess(inputs={"image": image, "mask": image}), "inputs.mask", "inputs.mask"),
        (preprocess(inputImage=image, inputs={"image": b64(png(mask_picture()))}), "inputs.image", "once"),
        (preprocess(inputImage=image, lowThresholdCanny=300), "lowThresholdCanny", "0 to 255"),
    ]
    for task, parameter, words in cases:
        error = await wire.error(task)
        assert error["parameter"] == parameter and words in error["message"], error
        assert error["taskType"] == "imageControlNetPreProcess"
    error = await wire.error({"taskType": "controlNetPreprocess", "inputImage": image, "model": "x:y@openpose"})
    assert (error["parameter"], error["taskType"]) == ("model", "controlNetPreprocess")
    await wire.close()


async def test_preprocess_delivers_asynchronously_for_the_js_sdk(server):
    wire = await Wire.open(server.url)
    task = preprocess(inputImage=b64(png(seed_picture())), deliveryMethod="async", outputType="URL")
    [ack] = await wire.run(task)
    assert ack == {"taskType": "imageControlNetPreProcess", "taskUUID": task["taskUUID"]}

    async def finished() -> list[dict[str, Any]]:
        [answer] = await wire.run({"taskType": "getResponse", "taskUUID": task["taskUUID"]})
        return [answer] if answer.get("status") == "success" else []

    from tests.wire import eventually
    [done] = await eventually(finished)
    assert done["guideImageUUID"] and done["guideImageURL"]
    await wire.close()
