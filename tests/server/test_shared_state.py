"""Two servers sharing one Redis (``--state``): a client may use either. getResponse, conflictTaskUUID,
cancelTask and session resume work across them; a Redis that goes away mid-run fails new work clearly
while running tasks still deliver; without Redis the server does not start."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from imagewire.server import app as server_app
from tests.engines import HeldEngine
from tests.redis_process import RedisProcess
from tests.timing import seconds
from tests.wire import API_KEY, Wire, eventually, inference, new_uuid


async def answer_for(wire: Wire, task: dict) -> dict:
    """Send one task that answers in one frame (getResponse, cancelTask) and return that frame."""
    await wire.send([task])
    while True:
        message = await wire.receive()
        items = message.get("data", []) + message.get("errors", [])
        if any(item.get("taskUUID") == task["taskUUID"] for item in items):
            return message


def get_response(task_uuid: str) -> dict:
    return {"taskType": "getResponse", "taskUUID": task_uuid}


def cancel(task_uuid: str) -> dict:
    return {"taskType": "cancelTask", "taskUUID": task_uuid}


async def two_servers(start_server, redis_url: str, **settings) -> tuple[list[HeldEngine], list]:
    engines = [HeldEngine(), HeldEngine()]
    servers = [await start_server(engine_factory=lambda engine=engine: engine, state=redis_url, **settings)
               for engine in engines]
    return engines, servers


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=seconds(10)) as response:
        data: bytes = response.read()
    return data


async def test_a_task_answered_on_one_server_is_visible_through_get_response_on_another(
        start_server, redis_url: str, s3_endpoint: str, s3_bucket: str) -> None:
    shared = {"state": redis_url, "store": f"s3://{s3_bucket}/gateway", "s3_endpoint": s3_endpoint}
    first, second = await start_server(**shared), await start_server(**shared)
    on_first, on_second = await Wire.open(first.url), await Wire.open(second.url)
    task = inference(seed=11, outputType=["URL", "base64Data"])
    [item] = await on_first.run(task)

    async def finished() -> list[dict] | None:  # the result is sent just before the task's end is recorded
        items = (await answer_for(on_second, get_response(task["taskUUID"])))["data"]
        return items if all(kept["status"] != "processing" for kept in items) else None

    [kept] = await eventually(finished)
    assert kept["status"] == "success" and kept["imageUUID"] == item["imageUUID"] and kept["seed"] == 11
    assert kept["imageBase64Data"] == item["imageBase64Data"]
    # The image itself is in the shared bucket: the second server serves it too, the same bytes.
    on_second_url = f"{second.config.base_url}/image/{item['imageUUID']}.png"
    assert await asyncio.to_thread(fetch, on_second_url) == base64.b64decode(item["imageBase64Data"])
    assert Image.open(io.BytesIO(await asyncio.to_thread(fetch, item["imageURL"]))).size == (128, 128)
    await on_first.close()
    await on_second.close()


async def test_async_results_and_progress_reach_get_response_on_another_server(start_server, redis_url: str) -> None:
    (engine, _), (first, second) = await two_servers(start_server, redis_url)
    engine.step_first = True
    on_first, on_second = await Wire.open(first.url), await Wire.open(second.url)
    task = inference(deliveryMethod="async", numberResults=2, seed=40)
    await on_first.send([task])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))

    async def processing() -> dict | None:
        [item] = (await answer_for(on_second, get_response(task["taskUUID"])))["data"]
        return item if item.get("progress") is not None else None

    assert (await eventually(processing))["status"] == "processing"
    engine.release.set()
    # Having asked, the second server's socket gets the results pushed (tests/server/test_async_push.py) ...
    pushed, _ = await on_second.items_for(task["taskUUID"], 2)
    assert sorted(item["seed"] for item in pushed) == [40, 41]
    # ... and getResponse there answers with both once the task is over.
    async def finished() -> list[dict] | None:
        items = (await answer_for(on_second, get_response(task["taskUUID"])))["data"]
        return items if all(item["status"] == "success" for item in items) else None

    assert sorted(item["seed"] for item in await eventually(finished)) == [40, 41]
    await on_first.close()
    await on_second.close()


async def test_the_same_task_uuid_sent_to_both_servers_runs_once(start_server, redis_url: str) -> None:
    engines, (first, second) = await two_servers(start_server, redis_url)
    on_first, on_second = await Wire.open(first.url), await Wire.open(second.url)
    task = inference(seed=3)
    await on_first.send([task])
    assert await asyncio.to_thread(engines[0].started.wait, seconds(10))
    error = await on_second.error(dict(task))
    assert error["code"] == "conflictTaskUUID" and error["parameter"] == "taskUUID"
    # Another key may use the same UUID for a task of its own.
    for engine in engines:
        engine.release.set()
    data, _ = await on_first.items_for(task["taskUUID"], 1)
    assert data[0]["seed"] == 3
    assert engines[0].ran == [task["taskUUID"]] and engines[1].ran == []
    error = await on_second.error(dict(task))  # answered: the UUID stays taken for the retention
    assert error["code"] == "conflictTaskUUID"
    await on_first.close()
    await on_second.close()


async def test_a_task_uuid_is_still_each_keys_own(start_server, redis_url: str) -> None:
    keys = ("key-a", "key-b")
    first = await start_server(engine_factory=lambda: HeldEngine(released=True), state=redis_url, api_keys=keys)
    second = await start_server(engine_factory=lambda: HeldEngine(released=True), state=redis_url, api_keys=keys)
    owner, stranger = await Wire.open(first.url, api_key="key-a"), await Wire.open(second.url, api_key="key-b")
    task = inference(seed=4)
    await owner.run(task)
    answer = await answer_for(stranger, get_response(task["taskUUID"]))
    assert answer["errors"][0]["code"] == "taskNotFound"
    assert (await stranger.run(dict(task)))[0]["seed"] == 4
    await owner.close()
    await stranger.close()


async def test_cancel_on_one_server_stops_a_task_running_on_another(start_server, redis_url: str) -> None:
    engines, (first, second) = await two_servers(start_server, redis_url)
    on_first, on_second = await Wire.open(first.url), await Wire.open(second.url)
    task = inference()
    await on_first.send([task])
    assert await asyncio.to_thread(engines[0].started.wait, seconds(10))
    [answer] = (await answer_for(on_second, cancel(task["taskUUID"])))["data"]
    assert answer == {"taskType": "cancelTask", "taskUUID": task["taskUUID"], "cancelled": True, "status": "error"}
    _, errors = await on_first.items_for(task["taskUUID"], 1)
    assert errors[0]["code"] == "taskCancelled"
    engines[0].release.set()
    await eventually(lambda: not first.runner.running)
    assert engines[0].ran == []
    # Ended now: cancelling again says so; a UUID never used is unknown.
    [again] = (await answer_for(on_second, cancel(task["taskUUID"])))["data"]
    assert (again["cancelled"], again["status"]) == (False, "error")
    unknown = await answer_for(on_second, cancel(new_uuid()))
    assert unknown["errors"][0]["code"] == "taskNotFound"
    [shown] = (await answer_for(on_second, get_response(task["taskUUID"])))["errors"]
    assert shown["code"] == "taskCancelled"
    await on_first.close()
    await on_second.close()


async def test_a_session_resumes_on_another_server_with_results_finished_after_its_socket_closed(
        start_server, redis_url: str) -> None:
    (engine, _), (first, second) = await two_servers(start_server, redis_url)
    on_first = await Wire.open(first.url)
    task = inference(seed=21, numberResults=2)
    await on_first.send([task])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    await on_first.close()
    engine.release.set()
    await eventually(lambda: not first.runner.running)  # finished with no socket anywhere
    resumed = await Wire.open(second.url, session=on_first.session)
    assert resumed.session == on_first.session
    data, errors = await resumed.items_for(task["taskUUID"], 2)
    assert sorted(item["seed"] for item in data) == [21, 22] and not errors
    await resumed.close()
    # Another key cannot take the session over, on either server.
    intruder_server = await start_server(engine_factory=lambda: HeldEngine(released=True), state=redis_url,
                                         api_keys=(API_KEY, "other-key"))
    intruder = await Wire.open(intruder_server.url, api_key="other-key", session=on_first.session)
    assert intruder.session != on_first.session
    await intruder.close()


async def test_frames_of_a_task_running_on_one_server_reach_the_socket_resumed_on_another(
        start_server, redis_url: str) -> None:
    (engine, later), (first, second) = await two_servers(start_server, redis_url)
    later.release.set()
    on_first = await Wire.open(first.url)
    task = inference(seed=8)
    await on_first.send([task])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    await on_first.close()
    resumed = await Wire.open(second.url, session=on_first.session)
    await asyncio.sleep(seconds(0.2))  # resumed while the task still runs on the first server
    engine.release.set()
    data, errors = await resumed.items_for(task["taskUUID"], 1)
    assert data[0]["seed"] == 8 and not errors
    # New tasks on the resumed socket run on the second server and answer there.
    assert (await resumed.run(inference(seed=9)))[0]["seed"] == 9
    await resumed.close()


async def test_the_outbox_in_redis_keeps_only_the_newest_frames_past_its_bound(
        start_server, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Smaller than any frame: the newest frame alone is kept.
    monkeypatch.setattr(server_app, "MAX_OUTBOX_BYTES", 1)
    (engine, _), (first, second) = await two_servers(start_server, redis_url)
    on_first = await Wire.open(first.url)
    task = inference(numberResults=3, outputType="base64Data", seed=30)
    await on_first.send([task])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    await on_first.close()
    engine.release.set()
    await eventually(lambda: not first.runner.running)
    import redis

    client = redis.Redis.from_url(redis_url)
    outbox = f"imagewire:session:{on_first.session}:outbox"
    assert client.llen(outbox) == 1
    assert int(client.get(f"{outbox}-bytes") or 0) == len(client.lindex(outbox, 0) or b"")
    assert 0 < client.pttl(outbox) <= first.config.resume_window * 1000
    client.close()
    resumed = await Wire.open(second.url, session=on_first.session)
    data, _ = await resumed.items_for(task["taskUUID"], 1)
    assert len(data) == 1 and data[0]["seed"] in (30, 31, 32)
    with pytest.raises(TimeoutError):
        await resumed.receive(timeout=seconds(0.5))  # the older two were let go
    await resumed.close()


async def test_when_redis_goes_away_running_tasks_deliver_and_new_ones_fail_clearly(
        start_server, tmp_path: Path, redis_executable: str) -> None:
    own_redis = RedisProcess(redis_executable, tmp_path)  # this test's own, to stop
    try:
        server, wire = await _running_tasks_outlive_redis(start_server, own_redis)
    finally:
        own_redis.stop()
    # Redis back (empty: it kept nothing): the same server serves new tasks again, without a restart.
    back = RedisProcess(redis_executable, tmp_path, port=own_redis.port)
    try:
        async def serves() -> list[dict] | None:
            task = inference(seed=13)
            await wire.send([task])
            data, errors = await wire.items_for(task["taskUUID"], 1)
            return data if not errors else None

        assert (await eventually(serves))[0]["seed"] == 13
        await wire.close()
    finally:
        back.stop()


async def _running_tasks_outlive_redis(start_server, own_redis: RedisProcess) -> tuple:
    engine = HeldEngine(step_first=True)
    server = await start_server(engine_factory=lambda: engine, state=own_redis.url)
    wire = await Wire.open(server.url)
    task = inference(seed=12)
    await wire.send([task])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    own_redis.stop()
    engine.release.set()
    data, errors = await wire.items_for(task["taskUUID"], 1)
    assert data[0]["seed"] == 12 and not errors
    error = await wire.error(inference())
    assert error["code"] == "serviceUnavailable" and "Redis" in error["message"]
    answer = await answer_for(wire, get_response(task["taskUUID"]))
    assert answer["errors"][0]["code"] == "serviceUnavailable"
    # Pings need no Redis; a new socket is told why it cannot authenticate.
    await wire.send([{"taskType": "ping", "ping": True}])
    assert (await wire.receive())["data"][0].get("pong") is True
    refused = await Wire.open(server.url, api_key=None)
    await refused.send([{"taskType": "authentication", "apiKey": API_KEY}])
    message = await refused.receive()
    assert message["errors"][0]["code"] == "serviceUnavailable" and "data" not in message
    await refused.close()
    return server, wire


@pytest.mark.usefixtures("redis_executable")
def test_the_server_does_not_start_without_redis(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"redis://:secret@127.0.0.1:{port}/0"
    result = subprocess.run(
        [sys.executable, "-m", "imagewire.server", "--port", "0", "--data-dir", str(tmp_path), "--api-key", API_KEY,
         "--state", url], capture_output=True, text=True, timeout=seconds(120))
    assert result.returncode == 2
    # The line that says the server is starting, then the one that says why it does not.
    [starting, line] = result.stderr.strip().splitlines()
    assert " starting: " in starting
    assert line.startswith(f"imagewire-server: error: --state redis://:***@127.0.0.1:{port}/0: cannot reach Redis (")
    assert "Connection refused" in line and "secret" not in line
