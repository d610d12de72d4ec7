"""``imagewire-server --engine fake``: the whole server over an engine without a model, for client developers' CI.

Most tests drive one real server process, started as a client's CI would start it, with an empty Hugging Face
cache: no model's weights are anywhere, and every catalog model still answers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runware import IImageInference, Runware
from runware.utils import RunwareAPIError

from imagewire.server.app import ImagewireServer
from imagewire.server.config import Config
from imagewire.server.fake_engine import FakeEngine, detected_boxes, enhanced_prompts, reported_steps
from imagewire.tasks.errors import InvalidParameter
from tests.server.test_rest import post
from tests.timing import seconds
from tests.wire import API_KEY, Wire, inference, new_uuid

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "huggingface_hub")


@dataclass(frozen=True)
class FakeServer:
    url: str
    port: int
    pid: int
    seconds_to_listen: float


def without_weights(tmp: Path) -> dict[str, str]:
    """The environment of a process that finds no model weights: an empty Hugging Face cache, offline."""
    (tmp / "hf-home").mkdir(exist_ok=True)
    return {**os.environ, "HF_HOME": str(tmp / "hf-home"), "HF_HUB_CACHE": str(tmp / "hf-home" / "hub"),
            "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeServer]:
    tmp = tmp_path_factory.mktemp("fake-server")
    log = tmp / "server.log"
    command = [sys.executable, "-m", "imagewire.server", "--engine", "fake", "--port", "0", "--host", "127.0.0.1",
               "--data-dir", str(tmp / "data"), "--api-key", API_KEY]
    with log.open("w") as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, stderr=output, env=without_weights(tmp))
    try:
        url = None
        while url is None:
            assert process.poll() is None, log.read_text()
            assert time.perf_counter() - started < seconds(60), log.read_text()
            url = next((line.split("imagewire ready: ", 1)[1].strip() for line in log.read_text().splitlines()
                        if "imagewire ready: " in line), None)
            if url is None:
                time.sleep(0.005)
        listening = time.perf_counter() - started
        yield FakeServer(url=url, port=int(url.rsplit(":", 1)[1].split("/")[0]), pid=process.pid,
                         seconds_to_listen=listening)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(seconds(30))


@pytest.fixture
async def sdk(fake_server: FakeServer):
    client = Runware(api_key=API_KEY, url=fake_server.url)
    await client.connect()
    yield client
    await client.disconnect()


def decoded(image) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image.imageBase64Data)))


def request(**fields) -> IImageInference:
    settings = {"model": "imagewire:tiny@1", "positivePrompt": "a castle on a hill", "width": 256, "height": 192,
                "steps": 4, "seed": 21, "outputType": "base64Data", "outputFormat": "PNG", **fields}
    return IImageInference(**settings)


# ---------------------------------------------------------------- the process


def test_the_fake_server_listens_within_two_seconds(fake_server: FakeServer) -> None:
    # From the command to the "ready" line: what a client's CI waits before its first request.
    assert fake_server.seconds_to_listen < seconds(2), f"{fake_server.seconds_to_listen:.2f} s"


def test_the_fake_server_process_has_no_torch_loaded(fake_server: FakeServer) -> None:
    # The shared libraries mapped into the process, after the other tests of this module have used it.
    maps = Path(f"/proc/{fake_server.pid}/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc")
    mapped = maps.read_text()
    assert "libtorch" not in mapped and "/torch/" not in mapped


# Runs the server in a fresh interpreter (this one imported torch long ago) and sends it one task of each kind.
NO_TORCH_SCRIPT = """
import asyncio, base64, io, json, sys, uuid
from pathlib import Path
from PIL import Image
from imagewire.server.app import ImagewireServer
from imagewire.server.config import Config
from tests.wire import API_KEY, Wire, inference

HEAVY = {heavy!r}

