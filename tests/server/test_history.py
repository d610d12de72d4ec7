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


async def test_a_store_that_fails_to_list_is_a_storage_error_naming_no_parameter(start_server, monkeypatch):
    from imagewire.storage.errors import StoreFailed

    server = await start_server()

    async def failing(owner: str, limit: int) -> list:
        raise StoreFailed("the disk answered EIO", reading=True)

    monkeypatch.setattr(server.store, "recent", failing)
    wire = await Wire.open(server.url)
    error = await wire.error({"taskType": "imageHistory", "taskUUID": new_uuid(), "limit": 3})
    assert error["code"] == "storageError" and "parameter" not in error
    assert "image history could not be read: the disk answered EIO" in error["message"]
    await wire.close()
