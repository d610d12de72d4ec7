"""The socket contract of PROTOCOL.md §1–4 and §9, against a real server."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest

from tests.timing import seconds
from tests.wire import Wire, inference, new_uuid


async def test_authentication_reply_has_exactly_the_documented_shape(server):
    wire = await Wire.open(server.url, api_key=None)
    await wire.send([{"taskType": "authentication", "apiKey": "test-key"}])
    reply = await wire.receive()
    assert list(reply) == ["data"]
    assert set(reply["data"][0]) == {"taskType", "connectionSessionUUID"}
    assert reply["data"][0]["taskType"] == "authentication"
    await wire.close()


async def test_a_wrong_key_is_answered_as_an_authentication_error_and_the_socket_stays(server):
    wire = await Wire.open(server.url, api_key=None)
    await wire.send([{"taskType": "authentication", "apiKey": "nope"}])
    error = (await wire.receive())["errors"][0]
    assert error["code"] == "invalidApiKey"
    assert error["taskType"] == "authentication"
    assert error["parameter"] == "apiKey"
    await wire.send([{"taskType": "ping", "ping": True}])
    assert (await wire.receive())["data"][0]["pong"] is True
    await wire.close()


async def test_tasks_before_authentication_get_missing_api_key_with_their_uuid(server):
    wire = await Wire.open(server.url, api_key=None)
    # Valid or not: before authentication the answer is missingApiKey, whatever else is wrong.
    for task in (inference(), inference(width=4096, frobnicate=1)):
        await wire.send([task])
        error = (await wire.receive())["errors"][0]
        assert (error["code"], error["taskUUID"], error["taskType"]) == ("missingApiKey", task["taskUUID"],
                                                                          "imageInference")
    await wire.close()


async def test_ping_is_answered_with_pong_as_first_data_item(server):
    wire = await Wire.open(server.url)
    await wire.send([{"taskType": "ping", "ping": True}])
    assert (await wire.receive()) == {"data": [{"taskType": "ping", "pong": True}]}
    await wire.close()


@pytest.mark.parametrize("frame", ["not json", '{"taskType":"ping"}', "[1,", '"text"'])
async def test_a_malformed_frame_gets_one_error_and_the_connection_stays_open(server, frame):
    wire = await Wire.open(server.url)
    await wire.send(frame)
    message = await wire.receive()
    assert len(message["errors"]) == 1
    assert "JSON array" in message["errors"][0]["message"]
    await wire.send([{"taskType": "ping", "ping": True}])
    assert (await wire.receive())["data"][0]["pong"] is True
    await wire.close()


async def test_each_task_of_a_message_is_answered_on_its_own(server):
    wire = await Wire.open(server.url)
    good, bad = inference(), inference(steps=0)
    unknown_type = {"taskType": "vectorize", "taskUUID": new_uuid()}
    await wire.send([bad, good, unknown_type])
    answers = await wire.answers({task["taskUUID"]: 1 for task in (bad, good, unknown_type)})
    _, bad_errors = answers[bad["taskUUID"]]
    assert bad_errors[0]["code"] == "invalidParameter" and bad_errors[0]["parameter"] == "steps"
    _, caption_errors = answers[unknown_type["taskUUID"]]
    assert caption_errors[0]["code"] == "unsupportedTaskType"
    data, errors = answers[good["taskUUID"]]
    assert not errors and data[0]["imageUUID"]
    await wire.close()


async def test_frames_far_above_one_mebibyte_are_accepted(server):
    wire = await Wire.open(server.url)
    padding = "x" * (3 * 1024 * 1024)
    error = await wire.error({"taskType": "imageUpload", "image": padding})
    # The frame was read (no close); the payload itself is simply not an image.
    assert error["parameter"] == "image"
    await wire.close()


async def test_a_reused_task_uuid_is_refused_and_runs_once(server):
    wire = await Wire.open(server.url)
    task = inference()
    first = await wire.run(dict(task))
    error = await wire.error(dict(task))
    assert error["code"] == "conflictTaskUUID" and error["taskUUID"] == task["taskUUID"]
    assert len(first) == 1
    await wire.close()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=seconds(5)) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


async def test_http_serves_only_stored_images(server):
    base = server.config.base_url
    for path in ("/image/not-a-uuid.png", f"/image/{new_uuid()}.png", "/etc/passwd", "/image/../api-key"):
        # The server shares this event loop: blocking HTTP calls go to a thread.
        assert await asyncio.to_thread(http_status, base + path) == 404, path
    assert await asyncio.to_thread(http_status, base + "/health") == 200


async def test_model_search_lists_the_catalog_with_the_fields_clients_read(server):
    wire = await Wire.open(server.url)
    [result] = await wire.run({"taskType": "modelSearch", "search": "tiny"})
    assert result["totalResults"] >= 1
    model = result["results"][0]
    for field in ("air", "name", "version", "category", "architecture", "tags", "private", "defaultWidth",
                  "defaultHeight", "defaultSteps", "defaultScheduler", "defaultCFG", "defaultStrength"):
        assert field in model, field
    assert model["air"] == "imagewire:tiny@1" and model["private"] is False
    [everything] = await wire.run({"taskType": "modelSearch", "limit": 100})
    airs = {m["air"] for m in everything["results"]}
    assert {"imagewire:sd15@1", "imagewire:sdxl-base@1"} <= airs
    [public] = await wire.run({"taskType": "modelSearch", "limit": 100, "visibility": "public"})
    assert public["totalResults"] == everything["totalResults"]
    [private] = await wire.run({"taskType": "modelSearch", "visibility": "private"})
    assert (private["totalResults"], private["results"]) == (0, [])
    await wire.close()
