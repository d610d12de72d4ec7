"""referenceImages through a real server on the tiny FLUX.1 Kontext (``imagewire:tiny-flux-kontext@1``): one or two
images in each of the four input forms change the result as they should, a seedImage still works beside them, and
what cannot be done is refused naming the parameter."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from tests.images import pixels
from tests.wire import API_KEY, Wire, inference, new_uuid

KONTEXT = "imagewire:tiny-flux-kontext@1"


def png(color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


RED, BLUE, GREEN = png((220, 30, 40)), png((30, 40, 220)), png((30, 200, 60))


def kontext(**fields: object) -> dict:
    return inference(model=KONTEXT, seed=4, steps=2, outputType="base64Data", **fields)


async def test_reference_images_in_every_form_guide_kontext(server):
    wire = await Wire.open(server.url)
    [upload] = await wire.run({"taskType": "imageUpload", "taskUUID": new_uuid(), "image": RED})
    forms = [upload["imageUUID"], f"data:image/png;base64,{RED}", RED, upload["imageURL"]]
    results = [pixels((await wire.run(kontext(referenceImages=[form])))[0]) for form in forms]
    assert all(np.array_equal(results[0], other) for other in results[1:])  # one picture, whatever its form
    [blue] = await wire.run(kontext(referenceImages=[BLUE]))
    assert np.abs(pixels(blue) - results[0]).max() > 2  # another picture, another result
    [both] = await wire.run(kontext(referenceImages=[RED, BLUE]))
    [swapped] = await wire.run(kontext(referenceImages=[BLUE, RED]))
    assert np.abs(pixels(both) - results[0]).max() > 2 and np.abs(pixels(both) - pixels(swapped)).max() > 2
    assert pixels(both).shape == (128, 128, 3)
    # A result is an image like any other: its UUID is a reference too.
    [again] = await wire.run(kontext(referenceImages=[both["imageUUID"], GREEN]))
    assert again["imageUUID"] != both["imageUUID"]
    await wire.close()


async def test_the_size_comes_from_the_first_picture_and_a_seed_image_still_works(server):
    wire = await Wire.open(server.url)
    wide = png((200, 120, 40), (192, 128))
    [sized] = await wire.run(kontext(referenceImages=[wide, BLUE], width=..., height=...))  # no size sent
    assert pixels(sized).shape == (128, 192, 3)
    # seedImage alone on Kontext is the picture to edit, as before; with references it is read first among them.
    [seed_only] = await wire.run(kontext(seedImage=RED))
    [with_reference] = await wire.run(kontext(seedImage=RED, referenceImages=[BLUE]))
    [references_only] = await wire.run(kontext(referenceImages=[RED, BLUE]))
    assert np.abs(pixels(seed_only) - pixels(with_reference)).max() > 2
    assert np.array_equal(pixels(with_reference), pixels(references_only))  # the same pictures in the same order
    await wire.close()


async def test_what_cannot_be_done_is_refused_naming_the_parameter(server):
    wire = await Wire.open(server.url)
    third = await wire.error(kontext(referenceImages=[RED, BLUE, GREEN]))
    assert (third["code"], third["parameter"]) == ("invalidParameter", "referenceImages[2]")
    assert "at most 2 images" in third["message"] and "received 3" in third["message"]
    for model in ("imagewire:tiny@1", "imagewire:tiny-flux@1", "imagewire:tiny-sd3@1"):
        other = await wire.error(inference(model=model, referenceImages=[RED]))
        assert (other["code"], other["parameter"]) == ("unsupportedParameter", "referenceImages"), model
        assert set(other["allowedValues"]) == {"flux1-kontext", "tiny-flux-kontext"}
        assert "flux1-kontext" in other["message"]
    broken = await wire.error(kontext(referenceImages=[RED, "bm90IGFuIGltYWdl"]))
    assert broken["parameter"] == "referenceImages[1]"
    missing = await wire.error(kontext(referenceImages=[new_uuid()]))
    assert (missing["code"], missing["parameter"]) == ("imageNotFound", "referenceImages[0]")
    not_text = await wire.error(kontext(referenceImages=[RED, 7]))
    assert not_text["parameter"] == "referenceImages[1]"
    await wire.close()


async def test_the_python_sdk_sends_reference_images(server):
    from runware import IImageInference, Runware

    wire = await Wire.open(server.url)
    [upload] = await wire.run({"taskType": "imageUpload", "taskUUID": new_uuid(), "image": BLUE})
    [expected] = await wire.run(kontext(referenceImages=[RED, upload["imageUUID"]]))
    await wire.close()
    client = Runware(api_key=API_KEY, url=server.url)
    await client.connect()
    try:
        [image] = await client.imageInference(requestImage=IImageInference(
            model=KONTEXT, positivePrompt="a red fox in the snow", width=128, height=128, steps=2, seed=4,
            outputType="base64Data", outputFormat="PNG", referenceImages=[f"data:image/png;base64,{RED}",
                                                                         upload["imageUUID"]]))
    finally:
        await client.disconnect()
    assert np.array_equal(pixels({"imageBase64Data": image.imageBase64Data}), pixels(expected))


async def test_the_newer_sdks_inputs_object_gives_the_same_images(server):
    # runware-sdk 1.8 types FLUX.1 Kontext's pictures only as ``inputs``; the images are those of the top-level
    # fields, and a picture sent both ways must be the same one.
    wire = await Wire.open(server.url)
    [top] = await wire.run(kontext(seedImage=RED, referenceImages=[BLUE]))
    [nested] = await wire.run(kontext(inputs={"seedImage": RED, "referenceImages": [BLUE]}))
    [mixed] = await wire.run(kontext(seedImage=RED, inputs={"seedImage": RED, "referenceImages": [BLUE]}))
    assert np.array_equal(pixels(top), pixels(nested)) and np.array_equal(pixels(top), pixels(mixed))
    [inpainted] = await wire.run(inference(seed=3, steps=2, outputType="base64Data", width=128, height=128,
                                           inputs={"seedImage": RED, "maskImage": png((255, 255, 255))}))
    [inpainted_top] = await wire.run(inference(seed=3, steps=2, outputType="base64Data", width=128, height=128,
                                               seedImage=RED, maskImage=png((255, 255, 255))))
    assert np.array_equal(pixels(inpainted), pixels(inpainted_top))
    for inputs, code, parameter in [
        ({"image": RED}, "unsupportedParameter", "inputs.image"),
        ({"referenceImages": RED}, "invalidParameter", "inputs.referenceImages"),
        ({"seedImage": [RED]}, "invalidParameter", "inputs.seedImage"),
    ]:
        error = await wire.error(kontext(inputs=inputs))
        assert (error["code"], error["parameter"]) == (code, parameter), inputs
    twice = await wire.error(kontext(seedImage=RED, inputs={"seedImage": BLUE}))
    assert (twice["code"], twice["parameter"]) == ("invalidParameter", "inputs.seedImage")
    assert "not two different ones" in twice["message"]
    # Past the fold, the nested pictures are checked as the top-level ones.
    third = await wire.error(kontext(inputs={"referenceImages": [RED, BLUE, GREEN]}))
    assert (third["code"], third["parameter"]) == ("invalidParameter", "referenceImages[2]")
    await wire.close()
