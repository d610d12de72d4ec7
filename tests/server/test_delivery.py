"""Delivery that survives the network: async + getResponse, session resume, conflicts, webhooks."""

from __future__ import annotations

import asyncio

import orjson

from tests.engines import HeldEngine
from tests.timing import seconds
from tests.wire import Wire, eventually, inference, new_uuid


async def get_response(wire: Wire, task_uuid: str) -> dict:
    await wire.send([{"taskType": "getResponse", "taskUUID": task_uuid}])
    while True:
        message = await wire.receive()
        items = message.get("data", []) + message.get("errors", [])
        if any(item.get("taskUUID") == task_uuid for item in items):
            return message


async def test_async_delivery_acknowledges_at_once_and_get_response_returns_results(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    task = inference(deliveryMethod="async", numberResults=2, seed=4)
    await wire.send([task])
    ack = await wire.receive()
    assert ack == {"data": [{"taskType": "imageInference", "taskUUID": task["taskUUID"]}]}
    pending = await get_response(wire, task["taskUUID"])
    [processing] = pending["data"]
    # progress (0 here: the job waits) once the job is queued; until then the task is just processing.
    assert processing.pop("progress", 0) == 0
    assert processing == {"taskType": "imageInference", "taskUUID": task["taskUUID"], "status": "processing"}
    engine.release.set()
    # Having asked, the socket gets the results pushed as they exist (tests/server/test_async_push.py) ...
    pushed, _ = await wire.items_for(task["taskUUID"], 2)
    # ... and getResponse answers with all of them once the task is over.
    async def finished() -> dict | None:
        done = await get_response(wire, task["taskUUID"])
        return done if all(item["status"] == "success" for item in done["data"]) else None

    done = await eventually(finished)
    assert sorted(item["seed"] for item in done["data"]) == [4, 5]
    assert [item["imageUUID"] for item in pushed] == [item["imageUUID"] for item in done["data"]]
    assert all(item["taskType"] == "imageInference" and item["imageUUID"] for item in done["data"])
    await wire.close()


async def test_get_response_reports_failed_async_tasks_as_errors(start_server):
    engine = HeldEngine()
    engine.release.set()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    task = inference(deliveryMethod="async", positivePrompt="explode")
    await wire.send([task])
    await wire.receive()  # acknowledgement

    async def failed() -> dict | None:
        answer = await get_response(wire, task["taskUUID"])
        return answer if answer.get("errors") else None

    error = (await eventually(failed))["errors"][0]
    assert (error["status"], error["code"], error["taskType"]) == ("error", "inferenceError", "imageInference")
    await wire.close()


async def test_async_tasks_with_a_bad_model_or_size_are_refused_at_once_not_acknowledged(server):
    wire = await Wire.open(server.url)
    for task, code in ((inference(deliveryMethod="async", width=500), "invalidWidth"),
                       (inference(deliveryMethod="async", model="runware:404@1"), "modelNotFound")):
        await wire.send([task])
        message = await wire.receive()
        assert "data" not in message, "no acknowledgement for a task that cannot run"
        assert (message["errors"][0]["code"], message["errors"][0]["taskUUID"]) == (code, task["taskUUID"])
    await wire.close()


async def test_get_response_for_an_unknown_task(server):
    wire = await Wire.open(server.url)
    error = await wire.error({"taskType": "getResponse", "taskUUID": new_uuid()})
    assert error["code"] == "taskNotFound" and error["parameter"] == "taskUUID"
    await wire.close()


async def test_results_of_a_dropped_connection_are_delivered_on_resume(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    first = await Wire.open(server.url)
    task = inference(seed=77)
    await first.send([task])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    await first.close()
    engine.release.set()
    await asyncio.sleep(seconds(0.3))  # the result is produced while nobody is connected
    second = await Wire.open(server.url, session=first.session)
    assert second.session == first.session
    data, errors = await second.items_for(task["taskUUID"], 1)
    assert data[0]["seed"] == 77 and not errors
    await second.close()


async def test_another_key_cannot_resume_a_session(start_server):
    server = await start_server(api_keys=("key-a", "key-b"))
    owner = await Wire.open(server.url, api_key="key-a")
    await owner.close()
    intruder = await Wire.open(server.url, api_key="key-b", session=owner.session)
    assert intruder.session != owner.session
    await intruder.close()


async def test_conflicting_task_uuid_while_running_runs_only_once(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine)
    wire = await Wire.open(server.url)
    task = inference()
    await wire.send([task])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    await wire.send([dict(task)])
    _, errors = await wire.items_for(task["taskUUID"], 1)
    assert errors[0]["code"] == "conflictTaskUUID"
    engine.release.set()
    data, _ = await wire.items_for(task["taskUUID"], 1)
    assert data and engine.ran == [task["taskUUID"]]
    await wire.close()


async def test_a_task_uuid_is_each_keys_own(start_server):
    # Key B reusing key A's taskUUID runs its own task: it is not told of A's, nor kept from running.
    server = await start_server(api_keys=("key-a", "key-b"))
    first, second = await Wire.open(server.url, api_key="key-a"), await Wire.open(server.url, api_key="key-b")
    task = inference(seed=5)
    [mine] = await first.run(task)
    [theirs] = await second.run(dict(task, seed=6))
    assert (mine["seed"], theirs["seed"]) == (5, 6) and mine["imageUUID"] != theirs["imageUUID"]
    for wire, expected in ((first, mine), (second, theirs)):
        answer = await get_response(wire, task["taskUUID"])
        assert [item["imageUUID"] for item in answer["data"]] == [expected["imageUUID"]]
    await first.send([dict(task)])
    _, errors = await first.items_for(task["taskUUID"], 1)
    assert errors[0]["code"] == "conflictTaskUUID"  # within one key, a UUID is still used once
    await first.close()
    await second.close()


async def webhook_receiver() -> tuple[asyncio.Server, int, list[dict]]:
    """A webhook endpoint on loopback: its server, its port, and the JSON body of each POST it has taken."""
    received: list[dict] = []

    async def hook(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
        received.append(orjson.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(hook, "127.0.0.1", 0)
    return listener, listener.sockets[0].getsockname()[1], received


async def test_webhooks_receive_each_async_result(start_server):
    listener, port, received = await webhook_receiver()
    server = await start_server(allow_private_urls=True)
    wire = await Wire.open(server.url)
    task = inference(deliveryMethod="async", numberResults=2, webhookURL=f"http://127.0.0.1:{port}/hook")
    await wire.send([task])
    await eventually(lambda: len(received) == 2)
    assert {body["data"][0]["taskUUID"] for body in received} == {task["taskUUID"]}
    assert all(body["data"][0]["imageUUID"] for body in received)
    listener.close()
    await wire.close()


async def test_a_sync_task_with_a_webhook_posts_to_it_too(start_server):
    listener, port, received = await webhook_receiver()
    server = await start_server(allow_private_urls=True, engine_factory=lambda: HeldEngine(released=True))
    wire = await Wire.open(server.url)
    url = f"http://127.0.0.1:{port}/hook"
    # Results over the socket as ever, and each one POSTed as well.
    [result] = await wire.run(inference(seed=6, webhookURL=url))
    await eventually(lambda: len(received) == 1)
    assert received[0]["data"][0]["imageUUID"] == result["imageUUID"]
    # An error of the run too (one of the checks before it starts is only answered, as for async tasks).
    error = await wire.error(inference(positivePrompt="explode", webhookURL=url))
    await eventually(lambda: len(received) == 2)
    assert received[1]["data"][0]["code"] == error["code"] == "inferenceError"
    assert received[1]["data"][0]["taskUUID"] == error["taskUUID"]
    listener.close()
    await wire.close()


async def test_webhooks_to_private_addresses_are_refused_by_default(start_server):
    hits: list[bytes] = []

    async def hook(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(await reader.read(100))
        writer.close()

    listener = await asyncio.start_server(hook, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server = await start_server()
    server.runner.webhooks.first_delay = 0.01
    wire = await Wire.open(server.url)
    task = inference(deliveryMethod="async", webhookURL=f"http://127.0.0.1:{port}/hook")
    await wire.send([task])
    await wire.receive()

    async def finished() -> bool:
        answer = await get_response(wire, task["taskUUID"])
        return all(item.get("status") != "processing" for item in answer.get("data", []))

    await eventually(finished)  # every result was handed to the webhook sender...
    await eventually(lambda: server.runner.webhooks.pending == 0)  # ...and every attempt made
    assert hits == []
    listener.close()
    await wire.close()


async def test_a_client_that_never_comes_back_leaves_nothing_behind(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine, resume_window=0.2, result_retention=0.2)
    wire = await Wire.open(server.url)
    task = inference(numberResults=3)
    await wire.send([task])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    await wire.close()
    engine.release.set()
    await eventually(lambda: not server.runner.running)  # the task finishes with nobody listening
    assert server.runner.admission.unfinished() == 0
    session = next(iter(server.sessions._sessions.values()))
    assert len(session.outbox) == 3  # kept for a resume...
    await asyncio.sleep(seconds(0.3))
    await server.sweep(store=False)
    assert len(server.sessions) == 0 and len(server.registry) == 0  # ...then dropped


async def test_stored_images_expire_after_the_image_ttl(start_server):
    server = await start_server(image_ttl=2)
    wire = await Wire.open(server.url)
    [item] = await wire.run(inference())
    await server.sweep(store=True)
    assert await server.store.get(item["imageUUID"], owner=None)
    await asyncio.sleep(seconds(2.5))
    await server.sweep(store=True)
    error = await wire.error(inference(seedImage=item["imageUUID"]))
    assert error["code"] == "imageNotFound"
    await wire.close()
