"""The device scheduler behind a real server, with a controllable engine in place of diffusers.

The engine seam lets these tests hold a job on the 'device' for as long as they need, which
is how a full queue, a failing job and pongs during inference are shown deterministically.
"""

from __future__ import annotations

import asyncio

from tests.engines import HeldEngine
from tests.timing import seconds
from tests.wire import Wire, eventually, inference


async def test_pongs_flow_while_the_device_is_busy(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    task = inference()
    await wire.send([task])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    for _ in range(3):
        await wire.send([{"taskType": "ping", "ping": True}])
        reply = await wire.receive(timeout=seconds(5))
        assert reply["data"][0]["pong"] is True, reply
    engine.release.set()
    data, _ = await wire.items_for(task["taskUUID"], 1)
    assert data[0]["imageUUID"]
    await wire.close()


async def test_a_full_queue_answers_service_unavailable(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine, queue_size=1)
    wire = await Wire.open(server.url)
    running, waiting, refused = inference(), inference(), inference()
    await wire.send([running])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    await queue_in_order(server, wire, [waiting])
    await wire.send([refused])
    _, errors = await wire.items_for(refused["taskUUID"], 1)
    assert errors[0]["code"] == "serviceUnavailable" and "busy" in errors[0]["message"]
    engine.release.set()
    # Their answers may arrive in either order: each is encoded on its own thread.
    answers = await wire.answers({running["taskUUID"]: 1, waiting["taskUUID"]: 1})
    assert all(data and not errors for data, errors in answers.values())
    await wire.close()


async def test_a_failing_job_fails_only_its_task(start_server):
    engine = HeldEngine()
    engine.release.set()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    error = await wire.error(inference(positivePrompt="explode please"))
    assert error["code"] == "inferenceError" and "out of memory" in error["message"]
    assert "Traceback" not in error["message"]
    assert await wire.run(inference())
    await wire.close()


async def test_jobs_never_run_concurrently_and_all_finish(start_server):
    engine = HeldEngine()
    engine.release.set()
    server = await start_server(engine_factory=lambda: engine)
    wires = [await Wire.open(server.url) for _ in range(4)]
    tasks = [inference() for _ in range(4)]
    for wire, task in zip(wires, tasks, strict=True):
        await wire.send([task])
    for wire, task in zip(wires, tasks, strict=True):
        data, errors = await wire.items_for(task["taskUUID"], 1)
        assert data and not errors
    assert sorted(engine.ran) == sorted(t["taskUUID"] for t in tasks)
    for wire in wires:
        await wire.close()


async def queue_in_order(server, wire: Wire, tasks: list[dict]) -> None:
    """Send ``tasks`` one by one, each once the previous one waits in the queue (the tasks of one
    message are validated concurrently and may reach the queue in any order)."""
    scheduler = server.device
    for task in tasks:
        waiting = scheduler.pending
        await wire.send([task])
        await eventually(lambda: scheduler.pending > waiting)  # noqa: B023 - awaited within this iteration


async def hold_the_device(engine: HeldEngine, wire: Wire) -> dict:
    """Send a task and wait until the engine holds it: what is sent next waits in the queue."""
    blocker = inference(positivePrompt="blocker")
    await wire.send([blocker])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    return blocker


async def test_waiting_tasks_with_the_same_settings_share_a_pipeline_call(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine, max_batch_size=4)
    wire = await Wire.open(server.url)
    blocker = await hold_the_device(engine, wire)
    first, other_size, second, two_more, too_many = (
        inference(positivePrompt="a red fox"), inference(width=192, positivePrompt="a fox, another size"),
        inference(positivePrompt="a blue bird"), inference(positivePrompt="two more", numberResults=2),
        inference(positivePrompt="would make five images", numberResults=2))
    await queue_in_order(server, wire, [first, other_size, second, two_more, too_many])
    engine.release.set()
    everything = (blocker, first, other_size, second, two_more, too_many)
    answers = await wire.answers({task["taskUUID"]: task.get("numberResults", 1) for task in everything})
    assert all(data and not errors for data, errors in answers.values()), answers
    # The head of the line takes the compatible tasks behind it, in order, up to 4 images.
    assert engine.calls == [[blocker["taskUUID"]], [first["taskUUID"], second["taskUUID"], two_more["taskUUID"]],
                            [other_size["taskUUID"]], [too_many["taskUUID"]]]
    await wire.close()


async def test_a_failing_shared_call_answers_each_task_on_its_own(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    blocker = await hold_the_device(engine, wire)
    good, bad, also_good = inference(), inference(positivePrompt="explode please"), inference()
    await queue_in_order(server, wire, [good, bad, also_good])
    engine.release.set()
    answers = await wire.answers({task["taskUUID"]: 1 for task in (blocker, good, bad, also_good)})
    for task in (blocker, good, also_good):
        data, errors = answers[task["taskUUID"]]
        assert data and not errors, errors
    _, errors = answers[bad["taskUUID"]]
    assert errors[0]["code"] == "inferenceError"
    shared = [good["taskUUID"], bad["taskUUID"], also_good["taskUUID"]]
    assert engine.calls[1] == shared  # tried together first, then each alone
    assert engine.calls[2:] == [[task_uuid] for task_uuid in shared]
    await wire.close()


async def test_max_batch_size_one_keeps_every_task_in_its_own_call(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine, max_batch_size=1)
    wire = await Wire.open(server.url)
    await hold_the_device(engine, wire)
    tasks = [inference() for _ in range(3)]
    await wire.send(tasks)
    await eventually(lambda: server.device.pending == 3)
    engine.release.set()
    answers = await wire.answers({task["taskUUID"]: 1 for task in tasks})
    assert all(data and not errors for data, errors in answers.values())
    assert [len(call) for call in engine.calls] == [1, 1, 1, 1]
    await wire.close()


# ---------------------------------------------------------------- jobs for loaded models go first, within a bound


async def test_jobs_for_a_loaded_model_go_first_but_pass_no_job_more_than_the_bound(start_server):
    engine = HeldEngine()
    engine.loaded_models = {"imagewire:tiny@1": "device", "imagewire:tiny-sdxl@1": "ram"}
    server = await start_server(engine_factory=lambda: engine, max_batch_size=1, max_passed_over=2)
    wire = await Wire.open(server.url)
    blocker = await hold_the_device(engine, wire)
    # A job for a model in host RAM (not on the device) waits first in line, then three for the loaded one.
    elsewhere = inference(model="imagewire:tiny-sdxl@1", positivePrompt="needs a switch")
    loaded = [inference(positivePrompt=f"loaded {index}") for index in range(3)]
    await queue_in_order(server, wire, [elsewhere, *loaded])
    engine.release.set()
    answers = await wire.answers({task["taskUUID"]: 1 for task in (blocker, elsewhere, *loaded)})
    assert all(data and not errors for data, errors in answers.values())
    # Two jobs for the loaded model went before it, then it had waited long enough.
    assert engine.calls == [[blocker["taskUUID"]], [loaded[0]["taskUUID"]], [loaded[1]["taskUUID"]],
                            [elsewhere["taskUUID"]], [loaded[2]["taskUUID"]]]
    await wire.close()


async def test_with_no_bound_jobs_keep_their_order(start_server):
    engine = HeldEngine()
    engine.loaded_models = {"imagewire:tiny@1": "device"}
    server = await start_server(engine_factory=lambda: engine, max_batch_size=1, max_passed_over=0)
    wire = await Wire.open(server.url)
    blocker = await hold_the_device(engine, wire)
    tasks = [inference(model="imagewire:tiny-sdxl@1"), inference(), inference(model="imagewire:tiny-sdxl@1")]
    await queue_in_order(server, wire, tasks)
    engine.release.set()
    await wire.answers({task["taskUUID"]: 1 for task in (blocker, *tasks)})
    assert engine.calls == [[blocker["taskUUID"]], *([task["taskUUID"]] for task in tasks)]
    await wire.close()


async def test_keys_take_turns_and_a_key_waiting_for_a_load_keeps_its_turn(start_server):
    # Key a's task needs a model that is not on the device; key b's three run on the loaded one.
    engine = HeldEngine()
    engine.loaded_models = {"imagewire:tiny@1": "device"}
    server = await start_server(engine_factory=lambda: engine, api_keys=("key-a", "key-b"), max_batch_size=1,
                                max_passed_over=1)
    first, second = await Wire.open(server.url, api_key="key-a"), await Wire.open(server.url, api_key="key-b")
    blocker = await hold_the_device(engine, second)
    elsewhere = inference(model="imagewire:tiny-sdxl@1", positivePrompt="needs a load")
    loaded = [inference(positivePrompt=f"loaded {index}") for index in range(3)]
    await queue_in_order(server, second, loaded)
    await queue_in_order(server, first, [elsewhere])
    engine.release.set()
    await first.answers({elsewhere["taskUUID"]: 1})
    await second.answers({task["taskUUID"]: 1 for task in (blocker, *loaded)})
    # Turns alone would run key a's task second (after b's first), arrival order alone last. Its turn comes
    # after b's first task; one loaded task (the bound) goes before it, and it keeps its turn meanwhile.
    assert engine.calls == [[blocker["taskUUID"]], [loaded[0]["taskUUID"]], [loaded[1]["taskUUID"]],
                            [elsewhere["taskUUID"]], [loaded[2]["taskUUID"]]]
    await first.close()
    await second.close()