async def main():
    server = ImagewireServer(Config(engine="fake", host="127.0.0.1", port=0, data_dir=Path(sys.argv[1]),
                                    api_keys=(API_KEY,)))
    await server.start()
    after_start = [name for name in HEAVY if name in sys.modules]
    wire = await Wire.open(server.url)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(buffer, "PNG")
    picture = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    tasks = [
        inference(model="runware:101@1", width=256, height=256, checkNSFW=True),
        inference(seedImage=picture, strength=0.5, width=128, height=128, lora=[{{"model": "imagewire:tiny-lora@1"}}]),
        {{"taskType": "imageUpscale", "inputImage": picture, "upscaleFactor": 2}},
        {{"taskType": "imageBackgroundRemoval", "inputImage": picture}},
        {{"taskType": "imageCaption", "inputImage": picture}},
        {{"taskType": "imageMasking", "inputImage": picture, "model": "runware:35@1"}},
        {{"taskType": "promptEnhance", "prompt": "a fox", "promptMaxLength": 20, "promptVersions": 2}},
        {{"taskType": "modelSearch", "search": "flux"}},
    ]
    answered = {{}}
    for task in tasks:
        task.setdefault("taskUUID", str(uuid.uuid4()))
        await wire.send([task])
        data, errors = await wire.items_for(task["taskUUID"], 2 if task["taskType"] == "promptEnhance" else 1)
        answered[task["taskType"] + str(len(answered))] = errors or "ok"
    await wire.close()
    after_tasks = [name for name in HEAVY if name in sys.modules]
    await server.stop()
    print(json.dumps({{"after_start": after_start, "after_tasks": after_tasks, "answered": answered}}))

