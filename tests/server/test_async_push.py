"""getResponse for a task still running: answered at once, then its results pushed to the socket that asked
(once each, however often it asks), its error too; over REST the answer is held a while for the results."""

from __future__ import annotations

import asyncio
import time

import pytest
from runware import IImageInference, Runware

from imagewire.server import rest as rest_module
from tests.engines import HeldEngine
from tests.sdk import run_script, runware_sdk_dir
from tests.server.test_rest import rest
from tests.timing import seconds
from tests.wire import API_KEY, Wire, eventually, inference


async def acknowledged(wire: Wire, task: dict) -> None:
    await wire.send([task])
    ack = await wire.receive()
    assert ack == {"data": [{"taskType": "imageInference", "taskUUID": task["taskUUID"]}]}


async def poll(wire: Wire, task_uuid: str) -> dict:
    """One getResponse, and its answer: the frame that says processing (nothing else is sent while held)."""
    await wire.send([{"taskType": "getResponse", "taskUUID": task_uuid}])
    answer = await wire.receive()
    [item] = answer["data"]
    assert (item["taskUUID"], item["status"]) == (task_uuid, "processing")
    return answer


async def nothing_more(wire: Wire, task_uuid: str) -> None:
    """The next frame is the pong to a ping sent now: nothing else for the task was on its way."""
    await wire.send([{"taskType": "ping", "ping": True}])
    while True:
        frame = await wire.receive()
        items = frame.get("data", []) + frame.get("errors", [])
        assert not any(item.get("taskUUID") == task_uuid for item in items), frame
        if any(item.get("taskType") == "ping" for item in items):
            return


