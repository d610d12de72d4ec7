"""Progress: queue position, step i of n, previews; pushed only to tasks that ask; shown by getResponse."""

from __future__ import annotations

import asyncio
import base64
import io

from PIL import Image

from tests.engines import HeldEngine
from tests.timing import seconds
from tests.wire import Wire, eventually, inference

RESULT_FIELDS = {"imageUUID", "imageURL", "imageBase64Data", "imageDataURI", "text"}


async def frames_until_done(wire: Wire, task_uuid: str, results: int) -> list[dict]:
    """Every item for ``task_uuid``, in arrival order, until its results are in."""
    items: list[dict] = []
    while sum(1 for item in items if "imageUUID" in item) < results:
        message = await wire.receive(seconds(120))
        assert "errors" not in message, message
        items += [item for item in message.get("data", []) if item.get("taskUUID") == task_uuid]
    return items


async def test_progress_items_arrive_in_order_before_the_results_of_a_task_that_asks(server):
    wire = await Wire.open(server.url)
    task = inference(steps=6, numberResults=2, includeProgress=True)
    await wire.send([task])
    items = await frames_until_done(wire, task["taskUUID"], 2)
    progress = [item for item in items if "progress" in item]
    # No progress item could pass for a result: no image, no imageUUID.
    assert progress and not any(RESULT_FIELDS & set(item) for item in progress)
    assert all(item["status"] == "processing" and item["taskType"] == "imageInference" for item in progress)
    for index in (0, 1):
        steps = [item for item in progress if item.get("resultIndex") == index]
        assert [item["step"] for item in steps] == list(range(1, steps[0]["steps"] + 1))
        assert [item["progress"] for item in steps] == sorted(item["progress"] for item in steps)
        assert steps[-1]["progress"] == 100
    last_progress = max(position for position, item in enumerate(items) if "progress" in item)
    first_result = min(position for position, item in enumerate(items) if "imageUUID" in item)
    assert last_progress < first_result
    await wire.close()


async def test_a_task_that_does_not_ask_gets_no_progress_items(server):
    wire = await Wire.open(server.url)
    task = inference(steps=6, numberResults=2)
    await wire.send([task])
    items = await frames_until_done(wire, task["taskUUID"], 2)
    assert all("imageUUID" in item and "progress" not in item for item in items)
    await wire.close()


async def test_previews_are_small_images_of_the_picture_so_far(server):
    wire = await Wire.open(server.url)
    task = inference(width=256, height=256, steps=4, includeProgress=True, includePreview=True)
    await wire.send([task])
    items = await frames_until_done(wire, task["taskUUID"], 1)
    previews = [item["preview"] for item in items if item.get("preview")]
    assert previews, "the first step of a call always carries a preview"
    header, data = previews[0].split(",", 1)
    assert header == "data:image/jpeg;base64"
    picture = Image.open(io.BytesIO(base64.b64decode(data)))
    # The latents' own size (256 / 8), no larger than 128 px.
    assert picture.size == (32, 32)
    await wire.close()


async def test_waiting_tasks_hear_their_queue_position(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    await wire.send([inference(positivePrompt="blocker")])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    first, second = inference(includeProgress=True, width=192), inference(includeProgress=True, width=256)
    positions: dict[str, list[int]] = {first["taskUUID"]: [], second["taskUUID"]: []}
    await wire.send([first])
    await eventually(lambda: server.device.pending == 1)
    await wire.send([second])
    while not positions[second["taskUUID"]]:
        message = await wire.receive()
        for item in message.get("data", []):
            if "queuePosition" in item:
                positions[item["taskUUID"]].append(item["queuePosition"])
    assert positions == {first["taskUUID"]: [0], second["taskUUID"]: [1]}
    engine.release.set()
    # Each task's result, in whichever order they come: results of different tasks are not ordered.
    done: set[str] = set()
    while len(done) < 2:
        message = await wire.receive(seconds(120))
        assert "errors" not in message, message
        done |= {item["taskUUID"] for item in message.get("data", []) if "imageUUID" in item} & set(positions)
    await wire.close()


async def test_get_response_shows_the_progress_of_a_running_task(start_server):
    engine = HeldEngine(step_first=True)  # reports step 1 of 2, then holds
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    task = inference(deliveryMethod="async")
    await wire.send([task])
    await wire.receive()  # acknowledgement
    assert await asyncio.to_thread(engine.started.wait, seconds(10))

    async def progress() -> int | None:
        await wire.send([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
        answer = await wire.receive()
        return answer["data"][0].get("progress")

    assert await eventually(progress) == 50  # 0 (waiting) is not yet an answer
    engine.release.set()
    await wire.close()


async def test_flow_models_report_their_steps_without_previews(server):
    wire = await Wire.open(server.url)
    task = inference(model="imagewire:tiny-flux@1", steps=3, includeProgress=True, includePreview=True)
    await wire.send([task])
    items = await frames_until_done(wire, task["taskUUID"], 1)
    steps = [item for item in items if item.get("step")]
    assert [(item["step"], item["steps"]) for item in steps] == [(1, 3), (2, 3), (3, 3)]
    assert steps[-1]["progress"] == 100 and not any(item.get("preview") for item in items)
    await wire.close()
