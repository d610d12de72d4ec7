"""ttl: a task's result images are served for that many seconds and deleted after, from local disk and from an
S3 bucket alike, and getResponse stops handing out their results when they expire."""

from __future__ import annotations

import asyncio
import time
import types
import urllib.error
import urllib.request

import pytest

from imagewire.storage import s3 as s3_module
from imagewire.storage import store as store_module
from imagewire.tasks import get_response
from tests.engines import HeldEngine
from tests.server.test_tools_end_to_end import encoded, picture
from tests.timing import seconds
from tests.wire import Wire, eventually, inference, new_uuid

REAL_TIME = time.time


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=seconds(10)) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def move_clock(monkeypatch: pytest.MonkeyPatch, ahead: float, *modules: types.ModuleType) -> None:
    """The wall clock of ``modules``, ``ahead`` seconds on (the event loop's own clock is left alone)."""
    later = types.SimpleNamespace(time=lambda: REAL_TIME() + ahead)
    for module in modules:
        monkeypatch.setattr(module, "time", later)


async def test_a_ttl_out_of_range_names_ttl_the_range_and_the_value(start_server):
    server = await start_server(engine_factory=lambda: HeldEngine(released=True), image_ttl=2 * 86400)
    wire = await Wire.open(server.url)
    short = await wire.error(inference(ttl=59))
    assert (short["code"], short["parameter"]) == ("invalidParameter", "ttl")
    assert "from 60 to 172800 seconds" in short["message"] and "received 59" in short["message"]
    long = await wire.error(inference(ttl=2 * 86400 + 1))
    assert (long["code"], long["parameter"]) == ("invalidParameter", "ttl")
    assert "from 60 to 172800" in long["message"] and "received 172801" in long["message"]
    image = encoded(picture((64, 64)))
    for task in ({"taskType": "upscale", "upscaleFactor": 2}, {"taskType": "removeBackground"},
                 {"taskType": "controlNetPreprocess", "preProcessorType": "canny"}):
        error = await wire.error({**task, "taskUUID": new_uuid(), "inputImage": image, "ttl": 30})
        assert (error["code"], error["parameter"]) == ("invalidParameter", "ttl"), task
        assert "from 60 to 172800 seconds" in error["message"] and "received 30" in error["message"]
    wrong_type = await wire.error(inference(ttl="an hour"))
    assert (wrong_type["parameter"], wrong_type["type"]) == ("ttl", "integer")
    assert "received 'an hour'" in wrong_type["message"]
    [longest] = await wire.run(inference(ttl=2 * 86400))  # the bounds themselves are allowed
    assert longest["imageUUID"]
    await wire.close()


async def test_images_with_a_ttl_are_deleted_when_it_ends(start_server, monkeypatch):
    server = await start_server(engine_factory=lambda: HeldEngine(released=True))
    wire = await Wire.open(server.url)
    [short] = await wire.run(inference(ttl=60, outputType="URL"))
    [kept] = await wire.run(inference(outputType="URL"))
    [guide] = await wire.run({"taskType": "controlNetPreprocess", "taskUUID": new_uuid(), "ttl": 60,
                              "inputImage": encoded(picture((64, 64))), "preProcessorType": "canny"})
    root = server.store.root
    short_path = root / short["imageUUID"][:2] / f"{short['imageUUID']}.png"
    assert short_path.exists() and await asyncio.to_thread(status_of, short["imageURL"]) == 200
    await server.sweep(store=False)  # not yet due
    assert short_path.exists()

    move_clock(monkeypatch, 61, store_module)
    await server.sweep(store=False)  # the server's 30 s round, not the hourly walk over every image
    assert not short_path.exists() and not short_path.with_suffix(".json").exists()
    assert not list(root.rglob(f"{guide['guideImageUUID']}*"))
    assert await asyncio.to_thread(status_of, short["imageURL"]) == 404
    assert await asyncio.to_thread(status_of, kept["imageURL"]) == 200
    error = await wire.error(inference(seedImage=short["imageUUID"]))
    assert (error["code"], error["parameter"]) == ("imageNotFound", "seedImage")
    await wire.close()


async def test_images_with_a_ttl_are_deleted_from_the_bucket(start_server, monkeypatch, s3_endpoint, s3_bucket):
    server = await start_server(store=f"s3://{s3_bucket}/ttl", s3_endpoint=s3_endpoint,
                                engine_factory=lambda: HeldEngine(released=True))
    wire = await Wire.open(server.url)
    [short] = await wire.run(inference(ttl=60, outputType="URL"))
    [kept] = await wire.run(inference(outputType="URL"))

    def keys() -> list[str]:
        import boto3

        listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=s3_bucket, Prefix="ttl/")
        return [entry["Key"] for entry in listed.get("Contents", [])]

    assert any(short["imageUUID"] in key for key in await asyncio.to_thread(keys))
    move_clock(monkeypatch, 61, store_module, s3_module)
    await server.sweep(store=False)
    left = await asyncio.to_thread(keys)
    assert not any(short["imageUUID"] in key for key in left)
    assert f"ttl/images/{kept['imageUUID']}.png" in left
    assert await asyncio.to_thread(status_of, short["imageURL"]) == 404
    assert await asyncio.to_thread(status_of, kept["imageURL"]) == 200
    await wire.close()


async def test_get_response_stops_answering_results_whose_ttl_ended(start_server, monkeypatch):
    server = await start_server(engine_factory=lambda: HeldEngine(released=True))
    wire = await Wire.open(server.url)
    task = inference(ttl=60, deliveryMethod="async")
    await wire.send([task])
    await wire.receive()  # acknowledgement
    await eventually(lambda: not server.runner.running)
    asking = await Wire.open(server.url)
    await asking.send([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
    answer = await asking.receive()
    [result] = answer["data"]
    assert result["status"] == "success" and result["imageUUID"]

    monkeypatch.setattr(get_response, "now", lambda: REAL_TIME() + 61)
    await asking.send([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
    answer = await asking.receive()
    [error] = answer["errors"]
    assert (error["code"], error["parameter"]) == ("taskNotFound", "taskUUID")
    assert "expired" in error["message"] and "ttl" in error["message"]
    await asking.close()
    await wire.close()


async def test_with_shared_state_the_other_server_knows_the_results_expired(start_server, monkeypatch, redis_url,
                                                                            s3_endpoint, s3_bucket):
    shared = {"state": redis_url, "store": f"s3://{s3_bucket}/ttl", "s3_endpoint": s3_endpoint,
              "engine_factory": lambda: HeldEngine(released=True)}
    first, second = await start_server(**shared), await start_server(**shared)
    on_first, on_second = await Wire.open(first.url), await Wire.open(second.url)
    task = inference(ttl=60)
    [item] = await on_first.run(task)

    async def answer() -> dict:
        await on_second.send([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
        return await on_second.receive()

    async def recorded() -> dict | None:  # the result is sent just before the task's end is recorded
        answered = await answer()
        return answered if [kept.get("status") for kept in answered.get("data", [])] == ["success"] else None

    assert (await eventually(recorded))["data"][0]["imageUUID"] == item["imageUUID"]
    monkeypatch.setattr(get_response, "now", lambda: REAL_TIME() + 61)
    [error] = (await answer())["errors"]
    assert error["code"] == "taskNotFound" and "expired" in error["message"]
    # The image goes from the bucket by the other server's sweep as well.
    move_clock(monkeypatch, 61, store_module, s3_module)
    await second.sweep(store=False)
    assert await asyncio.to_thread(status_of, item["imageURL"]) == 404
    await on_first.close()
    await on_second.close()