asyncio.run(main())
"""


def test_neither_start_nor_any_task_imports_torch(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT.format(heavy=HEAVY), str(tmp_path / "data")],
                            cwd=ROOT, env=without_weights(tmp_path), capture_output=True, text=True,
                            timeout=seconds(120), check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(outcome == "ok" for outcome in report["answered"].values()), report["answered"]
    assert len(report["answered"]) == 8
    assert report["after_start"] == [] and report["after_tasks"] == []


# ---------------------------------------------------------------- imageInference through the official SDK


async def test_images_have_the_requested_size_and_count_and_repeat_exactly(sdk) -> None:
    images = sorted(await sdk.imageInference(requestImage=request(numberResults=3)), key=lambda image: image.seed)
    assert [image.seed for image in images] == [21, 22, 23]
    pictures = [decoded(image).convert("RGB") for image in images]
    assert all(picture.size == (256, 192) for picture in pictures)
    assert len({picture.tobytes() for picture in pictures}) == 3  # each seed its own picture
    [again] = await sdk.imageInference(requestImage=request())
    assert decoded(again).convert("RGB").tobytes() == pictures[0].tobytes()
    # Whatever a real model's picture depends on changes the fake's too.
    for change in ({"positivePrompt": "a castle under the sea"}, {"steps": 5}, {"CFGScale": 3.0},
                   {"scheduler": "Euler a"}, {"model": "imagewire:tiny-sdxl@1"}):
        [other] = await sdk.imageInference(requestImage=request(**change))
        assert decoded(other).convert("RGB").tobytes() != pictures[0].tobytes(), change


async def test_a_model_whose_weights_are_nowhere_is_served(fake_server: FakeServer, sdk) -> None:
    # FLUX.1 [dev] comes from the hub, and this server's cache is empty: the fake needs no weights.
    [image] = await sdk.imageInference(requestImage=request(model="runware:101@1", width=512, height=512))
    assert decoded(image).size == (512, 512)
    wire = await Wire.open(fake_server.url)  # the SDK's modelSearch keeps neither available nor loaded
    [found] = await wire.run({"taskType": "modelSearch", "search": "FLUX.1 [dev]"})
    await wire.close()
    dev = next(model for model in found["results"] if model["air"] == "runware:101@1")
    assert dev["available"] and dev["comment"] == ""  # no weights to look for
    assert dev["loaded"] and dev["loadedOn"] == "device"  # it ran, so the fake reports it on the device


async def test_image_to_image_follows_the_seed_image(sdk, tmp_path: Path) -> None:
    results = {}
    for colour in ("red", "blue"):
        path = tmp_path / f"{colour}.png"
        Image.new("RGB", (256, 192), colour).save(path)
        uploaded = await sdk.uploadImage(str(path))
        [image] = await sdk.imageInference(requestImage=request(seedImage=uploaded.imageUUID, strength=0.5))
        results[colour] = decoded(image).convert("RGB")
    assert results["red"].size == results["blue"].size == (256, 192)
    assert results["red"].tobytes() != results["blue"].tobytes()
    # Half the seed image's colour: red stays redder than blue where the pattern is the same.
    red, blue = (np.asarray(results[colour], dtype=np.int32) for colour in ("red", "blue"))
    assert (red[..., 0] > blue[..., 0]).all() and (blue[..., 2] > red[..., 2]).all()


async def test_inpainting_keeps_the_seed_image_outside_the_mask(sdk, tmp_path: Path) -> None:
    seed = Image.new("RGB", (128, 128), (20, 160, 90))
    seed.save(tmp_path / "seed.png")
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    mask.save(tmp_path / "mask.png")
    [image] = await sdk.imageInference(requestImage=request(
        model="imagewire:tiny-inpaint@1", seedImage=str(tmp_path / "seed.png"), maskImage=str(tmp_path / "mask.png"),
        strength=1.0, width=128, height=128))
    result = np.asarray(decoded(image).convert("RGB"))
    outside = np.asarray(mask) == 0
    assert (result[outside] == np.asarray(seed)[outside]).all()
    assert (result[48:80, 48:80] != np.asarray(seed)[48:80, 48:80]).any(axis=-1).all()


async def test_the_nsfw_marker_makes_a_flagged_result(sdk, tmp_path: Path) -> None:
    from runware import ISafety

    [flagged] = await sdk.imageInference(requestImage=request(positivePrompt="an NSFW test",
                                                               safety=ISafety(checkContent=True)))
    assert flagged.NSFWContent is True
    assert decoded(flagged).convert("RGB").getextrema() == ((0, 0), (0, 0), (0, 0))  # blacked out
    [clean] = await sdk.imageInference(requestImage=request(safety=ISafety(checkContent=True)))
    assert clean.NSFWContent is False
    # A seed image does not water the marker down, whatever the strength.
    Image.new("RGB", (64, 64), "white").save(tmp_path / "white.png")
    [blended] = await sdk.imageInference(requestImage=request(
        positivePrompt="nsfw", seedImage=str(tmp_path / "white.png"), strength=0.3, safety=ISafety(checkContent=True)))
    assert blended.NSFWContent is True
    # The same rule checks inputs: a magenta seed image is refused.
    Image.new("RGB", (64, 64), (255, 0, 255)).save(tmp_path / "magenta.png")
    with pytest.raises(RunwareAPIError) as caught:
        await sdk.imageInference(requestImage=request(seedImage=str(tmp_path / "magenta.png"), strength=0.5,
                                                      safety=ISafety(checkInputs=True)))
    assert caught.value.error_data["parameter"] == "seedImage"


# ---------------------------------------------------------------- the tools


async def test_tools_answer_from_their_input(sdk, tmp_path: Path) -> None:
    from runware import IImageBackgroundRemoval, IImageCaption, IImageUpscale, IPromptEnhance

    path = tmp_path / "input.png"
    Image.new("RGB", (40, 24), (30, 120, 200)).save(path)
    [upscaled] = await sdk.imageUpscale(upscaleGanPayload=IImageUpscale(
        inputImage=str(path), upscaleFactor=3, outputType="base64Data", outputFormat="PNG"))
    assert decoded(upscaled).size == (120, 72)
    assert decoded(upscaled).convert("RGB").getpixel((60, 36)) == (30, 120, 200)
    [cutout] = await sdk.imageBackgroundRemoval(removeImageBackgroundPayload=IImageBackgroundRemoval(
        inputImage=str(path), outputType="base64Data", outputFormat="PNG"))
    alpha = decoded(cutout).getchannel("A")
    assert alpha.size == (40, 24) and alpha.getpixel((0, 0)) == 0 and alpha.getpixel((20, 12)) == 255
    caption = await sdk.imageCaption(requestImageToText=IImageCaption(inputImage=str(path)))
    assert caption.text == "a 40x24 picture, mostly blue (#1e78c8)"
    versions = await sdk.promptEnhance(promptEnhancer=IPromptEnhance(prompt="a lighthouse", promptMaxLength=12,
                                                                     promptVersions=4))
    texts = [version.text for version in versions]
    assert len(set(texts)) == 4 and all(text.startswith("a lighthouse ") for text in texts)
    assert all(len(text.split()) <= 12 for text in texts)


def test_prompt_versions_stay_distinct_and_within_length() -> None:
    for max_words in (3, 4, 12):
        texts = enhanced_prompts("two words", max_words, 5, seed=9)
        assert len(set(texts)) == 5 and all(len(text.split()) <= max_words for text in texts)
    assert enhanced_prompts("two words", 12, 3, seed=9) == enhanced_prompts("two words", 12, 3, seed=9)
    assert enhanced_prompts("two words", 12, 3, seed=9) != enhanced_prompts("two words", 12, 3, seed=10)
    with pytest.raises(InvalidParameter):
        enhanced_prompts("two words", 2, 1, seed=9)


# ---------------------------------------------------------------- progress, cancelling, REST


async def test_progress_reports_a_few_steps_with_previews(fake_server: FakeServer) -> None:
    wire = await Wire.open(fake_server.url)
    task = inference(steps=8, width=256, height=256, includeProgress=True, includePreview=True)
    await wire.send([task])
    items: list[dict] = []
    while not any("imageUUID" in item for item in items):
        message = await wire.receive()
        assert "errors" not in message, message
        items += [item for item in message.get("data", []) if item.get("taskUUID") == task["taskUUID"]]
    steps = [item for item in items if item.get("step")]
    assert [(item["step"], item["steps"]) for item in steps] == [(step, 8) for step in reported_steps(8)]
    assert steps[-1]["progress"] == 100 and "imageUUID" in items[-1]
    header, data = steps[0]["preview"].split(",", 1)
    assert header == "data:image/jpeg;base64"
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (32, 32)
    await wire.close()


async def test_a_running_task_is_cancelled_at_its_next_step(tmp_path: Path) -> None:
    # A slowed fake: a job runs long enough for a cancel to find it on the device.
    server = ImagewireServer(Config(engine="fake", host="127.0.0.1", port=0, data_dir=tmp_path, api_keys=(API_KEY,)),
                             engine_factory=lambda: FakeEngine(step_seconds=seconds(2)))
    await server.start()
    try:
        wire = await Wire.open(server.url)
        task = inference(steps=40, includeProgress=True)
        await wire.send([task])
        while True:  # its first step: it runs
            message = await wire.receive()
            if any(item.get("taskUUID") == task["taskUUID"] and item.get("step") for item in message.get("data", [])):
                break
        await wire.send([{"taskType": "cancelTask", "taskUUID": task["taskUUID"]}])
        answers: list[dict] = []
        while not any(item.get("code") == "taskCancelled" for item in answers):
            message = await wire.receive()
            answers += [item for item in message.get("data", []) + message.get("errors", [])
                        if item.get("taskUUID") == task["taskUUID"]]
        assert {"taskType": "cancelTask", "taskUUID": task["taskUUID"], "cancelled": True, "status": "error"} in answers
        assert not any("imageUUID" in item for item in answers)
        # The call stopped at its next step (within 2 s) instead of running its 3 others (6 s); the next task
        # takes one step (2 s).
        answer = await asyncio.wait_for(wire.run(inference(steps=1)), seconds(6))
        assert answer[0]["imageUUID"]
        await wire.close()
    finally:
        await server.stop(grace=seconds(5))


async def test_rest_answers_with_the_same_images_as_the_socket(fake_server: FakeServer, sdk) -> None:
    task = {"taskType": "imageInference", "taskUUID": new_uuid(), "model": "imagewire:tiny@1",
            "positivePrompt": "a castle on a hill", "width": 256, "height": 192, "steps": 4, "seed": 21,
            "outputType": "base64Data", "outputFormat": "PNG"}
    status, answer = await asyncio.to_thread(post, f"http://127.0.0.1:{fake_server.port}/v1", [task])
    assert status == 200, answer
    [item] = answer["data"]
    by_rest = Image.open(io.BytesIO(base64.b64decode(item["imageBase64Data"]))).convert("RGB")
    [by_socket] = await sdk.imageInference(requestImage=request())
    assert by_rest.size == (256, 192) and by_rest.tobytes() == decoded(by_socket).convert("RGB").tobytes()


def test_controlnet_guide_images_change_the_picture() -> None:
    from imagewire.air_registry import Catalog
    from imagewire.server.fake_engine import picture
    from imagewire.tasks.jobs import ControlNetUse, InferenceJob

    catalog = Catalog.load()
    control = ControlNetUse(model=catalog.resolve("imagewire:tiny-controlnet@1"), weights=Path("."), weight=1.0,
                            start=0.0, end=1.0, mode="balanced")

    def made(guide: Image.Image) -> bytes:
        job = InferenceJob(task_uuid=new_uuid(), model=catalog.resolve("imagewire:tiny@1"), weights=Path("."),
                           prompt="a door", negative_prompt=None, width=64, height=64, steps=2, cfg_scale=7.0,
                           sampler=None, seeds=[1], controlnets=(control,), guide_images=(guide,))
        return picture(job, 1).tobytes()

    black, white = Image.new("RGB", (64, 64), "black"), Image.new("RGB", (64, 64), "white")
    assert made(black) == made(black.copy()) != made(white)


def test_fake_detections_are_fixed_by_the_query_and_size_and_lie_in_the_picture() -> None:
    boxes = detected_boxes("a photo of a human face", 120, 80)
    assert boxes == detected_boxes("a photo of a human face", 120, 80)
    assert boxes != detected_boxes("a photo of a person", 120, 80)
    assert [box.score for box in boxes] == sorted((box.score for box in boxes), reverse=True)
    assert all(0 <= box.x_min < box.x_max <= 120 and 0 <= box.y_min < box.y_max <= 80 for box in boxes)
