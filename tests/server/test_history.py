"""imageHistory: an API key's newest images, newest first, and no other key's."""

from __future__ import annotations

from tests.wire import Wire, inference, new_uuid


async def test_a_key_sees_its_own_newest_images_only(start_server):
    server = await start_server(api_keys=("key-a", "key-b"))
    owner, other = await Wire.open(server.url, api_key="key-a"), await Wire.open(server.url, api_key="key-b")
    first = (await owner.run(inference(seed=1)))[0]
    second = (await owner.run(inference(seed=2)))[0]
    [history] = await owner.run({"taskType": "imageHistory", "taskUUID": new_uuid(), "limit": 10})
    assert [image["imageUUID"] for image in history["images"]] == [second["imageUUID"], first["imageUUID"]]
    assert history["images"][0]["imageURL"] == second["imageURL"]
    [limited] = await owner.run({"taskType": "imageHistory", "taskUUID": new_uuid(), "limit": 1})
    assert [image["imageUUID"] for image in limited["images"]] == [second["imageUUID"]]
    [nothing] = await other.run({"taskType": "imageHistory", "taskUUID": new_uuid()})
    assert nothing["images"] == []
    await owner.close()
    await other.close()
