"""Editing tasks report progress and stop when cancelled like any imageInference task: inpainting with a
content check streams its steps (and previews) before its checked results, and an inpainting task with a
ControlNet stops at its next denoising step when cancelled."""

from __future__ import annotations

import logging

import numpy as np

from tests.images import pixels
from tests.server.test_cancel import cancel_answer, first_step
from tests.server.test_controlnet import guide
from tests.server.test_editing import BOX, outside, repaint, seed_picture
from tests.server.test_progress import RESULT_FIELDS, frames_until_done
from tests.wire import Wire, eventually


async def test_inpainting_with_a_content_check_streams_its_steps_before_its_checked_results(start_server):
    server = await start_server(safety_checker="imagewire:tiny-safety@1")
    wire = await Wire.open(server.url)
    task = repaint(model="imagewire:tiny-inpaint@1", numberResults=2, includeProgress=True, includePreview=True,
                   checkNSFW=True)
    await wire.send([task])
    items = await frames_until_done(wire, task["taskUUID"], 2)
    progress = [item for item in items if "progress" in item]
    assert progress and not any(RESULT_FIELDS & set(item) for item in progress)
    for index in (0, 1):
        steps = [item for item in progress if item.get("resultIndex") == index]
        # strength 0.9 of 4 steps: the pipeline denoises 3 of them.
        assert [item["step"] for item in steps] == list(range(1, steps[0]["steps"] + 1)) and steps[0]["steps"] >= 3
        assert steps[-1]["progress"] == 100
    assert any(item.get("preview", "").startswith("data:image/jpeg;base64,") for item in progress)
    last_progress = max(position for position, item in enumerate(items) if "progress" in item)
    results = [item for item in items if "imageUUID" in item]
    assert last_progress < items.index(results[0])
    # The results went through the checker after the steps, and are still inpainted results.
    assert [item["NSFWContent"] for item in results] == [False, False]
    seed = np.asarray(seed_picture()).astype(int)
    assert all(np.array_equal(pixels(item)[outside(BOX)], seed[outside(BOX)]) for item in results)
    await wire.close()


async def stopped(wire: Wire, task_uuid: str) -> dict:
    """The task's error, past the progress items still on their way; a result would fail the test."""
    while True:
        message = await wire.receive()
        assert not any(item.get("taskUUID") == task_uuid and "imageUUID" in item for item in message.get("data", []))
        for error in message.get("errors", []):
            if error.get("taskUUID") == task_uuid:
                return error


async def test_a_cancelled_inpainting_task_with_a_controlnet_stops_at_its_next_step(server, caplog):
    wire = await Wire.open(server.url)
    controls = [{"model": "imagewire:tiny-controlnet@1", "guideImage": guide("square"), "weight": 0.8}]
    with caplog.at_level(logging.INFO, logger="imagewire.device"):
        task = repaint(steps=40, strength=1.0, includeProgress=True, controlNet=controls)
        await wire.send([task])
        await first_step(wire, task["taskUUID"])
        assert (await cancel_answer(wire, task["taskUUID"]))["cancelled"] is True
        error = await stopped(wire, task["taskUUID"])
        assert error["code"] == "taskCancelled"
        marker = f"taskUUID={task['taskUUID']}: cancelled, stopped after step "
        line = await eventually(lambda: next((r.message for r in caplog.records if marker in r.message), None))
    done, total = map(int, line.split(marker)[1].split(" of "))
    assert total >= 40 and done < total
    await wire.close()
