"""Runware's official JavaScript SDK (``@runware/sdk-js`` 1.3.2) unmodified, in Node, pointed at imagewire by its
``url`` option: text-to-image, referenceImages on FLUX.1 Kontext, ipAdapters, imageMasking whose mask feeds an
inpainting request, async delivery fetched with its getResponse, and a refusal that names the parameter.

Skipped without node and npm, unless ``IMAGEWIRE_REQUIRE_NODE=1`` (tests/sdk_js.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.sdk_js import node_or_skip, run_node_script, runware_sdk_js_dir
from tests.timing import seconds
from tests.wire import API_KEY

# One script, the case to run named by its first argument; its inputs (pictures as base64) come as JSON in the
# second. The SDK's Node class is RunwareServer (`Runware` is the browser's); globalMaxRetries 0 so that a
# refusal comes back at once rather than after the SDK's retries.
SCRIPT = r'''
const { RunwareServer } = require("@runware/sdk-js");
const [url, apiKey, caseName, inputsJson] = process.argv.slice(1);
const inputs = JSON.parse(inputsJson);

function tiny(fields) {
  return { model: "imagewire:tiny@1", positivePrompt: "a lighthouse", width: 128, height: 128, steps: 2,
           outputType: "base64Data", outputFormat: "PNG", ...fields };
}

function refusal(error) {
  // The SDK rejects with the server's error object, as it was in the frame.
  const detail = error?.error ?? error;
  return { code: detail?.code, parameter: detail?.parameter, message: detail?.message };
}

const cases = {
  async textToImage(runware) {
    // No uploadEndpoint: the SDK leaves it out unless set, and the results come back in the answer.
    const images = await runware.imageInference(tiny({ numberResults: 2, seed: 21 }));
    return images.map(({ seed, imageUUID, imageBase64Data, taskType }) => ({ seed, imageUUID, imageBase64Data,
                                                                           taskType }));
  },
  async referenceImages(runware) {
    const kontext = (referenceImages) => tiny({ model: "imagewire:tiny-flux-kontext@1", width: 128, height: 128,
                                                seed: 4, referenceImages });
    const [both] = await runware.imageInference(kontext([inputs.red, inputs.blue]));
    const [swapped] = await runware.imageInference(kontext([inputs.blue, inputs.red]));
    // A result's UUID is a reference image too.
    const [reused] = await runware.imageInference(kontext([both.imageUUID, inputs.green]));
    let third = null;
    try {
      await runware.imageInference(kontext([inputs.red, inputs.blue, inputs.green]));
    } catch (error) {
      third = refusal(error);
    }
    return { both: both.imageBase64Data, swapped: swapped.imageBase64Data, reused: reused.imageBase64Data,
             third };
  },
  async ipAdapters(runware) {
    const upload = await runware.imageUpload({ image: inputs.guide });
    const [plain] = await runware.imageInference(tiny({ seed: 4 }));
    const [guided] = await runware.imageInference(tiny({
      seed: 4, ipAdapters: [{ model: "imagewire:tiny-ip-adapter@1", guideImage: upload.imageUUID, weight: 1 }] }));
    return { upload: upload.imageUUID, plain: plain.imageBase64Data, guided: guided.imageBase64Data };
  },
  async maskThenInpaint(runware) {
    const masked = await runware.imageMasking({
      model: "runware:35@1", inputImage: inputs.picture, confidence: 0.1, maxDetections: 3, maskPadding: 2,
      maskBlur: 0, outputType: "base64Data", outputFormat: "PNG" });
    const [painted] = await runware.imageInference(tiny({
      width: 192, height: 128, seed: 4, strength: 0.9, seedImage: masked.inputImageUUID,
      maskImage: masked.maskImageUUID }));
    return { mask: masked.maskImageBase64Data, maskUUID: masked.maskImageUUID, detections: masked.detections,
             inputUUID: masked.inputImageUUID, painted: painted.imageBase64Data };
  },
  async asyncDelivery(runware) {
    const started = Date.now();
    // With deliveryMethod "async" the SDK hands back the server's acknowledgement; the results are then
    // asked for with its getResponse, as Runware's docs have it.
    const [acknowledged] = await runware.imageInference(tiny({ steps: 8, seed: 9, deliveryMethod: "async" }));
    const polls = [];
    for (;;) {
      const items = await runware.getResponse({ taskUUID: acknowledged.taskUUID });
      polls.push(items.map((item) => item.status));
      const done = items.filter((item) => item.status === "success");
      if (done.length > 0) {
        const polledAt = Date.now();
        // controlNetPreProcess is async by default in this SDK, which then polls getResponse itself.
        const guide = await runware.controlNetPreProcess({ inputImage: inputs.picture, preProcessorType: "canny",
                                                           outputType: "base64Data", outputFormat: "PNG" });
        return { acknowledged: { taskUUID: acknowledged.taskUUID, status: acknowledged.status }, polls,
                 seconds: (polledAt - started) / 1000, guideSeconds: (Date.now() - polledAt) / 1000,
                 guide: { inputImageUUID: guide?.inputImageUUID, guideImageUUID: guide?.guideImageUUID,
                          guideImageBase64Data: guide?.guideImageBase64Data },
                 results: done.map(({ taskUUID, seed, imageBase64Data }) => ({ taskUUID, seed,
                                                                              imageBase64Data })) };
      }
      if (Date.now() - started > 60000) throw new Error("no result in 60 s: " + JSON.stringify(polls));
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  },
};

(async () => {
  const runware = new RunwareServer({ apiKey, url, globalMaxRetries: 0, shouldReconnect: false });
  await runware.ensureConnection();
  let outcome;
  try {
    outcome = await cases[caseName](runware);
  } finally {
    await runware.disconnect();
  }
  // The SDK's heartbeat timers would keep Node alive, so it is ended once the answer is written (a pipe is
  // written asynchronously: exiting at once would cut a long line short).
  process.stdout.write(JSON.stringify(outcome) + "\n", () => process.exit(0));
})().catch((error) => {
  console.error(error?.error ? JSON.stringify(error) : error);
  process.exit(1);
});
'''


@pytest.fixture(scope="module")
def node() -> str:
    return node_or_skip()


@pytest.fixture(scope="module")
def sdk(node):
    return runware_sdk_js_dir()


def png(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(data: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(data)))
    picture.load()
    return picture


async def run_case(node: str, sdk: Any, server: Any, case: str, **inputs: str) -> Any:
    return await asyncio.to_thread(run_node_script, node, sdk, SCRIPT, f"ws://127.0.0.1:{server.port}/v1",
                                   API_KEY, case, json.dumps(inputs))


async def test_text_to_image_with_the_seed_echoed(server, node, sdk):
    images = await run_case(node, sdk, server, "textToImage")
    assert sorted(image["seed"] for image in images) == [21, 22]
    assert len({image["imageUUID"] for image in images}) == 2 and all(image["imageUUID"] for image in images)
    assert all(image["taskType"] == "imageInference" for image in images)
    pictures = [decoded(image["imageBase64Data"]) for image in images]
    assert [picture.size for picture in pictures] == [(128, 128)] * 2
    assert pictures[0].tobytes() != pictures[1].tobytes()  # two seeds, two pictures


RED, BLUE, GREEN = (png(Image.new("RGB", (64, 64), color)) for color in ((220, 30, 40), (30, 40, 220), (30, 200, 60)))


async def test_reference_images_guide_kontext_and_a_third_is_refused_by_name(server, node, sdk):
    outcome = await run_case(node, sdk, server, "referenceImages", red=RED, blue=BLUE, green=GREEN)
    both, swapped, reused = (decoded(outcome[key]) for key in ("both", "swapped", "reused"))
    assert both.size == swapped.size == reused.size == (128, 128)
    # The pictures reached the model in the order sent: swapping them changes the result.
    assert both.tobytes() != swapped.tobytes() and reused.tobytes() != both.tobytes()
    third = outcome["third"]
    assert (third["code"], third["parameter"]) == ("invalidParameter", "referenceImages[2]")
    assert "at most 2 images" in third["message"]


async def test_ip_adapters_guide_the_picture_with_an_uploaded_image(server, node, sdk):
    guide = png(Image.linear_gradient("L").resize((64, 64)).convert("RGB"))
    outcome = await run_case(node, sdk, server, "ipAdapters", guide=guide)
    assert outcome["upload"]
    plain, guided = decoded(outcome["plain"]), decoded(outcome["guided"])
    assert plain.size == guided.size == (128, 128)
    assert plain.tobytes() != guided.tobytes()  # same seed: only the adapter differs


async def test_a_mask_from_image_masking_feeds_an_inpainting_request(server, node, sdk):
    picture = Image.linear_gradient("L").resize((192, 128)).convert("RGB")
    outcome = await run_case(node, sdk, server, "maskThenInpaint", picture=png(picture))
    mask = np.asarray(decoded(outcome["mask"]).convert("L"))
    assert mask.shape == (128, 192) and outcome["maskUUID"] and outcome["inputUUID"]
    assert 0 < len(outcome["detections"]) <= 3 and (mask == 255).any()
    painted = np.asarray(decoded(outcome["painted"]).convert("RGB")).astype(int)
    original = np.asarray(picture).astype(int)
    assert painted.shape == original.shape
    # The mask went in by its UUID: outside it the picture is kept, inside it is repainted.
    outside = mask == 0
    assert np.abs(painted[outside] - original[outside]).max() <= 2
    assert np.abs(painted[~outside] - original[~outside]).mean() > 5


async def test_async_delivery_is_fetched_with_get_response_promptly(server, node, sdk):
    picture = Image.linear_gradient("L").resize((128, 128)).convert("RGB")
    outcome = await run_case(node, sdk, server, "asyncDelivery", picture=png(picture))
    assert outcome["acknowledged"]["taskUUID"]
    [result] = outcome["results"]
    assert result["taskUUID"] == outcome["acknowledged"]["taskUUID"] and result["seed"] == 9
    assert decoded(result["imageBase64Data"]).size == (128, 128)
    # A second's task answered within a few: getResponse answers at once on a socket (processing, then
    # success), it is not held until some timeout.
    assert outcome["seconds"] < seconds(8), outcome["polls"]
    # The SDK's own poller (every 2 s) fetched the preprocessed guide image at its first or second poll.
    guide = outcome["guide"]
    assert guide["guideImageUUID"] and guide["inputImageUUID"]
    edges = np.asarray(decoded(guide["guideImageBase64Data"]).convert("L"))
    assert edges.shape == (128, 128) and set(np.unique(edges)) <= {0, 255}
    assert outcome["guideSeconds"] < seconds(5)