async def test_results_are_pushed_once_each_to_a_socket_that_polled_many_times(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    task = inference(deliveryMethod="async", numberResults=2, seed=4)
    await acknowledged(wire, task)
    for _ in range(3):
        await poll(wire, task["taskUUID"])
    engine.release.set()
    # No further getResponse: the results come by themselves, one frame each, marked as getResponse marks them.
    pushed = [await wire.receive() for _ in range(2)]
    items = [item for frame in pushed for item in frame["data"]]
    assert [len(frame["data"]) for frame in pushed] == [1, 1]
    assert sorted(item["seed"] for item in items) == [4, 5]
    assert all(item["status"] == "success" and item["imageUUID"] for item in items)
    await nothing_more(wire, task["taskUUID"])

    async def finished() -> dict | None:
        await wire.send([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
        answer = await wire.receive()
        return answer if all(item["status"] == "success" for item in answer["data"]) else None

    # Asked again once it is over, getResponse answers with both, as before, and nothing is pushed again.
    done = await eventually(finished)
    assert sorted(item["imageUUID"] for item in done["data"]) == sorted(item["imageUUID"] for item in items)
    await nothing_more(wire, task["taskUUID"])
    await wire.close()


async def test_only_the_sockets_that_asked_get_the_results_pushed(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    sender, asker, bystander = [await Wire.open(server.url) for _ in range(3)]
    task = inference(deliveryMethod="async", seed=9)
    await acknowledged(sender, task)
    await poll(asker, task["taskUUID"])
    engine.release.set()
    [item] = (await asker.receive())["data"]
    assert (item["taskUUID"], item["status"], item["seed"]) == (task["taskUUID"], "success", 9)
    for wire in (sender, bystander):
        await nothing_more(wire, task["taskUUID"])
    for wire in (sender, asker, bystander):
        await wire.close()


async def test_the_error_of_a_failed_task_is_pushed(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    task = inference(deliveryMethod="async", positivePrompt="explode")
    await acknowledged(wire, task)
    await poll(wire, task["taskUUID"])
    await poll(wire, task["taskUUID"])
    engine.release.set()
    frame = await wire.receive()
    [error] = frame["errors"]
    assert (error["taskUUID"], error["status"], error["code"]) == (task["taskUUID"], "error", "inferenceError")
    await nothing_more(wire, task["taskUUID"])
    await wire.close()


async def test_a_pushed_result_waits_in_the_session_for_a_client_that_resumes(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    first = await Wire.open(server.url)
    task = inference(deliveryMethod="async", seed=31)
    await acknowledged(first, task)
    await poll(first, task["taskUUID"])
    await first.close()
    engine.release.set()
    second = await Wire.open(server.url, session=first.session)
    data, errors = await second.items_for(task["taskUUID"], 1, timeout=seconds(30))
    assert not errors and (data[0]["seed"], data[0]["status"]) == (31, "success")
    await second.close()


async def test_the_runware_sdk_async_then_get_response_returns_as_soon_as_the_image_exists(start_server):
    """runware 0.5.24 finishes a poll only on an item with a result: without the push it waited out its 30 s
    poll timeout before asking again."""
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    client = Runware(api_key="test-key", url=server.url)
    await client.connect()
    try:
        acknowledgement = await client.imageInference(requestImage=IImageInference(
            model="imagewire:tiny@1", positivePrompt="a harbour", width=128, height=128, steps=2, seed=3,
            deliveryMethod="async"))
        task_uuid = acknowledgement.taskUUID
        fetching = asyncio.create_task(client.getResponse(taskUUID=task_uuid, numberResults=1))
        # Its first poll is answered "processing" while the engine holds the job.
        await asyncio.sleep(seconds(0.5))
        assert not fetching.done()
        released = time.monotonic()
        engine.release.set()
        [image] = await asyncio.wait_for(fetching, seconds(25))
        took = time.monotonic() - released
        assert image.taskUUID == task_uuid and image.imageUUID and image.seed == 3
        assert took < seconds(10), f"getResponse took {took:.1f} s after the image was released"
    finally:
        await client.disconnect()


async def test_rest_get_response_holds_its_answer_until_the_task_finishes(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    task = inference(deliveryMethod="async", seed=12)
    status, answer = await rest(server, [task])
    assert status == 200 and answer["data"] == [{"taskType": "imageInference", "taskUUID": task["taskUUID"]}]
    asking = asyncio.create_task(rest(server, [{"taskType": "getResponse", "taskUUID": task["taskUUID"]}]))
    await asyncio.sleep(seconds(0.5))
    assert not asking.done(), "answered processing at once rather than holding for the result"
    engine.release.set()
    status, answer = await asking
    [item] = answer["data"]
    assert status == 200 and (item["status"], item["seed"]) == ("success", 12)


async def test_rest_get_response_answers_processing_once_its_hold_is_over(start_server, monkeypatch):
    monkeypatch.setattr(rest_module, "GET_RESPONSE_HOLD_SECONDS", seconds(0.3))
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    task = inference(deliveryMethod="async")
    await rest(server, [task])
    started = time.monotonic()
    status, answer = await rest(server, [{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
    took = time.monotonic() - started
    assert status == 200 and answer["data"][0]["status"] == "processing"
    assert seconds(0.3) <= took < seconds(5)
    engine.release.set()


async def test_with_shared_state_results_are_pushed_by_the_server_running_the_task(start_server, redis_url):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine, state=redis_url)
    wire = await Wire.open(server.url)
    task = inference(deliveryMethod="async", numberResults=2, seed=40)
    await acknowledged(wire, task)
    await poll(wire, task["taskUUID"])
    await poll(wire, task["taskUUID"])
    engine.release.set()
    data, errors = await wire.items_for(task["taskUUID"], 2, timeout=seconds(30))
    assert not errors and sorted(item["seed"] for item in data) == [40, 41]
    await nothing_more(wire, task["taskUUID"])
    await wire.close()


async def test_with_shared_state_a_task_on_another_server_pushes_to_the_socket_that_asked(start_server, redis_url):
    """The server asked does not run the task: the read subscribes its session in Redis, and the server running
    the task pushes each later result into that session's outbox, which the asking server drains to the socket."""
    engine = HeldEngine()
    running = await start_server(engine_factory=lambda: engine, state=redis_url)
    asked = await start_server(engine_factory=lambda: HeldEngine(released=True), state=redis_url)
    sender, asker = await Wire.open(running.url), await Wire.open(asked.url)
    task = inference(deliveryMethod="async", numberResults=2, seed=50)
    await acknowledged(sender, task)
    for _ in range(3):
        await poll(asker, task["taskUUID"])
    engine.release.set()
    data, errors = await asker.items_for(task["taskUUID"], 2, timeout=seconds(30))
    assert not errors and sorted(item["seed"] for item in data) == [50, 51]
    assert all(item["status"] == "success" for item in data)
    await nothing_more(asker, task["taskUUID"])
    # The running server pushed nothing to the sender, which never asked.
    await nothing_more(sender, task["taskUUID"])
    await sender.close()
    await asker.close()


async def test_with_shared_state_the_error_of_a_task_on_another_server_is_pushed(start_server, redis_url):
    engine = HeldEngine()
    running = await start_server(engine_factory=lambda: engine, state=redis_url)
    asked = await start_server(engine_factory=lambda: HeldEngine(released=True), state=redis_url)
    sender, asker = await Wire.open(running.url), await Wire.open(asked.url)
    task = inference(deliveryMethod="async", positivePrompt="explode")
    await acknowledged(sender, task)
    await poll(asker, task["taskUUID"])
    engine.release.set()
    [error] = (await asker.receive(seconds(30)))["errors"]
    assert (error["taskUUID"], error["status"], error["code"]) == (task["taskUUID"], "error", "inferenceError")
    await nothing_more(asker, task["taskUUID"])
    await sender.close()
    await asker.close()


NEXT_SDK_SCRIPT = r'''
import asyncio, json, sys
from runware import Runware, RunOptions

async def main(port, key, transport):
    progress = []
    client = Runware(api_key=key, transport=transport, ws_base_url=f"ws://127.0.0.1:{port}/v1",
                     http_base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    async with client:
        images = await client.run(
            {"taskType": "imageInference", "model": "imagewire:tiny@1", "positivePrompt": "a lighthouse",
             "width": 128, "height": 128, "steps": 2, "seed": 8, "deliveryMethod": "async"},
            RunOptions(on_progress=progress.append))
    print(json.dumps({"seeds": [image["seed"] for image in images], "statuses": [image["status"] for image in images],
                      "progress": [item.get("progress") for item in progress]}))

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
'''


@pytest.mark.parametrize("transport", ["websocket", "rest"])
async def test_the_newer_sdk_polling_still_sees_progress_then_its_results(start_server, transport, monkeypatch):
    """runware-sdk 1.8 polls getResponse: its polls while the job is held report progress, and the result
    (pushed, or in a held REST answer) ends its run once, not twice."""
    # A REST poll is held until the task finishes or the hold is over: shortened, so one answers processing.
    monkeypatch.setattr(rest_module, "GET_RESPONSE_HOLD_SECONDS", seconds(0.5))
    engine = HeldEngine(step_first=True)
    server = await start_server(engine_factory=lambda: engine)
    running = asyncio.create_task(asyncio.to_thread(
        run_script, runware_sdk_dir(), NEXT_SDK_SCRIPT, str(server.port), API_KEY, transport))
    assert await asyncio.to_thread(engine.started.wait, seconds(60))
    await asyncio.sleep(seconds(3))  # its first poll comes 1 s after the acknowledgement
    engine.release.set()
    outcome = await running
    assert outcome["seeds"] == [8] and outcome["statuses"] == ["success"]
    assert outcome["progress"] and all(0 <= value < 100 for value in outcome["progress"])
