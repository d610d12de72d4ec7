"""cancelTask: a waiting task leaves the queue, a running one stops at its next step while its
batch-mates carry on, only the key that sent a task may cancel it, and getResponse shows it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.engines import HeldEngine
from tests.timing import seconds
from tests.wire import Wire, eventually, inference, new_uuid


def cancel(task_uuid: str) -> dict:
    return {"taskType": "cancelTask", "taskUUID": task_uuid}


async def cancel_answer(wire: Wire, task_uuid: str) -> dict:
    await wire.send([cancel(task_uuid)])
    while True:
        message = await wire.receive()
        for item in message.get("data", []) + message.get("errors", []):
            if item.get("taskType") == "cancelTask":
                return item


async def test_a_waiting_task_leaves_the_queue_at_once(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    blocker, waiting = inference(positivePrompt="blocker"), inference()
    await wire.send([blocker])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    await wire.send([waiting])
    await eventually(lambda: server.device.pending == 1)
    answer = await cancel_answer(wire, waiting["taskUUID"])
    assert answer == {"taskType": "cancelTask", "taskUUID": waiting["taskUUID"], "cancelled": True, "status": "error"}
    _, errors = await wire.items_for(waiting["taskUUID"], 1)
    assert errors[0]["code"] == "taskCancelled" and errors[0]["taskType"] == "imageInference"
    assert server.device.pending == 0
    engine.release.set()
    data, _ = await wire.items_for(blocker["taskUUID"], 1)
    assert data and engine.ran == [blocker["taskUUID"]]  # the cancelled task never reached the device
    await wire.close()


async def first_step(wire: Wire, task_uuid: str) -> None:
    """Read frames until ``task_uuid`` (sent with includeProgress) reports a denoising step."""
    while True:
        message = await wire.receive()
        if any(item.get("taskUUID") == task_uuid and item.get("step") for item in message.get("data", [])):
            return


async def test_a_running_task_stops_at_its_next_step_and_its_batch_mates_carry_on(start_server, caplog):
    server = await start_server(max_batch_size=4)
    wire = await Wire.open(server.url)
    # A long task holds the device, so that the two sent behind it share one call.
    blocker = inference(width=256, height=256, steps=12, positivePrompt="blocker", includeProgress=True)
    stopped = inference(steps=40, includeProgress=True, positivePrompt="one")
    kept = inference(steps=40, positivePrompt="two")
    await wire.send([blocker])
    await first_step(wire, blocker["taskUUID"])
    await wire.send([stopped, kept])
    await eventually(lambda: server.device.pending == 2)
    await first_step(wire, stopped["taskUUID"])  # the shared call is under way
    assert (await cancel_answer(wire, stopped["taskUUID"]))["cancelled"] is True
    outcome: dict[str, dict] = {}
    while len(outcome) < 2:
        message = await wire.receive()
        for item in message.get("errors", []) + message.get("data", []):
            if item.get("taskUUID") == stopped["taskUUID"] and "code" in item:
                outcome["stopped"] = item
            elif item.get("taskUUID") == kept["taskUUID"] and "imageUUID" in item:
                outcome["kept"] = item
    assert outcome["stopped"]["code"] == "taskCancelled"
    assert outcome["kept"]["seed"] is not None  # its batch-mate got its image

    # Alone in its call, a cancelled task stops the call at the next step.
    with caplog.at_level(logging.INFO, logger="imagewire.device"):
        lone = inference(steps=40, includeProgress=True)
        await wire.send([lone])
        await first_step(wire, lone["taskUUID"])
        assert (await cancel_answer(wire, lone["taskUUID"]))["cancelled"] is True
        marker = f"taskUUID={lone['taskUUID']}: cancelled, stopped after step "
        line = await eventually(lambda: next((r.message for r in caplog.records if marker in r.message), None))
    done, total = map(int, line.split(marker)[1].split(" of "))
    assert total >= 40 and done < total  # (PNDM, the tiny model's own sampler, takes one step more)
    await wire.close()


async def test_another_keys_task_cannot_be_cancelled(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine, api_keys=("key-a", "key-b"))
    owner, stranger = await Wire.open(server.url, api_key="key-a"), await Wire.open(server.url, api_key="key-b")
    task = inference()
    await owner.send([task])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    refusal = await cancel_answer(stranger, task["taskUUID"])
    assert refusal["code"] == "taskNotFound" and refusal["parameter"] == "taskUUID"
    # ...the same answer as for a taskUUID nobody used.
    assert (await cancel_answer(stranger, new_uuid()))["code"] == "taskNotFound"
    engine.release.set()
    data, errors = await owner.items_for(task["taskUUID"], 1)
    assert data and not errors
    # A finished task is not cancelled: the answer says how it ended.
    assert await cancel_answer(owner, task["taskUUID"]) == {
        "taskType": "cancelTask", "taskUUID": task["taskUUID"], "cancelled": False, "status": "success"}
    await owner.close()
    await stranger.close()


async def test_get_response_shows_a_cancelled_task(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    task = inference(deliveryMethod="async")
    await wire.send([task])
    await wire.receive()  # acknowledgement
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    assert (await cancel_answer(wire, task["taskUUID"]))["cancelled"] is True
    engine.release.set()

    async def failed() -> dict | None:
        await wire.send([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
        answer = await wire.receive()
        return answer if answer.get("errors") else None

    error = (await eventually(failed))["errors"][0]
    assert (error["code"], error["status"], error["taskType"]) == ("taskCancelled", "error", "imageInference")
    await wire.close()


async def test_of_many_cancels_for_one_task_in_one_frame_only_the_first_stops_it(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    running = inference()
    await wire.send([running])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    await wire.send([cancel(running["taskUUID"]) for _ in range(16)])
    answers: list[dict] = []
    while len(answers) < 16:
        message = await wire.receive()
        answers += [item for item in message.get("data", []) + message.get("errors", [])
                    if item.get("taskType") == "cancelTask"]
    engine.release.set()
    assert sorted(answer["cancelled"] for answer in answers) == [False] * 15 + [True]
    await wire.close()


async def test_a_cancel_is_answered_when_the_tasks_it_stops_hold_every_place(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine, max_tasks_in_flight=2, max_tasks_per_key=2)
    wire = await Wire.open(server.url)
    running, waiting = inference(positivePrompt="running"), inference()
    await wire.send([running, waiting])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    # Both places taken: a third task is refused, but a cancel takes no place and is answered.
    assert (await wire.error(inference()))["code"] == "serviceUnavailable"
    answer = await cancel_answer(wire, waiting["taskUUID"])
    assert answer["cancelled"] is True
    engine.release.set()
    data, _ = await wire.items_for(running["taskUUID"], 1)
    assert data
    await wire.close()


def test_cancels_take_no_place_but_one_messages_worth_per_connection_at_most() -> None:
    from imagewire.server.admission import Admission
    from imagewire.tasks.errors import TooManyTasks

    admission = Admission(per_connection=1, per_key=1, per_connection_placeless=2)
    admission.acquire("socket", "key")
    cancels = [admission.acquire("socket", "key", takes_place=False) for _ in range(2)]
    with pytest.raises(TooManyTasks, match=r"cancelTask.*max 2"):
        admission.acquire("socket", "key", takes_place=False)
    admission.release(cancels[0])
    admission.acquire("socket", "key", takes_place=False)
    assert admission.unfinished(connection="socket") == 1  # cancels are not counted as unfinished tasks
