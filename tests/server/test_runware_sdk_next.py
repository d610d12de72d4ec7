"""The newer official Python SDK (runware-sdk 1.8) unmodified, over both of its transports: it
defaults to ``deliveryMethod: "async"`` and polls getResponse, over the socket or by REST."""

from __future__ import annotations

import pytest

from tests.sdk import run_script, runware_sdk_dir
from tests.wire import API_KEY

SCRIPT = r'''
import asyncio, base64, io, json, sys
from runware import Runware, RunOptions

async def main(port, key, transport):
    progress = []
    client = Runware(api_key=key, transport=transport, ws_base_url=f"ws://127.0.0.1:{port}/v1",
                     http_base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    async with client:
        images = await client.run(
            {"taskType": "imageInference", "model": "imagewire:tiny@1", "positivePrompt": "a lighthouse",
             "width": 128, "height": 128, "steps": 8, "numberResults": 2, "seed": 21})
        if transport == "websocket":
            # Pushed progress needs a socket and a sync task that asks for it.
            await client.run(
                {"taskType": "imageInference", "model": "imagewire:tiny@1", "positivePrompt": "a lighthouse",
                 "width": 128, "height": 128, "steps": 4, "deliveryMethod": "sync", "includeProgress": True},
                RunOptions(on_progress=progress.append))
        from PIL import Image
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), "teal").save(buffer, format="PNG")
        png = base64.b64encode(buffer.getvalue()).decode()
        [upload] = await client.run({"taskType": "imageUpload", "image": png})
        [search] = await client.run({"taskType": "modelSearch", "search": "tiny"})
        try:
            await client.run({"taskType": "imageInference", "model": "imagewire:tiny@1", "positivePrompt": "x y",
                              "width": 100, "height": 128})
            refused = None
        except Exception as error:
            refused = [getattr(error, "code", type(error).__name__), getattr(error, "parameter", None)]
    print(json.dumps({"seeds": sorted(image["seed"] for image in images),
                      "uuids": [image.get("imageUUID") for image in images],
                      "progress": [item.get("progress") for item in progress],
                      "upload": upload.get("imageUUID"), "models": [m["air"] for m in search["results"]],
                      "refused": refused}))

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
'''


@pytest.fixture(scope="module")
def sdk():
    return runware_sdk_dir()


@pytest.mark.parametrize("transport", ["websocket", "rest"])
async def test_the_newer_sdk_works_unmodified(server, sdk, transport):
    import asyncio

    outcome = await asyncio.to_thread(run_script, sdk, SCRIPT, str(server.port), API_KEY, transport)
    assert outcome["seeds"] == [21, 22] and all(outcome["uuids"])
    assert outcome["upload"] and "imagewire:tiny@1" in outcome["models"]
    # The SDK files invalidWidth under its "validation" category, with the parameter named.
    assert outcome["refused"] == ["validation", "width"]
    if transport == "websocket":
        # Its on_progress callback heard each step, in order, up to 100 %.
        assert outcome["progress"] == sorted(outcome["progress"]) and outcome["progress"][-1] == 100


MASKING_SCRIPT = r'''
import asyncio, base64, io, json, sys
from runware import Runware

async def main(port, key, transport):
    client = Runware(api_key=key, transport=transport, ws_base_url=f"ws://127.0.0.1:{port}/v1",
                     http_base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    from PIL import Image
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((96, 64)).convert("RGB").save(buffer, format="PNG")
    png = base64.b64encode(buffer.getvalue()).decode()
    async with client:
        [masked] = await client.run(
            {"taskType": "imageMasking", "model": "runware:35@1", "inputs": {"image": png}, "outputType": "base64Data",
             "outputFormat": "PNG", "settings": {"confidence": 0.1, "maxDetections": 3, "maskPadding": 2,
                                                  "maskBlur": 0}})
    mask = Image.open(io.BytesIO(base64.b64decode(masked["maskImageBase64Data"])))
    print(json.dumps({"size": list(mask.size), "detections": masked["detections"],
                      "uuids": [masked.get("maskImageUUID"), masked.get("inputImageUUID")]}))

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
'''


@pytest.mark.parametrize("transport", ["websocket", "rest"])
async def test_the_newer_sdk_masks_with_its_settings_object(server, sdk, transport):
    import asyncio

    outcome = await asyncio.to_thread(run_script, sdk, MASKING_SCRIPT, str(server.port), API_KEY, transport)
    assert outcome["size"] == [96, 64] and all(outcome["uuids"])
    assert 0 < len(outcome["detections"]) <= 3
    assert all({"x_min", "y_min", "x_max", "y_max"} <= set(box) for box in outcome["detections"])
