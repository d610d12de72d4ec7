from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from imagewire.storage import store as store_module
from imagewire.storage.errors import ImageNotStored, InputRejected, StoreFailed
from imagewire.storage.store import ImageStore, Limits, canonical_uuid
from imagewire.tasks.errors import ImageNotFound, InvalidParameter, StorageError, TaskError
from imagewire.tasks.inputs import task_error

OWNER = "owner-a"


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


async def test_put_get_read_roundtrip(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    stored = await store.put(b"\x89PNG fake bytes", extension="png", owner=OWNER)

    assert uuid.UUID(stored.uuid).version == 4
    assert stored.uuid == str(uuid.UUID(stored.uuid))
    assert (stored.extension, stored.content_type, stored.owner, stored.size) == ("png", "image/png", OWNER, 15)
    assert stored.path == tmp_path / "images" / stored.uuid[:2] / f"{stored.uuid}.png"

    fetched = await store.get(stored.uuid, owner=OWNER)
    assert fetched == stored
    assert await store.read(fetched) == b"\x89PNG fake bytes"


async def test_metadata_is_written_next_to_the_data(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    stored = await store.put(b"jpeg", extension="jpg", owner=OWNER)
    metadata = json.loads((tmp_path / stored.uuid[:2] / f"{stored.uuid}.json").read_text())
    assert metadata["uuid"] == stored.uuid
    assert metadata["extension"] == "jpg"
    assert metadata["content_type"] == "image/jpeg"
    assert metadata["owner"] == OWNER
    assert metadata["size"] == 4
    assert metadata["created"] == metadata["last_used"] > 0


async def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    images = [await store.put(bytes([n]) * 100, extension="webp", owner=OWNER) for n in range(5)]
    expected = sorted([image.path for image in images] + [image.path.with_suffix(".json") for image in images])
    assert files_under(tmp_path) == expected


async def test_leftovers_of_interrupted_writes_are_removed_at_start(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    kept = await store.put(b"kept", extension="png", owner=OWNER)
    shard = tmp_path / kept.uuid[:2]
    temporary = shard / f".{kept.uuid}.png.0123456789ab.tmp"
    temporary.write_bytes(b"half")
    orphan_uuid = str(uuid.uuid4())
    (tmp_path / orphan_uuid[:2]).mkdir(exist_ok=True)
    orphan = tmp_path / orphan_uuid[:2] / f"{orphan_uuid}.png"  # data whose metadata never came
    orphan.write_bytes(b"orphan")
    foreign = tmp_path / "notes.txt"  # not a name this store writes: left alone
    foreign.write_text("keep me")

    ImageStore(tmp_path)

    assert not temporary.exists()
    assert not orphan.exists()
    assert foreign.exists()
    assert kept.path.exists()
    assert await store.read(await store.get(kept.uuid, owner=OWNER)) == b"kept"


async def test_data_without_metadata_is_not_served(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    stored = await store.put(b"data", extension="png", owner=OWNER)
    stored.path.with_suffix(".json").unlink()
    with pytest.raises(ImageNotStored) as caught:
        await store.get(stored.uuid, owner=OWNER)
    error = task_error(caught.value, "imageUUID")
    assert isinstance(error, ImageNotFound)
    assert error.code == "imageNotFound"
    assert error.parameter == "imageUUID"


async def test_metadata_without_data_is_not_served(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    stored = await store.put(b"data", extension="png", owner=OWNER)
    stored.path.unlink()
    with pytest.raises(ImageNotStored):
        await store.get(stored.uuid, owner=OWNER)


async def test_uppercase_uuid_is_accepted(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    stored = await store.put(b"data", extension="png", owner=OWNER)
    assert (await store.get(stored.uuid.upper(), owner=OWNER)).uuid == stored.uuid


@pytest.mark.parametrize(
    "text",
    [
        "../x",
        "../../etc/passwd",
        "",
        "not-a-uuid",
        "{12345678-1234-4234-8234-123456789abc}",
        "urn:uuid:12345678-1234-4234-8234-123456789abc",
        "12345678123442348234123456789abc",
        " 12345678-1234-4234-8234-123456789abc",
        "12345678-1234-4234-8234-123456789abc/../../x",
        "12345678-1234-4234-8234-123456789abc.json",
    ],
)
async def test_non_canonical_uuids_are_refused(tmp_path: Path, text: str) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(InputRejected) as caught:
        await store.get(text, owner=OWNER)
    error = task_error(caught.value, "seedImage")
    assert isinstance(error, InvalidParameter)
    assert error.code == "invalidParameter"
    assert error.parameter == "seedImage"
    assert str(tmp_path) not in error.message


def test_canonical_uuid() -> None:
    text = "12345678-1234-4234-8234-123456789ABC"
    assert canonical_uuid(text) == text.lower()
    assert canonical_uuid("12345678123442348234123456789abc") is None


async def test_another_owners_image_answers_like_a_missing_one(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    stored = await store.put(b"data", extension="png", owner=OWNER)
    missing = str(uuid.uuid4())

    with pytest.raises(ImageNotStored) as wrong_owner_raised:
        await store.get(stored.uuid, owner="owner-b")
    with pytest.raises(ImageNotStored) as absent_raised:
        await store.get(missing, owner=OWNER)

    wrong_owner: TaskError = task_error(wrong_owner_raised.value, "seedImage")
    absent: TaskError = task_error(absent_raised.value, "seedImage")
    assert wrong_owner.code == absent.code == "imageNotFound"
    assert wrong_owner.parameter == absent.parameter == "seedImage"
    assert wrong_owner.message.replace(stored.uuid, "X") == absent.message.replace(missing, "X")


async def test_owner_none_skips_the_owner_check(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    stored = await store.put(b"data", extension="png", owner=OWNER)
    assert (await store.get(stored.uuid, owner=None)).owner == OWNER


async def test_get_refreshes_last_used(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    stored = await store.put(b"data", extension="png", owner=OWNER)
    metadata_path = stored.path.with_suffix(".json")
    metadata = json.loads(metadata_path.read_text())
    metadata["last_used"] = 1000.0
    metadata_path.write_text(json.dumps(metadata))

    await store.get(stored.uuid, owner=OWNER)

    assert json.loads(metadata_path.read_text())["last_used"] > 1000.0


async def test_sweep_deletes_only_images_unused_for_too_long(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    old = await store.put(b"old", extension="png", owner=OWNER)
    fresh = await store.put(b"fresh", extension="jpg", owner=OWNER)
    metadata_path = old.path.with_suffix(".json")
    metadata = json.loads(metadata_path.read_text())
    metadata["last_used"] -= 100
    metadata_path.write_text(json.dumps(metadata))

    assert await store.sweep(max_age_seconds=50) == 1

    assert not old.path.exists()
    assert not metadata_path.exists()
    with pytest.raises(ImageNotStored):
        await store.get(old.uuid, owner=OWNER)
    with pytest.raises(ImageNotStored):
        await store.read(old)
    assert await store.read(await store.get(fresh.uuid, owner=OWNER)) == b"fresh"


async def test_sweep_with_explicit_now(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    stored = await store.put(b"data", extension="png", owner=OWNER)
    assert await store.sweep(max_age_seconds=3600, now=0.0) == 0
    assert await store.sweep(max_age_seconds=3600, now=10.0**12) == 1
    assert files_under(tmp_path) == []
    assert not stored.path.exists()


async def test_disk_errors_become_storage_errors_without_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ImageStore(tmp_path)

    def disk_full(path: Path, data: bytes, **options: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store_module, "_write_atomically", disk_full)
    with pytest.raises(StoreFailed) as caught:
        await store.put(b"data", extension="png", owner=OWNER)
    error = task_error(caught.value, "The result image")
    assert isinstance(error, StorageError)
    assert error.code == "storageError"
    assert error.message == "The result image could not be stored: the server's disk is full."
    assert str(tmp_path) not in error.message


async def test_unknown_extension_is_a_programming_error(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(ValueError):
        await store.put(b"data", extension="exe", owner=OWNER)


async def test_an_interrupted_put_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ImageStore(tmp_path)
    real_replace = store_module.os.replace
    calls: list[str] = []

    def replace_then_fail(source: Path, target: Path) -> None:
        calls.append(str(target))
        if str(target).endswith(".json"):  # the data landed, the metadata does not
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(store_module.os, "replace", replace_then_fail)
    with pytest.raises(StoreFailed):
        await store.put(b"data", extension="png", owner=OWNER)
    monkeypatch.undo()

    assert [Path(call).suffix for call in calls] == [".png", ".json"]
    data_file = Path(calls[0])
    assert data_file.exists()
    assert files_under(tmp_path) == [data_file]  # the temporary metadata was removed
    with pytest.raises(ImageNotStored):
        await store.get(data_file.stem, owner=OWNER)
    ImageStore(tmp_path)
    assert files_under(tmp_path) == []


# ---------------------------------------------------------------- a full or failing disk, bounds


def refuse_writes(monkeypatch: pytest.MonkeyPatch, code: int = errno.ENOSPC) -> None:
    def refuse(path: Path, data: bytes, **options: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(store_module, "_write_atomically", refuse)


async def test_reads_go_on_when_the_disk_refuses_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ImageStore(tmp_path)
    stored = await store.put(b"kept", extension="png", owner=OWNER)
    metadata_path = stored.path.with_suffix(".json")
    metadata = json.loads(metadata_path.read_text())
    metadata["last_used"] -= 1000  # its use is due to be noted on the next read
    metadata_path.write_text(json.dumps(metadata))
    for code in (errno.ENOSPC, errno.EROFS):
        with monkeypatch.context() as patch:
            refuse_writes(patch, code)
            assert await store.read(await store.get(stored.uuid, owner=OWNER)) == b"kept"
            with pytest.raises(StoreFailed):
                await store.put(b"new", extension="png", owner=OWNER)
    # The use the disk refused is remembered: the sweep does not take the image for unused, and writes it.
    assert await store.sweep(max_age_seconds=500) == 0
    assert json.loads(metadata_path.read_text())["last_used"] > metadata["last_used"] + 900
    # Once the disk takes writes again, everything works as before.
    assert await store.put(b"new", extension="png", owner=OWNER)


async def test_the_store_and_each_owner_are_held_to_their_bounds(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, Limits(max_bytes=100, max_bytes_per_owner=60))
    await store.put(b"x" * 50, extension="png", owner="a")
    with pytest.raises(StoreFailed, match="this API key's images take"):
        await store.put(b"x" * 20, extension="png", owner="a")
    await store.put(b"x" * 40, extension="png", owner="b")
    with pytest.raises(StoreFailed, match="image storage is full"):
        await store.put(b"x" * 20, extension="png", owner="c")
    assert (store.used_bytes, store.used_by("a"), store.used_by("b")) == (90, 50, 40)
    # Counted again at start, and given back as images expire.
    reopened = ImageStore(tmp_path, Limits(max_bytes=100))
    assert (reopened.used_bytes, reopened.used_by("a")) == (90, 50)
    await reopened.sweep(max_age_seconds=0, now=time.time() + 10)
    assert reopened.used_bytes == 0 and reopened.used_by("a") == 0


async def test_writes_stop_above_the_free_space_floor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ImageStore(tmp_path, Limits(min_free_bytes=10 * 1024 ** 3))
    roomy = shutil.disk_usage(tmp_path).free > 11 * 1024 ** 3
    stored = await store.put(b"kept", extension="png", owner=OWNER) if roomy else None
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 99, 1))
    with pytest.raises(StoreFailed, match="nearly full"):
        await store.put(b"new", extension="png", owner=OWNER)
    if stored is not None:
        assert await store.read(await store.get(stored.uuid, owner=OWNER)) == b"kept"


async def test_each_write_reaches_the_disk_before_it_is_visible(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = ImageStore(tmp_path)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(store_module.os, "fsync",
                        lambda descriptor: (synced.append(descriptor), real_fsync(descriptor)))
    await store.put(b"data", extension="png", owner=OWNER)
    # The data file, the metadata file, and their directory once for both renames.
    assert len(synced) == 3


async def test_a_disk_that_fails_a_read_is_named_as_a_read_of_that_input(tmp_path: Path, monkeypatch) -> None:
    store = ImageStore(tmp_path)
    stored = await store.put(b"data", extension="png", owner=OWNER)

    def failing(self: ImageStore, image_uuid: str, owner: str | None) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ImageStore, "_load_and_touch", failing)
    with pytest.raises(StoreFailed) as caught:
        await store.get(stored.uuid, owner=OWNER)
    error = task_error(caught.value, "seedImage")
    assert error.message == "seedImage could not be read: the server's image storage failed (Input/output error)."


# ---------------------------------------------------------------- a time to live (a task's ttl)


def expiring_entries(root: Path) -> list[str]:
    folder = root / store_module.EXPIRING_FOLDER
    return sorted(os.listdir(folder)) if folder.exists() else []


async def test_an_image_with_a_ttl_is_deleted_when_it_is_over_and_not_before(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    before = time.time()
    short = await store.put(b"s" * 10, extension="png", owner=OWNER, ttl=60)
    kept = await store.put(b"k" * 20, extension="jpg", owner=OWNER)
    assert short.expires is not None and before + 60 <= short.expires <= time.time() + 60
    assert json.loads(short.path.with_suffix(".json").read_text())["expires"] == short.expires
    [entry] = expiring_entries(tmp_path)
    assert entry.endswith(f"-{short.uuid}.png")
    assert store.used_bytes == 30

    assert await store.expire(now=short.expires - 1) == 0  # a second early: still there, still served
    assert await store.read(await store.get(short.uuid, owner=OWNER)) == b"s" * 10

    assert await store.expire(now=short.expires + 1) == 1
    assert not short.path.exists() and not short.path.with_suffix(".json").exists()
    assert expiring_entries(tmp_path) == []
    assert store.used_bytes == 20
    with pytest.raises(ImageNotStored):
        await store.get(short.uuid, owner=OWNER)
    assert await store.read(await store.get(kept.uuid, owner=OWNER)) == b"k" * 20  # no ttl: kept


async def test_an_image_past_its_ttl_is_not_served_even_before_it_is_deleted(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    stored = await store.put(b"x", extension="png", owner=OWNER, ttl=60)
    assert stored.path is not None
    metadata_path = stored.path.with_suffix(".json")
    metadata = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**metadata, "expires": time.time() - 1}))
    with pytest.raises(ImageNotStored):
        await store.get(stored.uuid, owner=None)
    assert stored.path.exists()  # the data waits for the next expiry pass, unseen


async def test_the_sweep_deletes_an_expired_image_whose_expiry_entry_was_lost(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    stored = await store.put(b"x", extension="png", owner=OWNER, ttl=60)
    assert stored.expires is not None
    shutil.rmtree(tmp_path / store_module.EXPIRING_FOLDER)
    assert await store.expire(now=stored.expires + 1) == 0
    assert await store.sweep(max_age_seconds=86400, now=stored.expires + 1) == 1
    assert files_under(tmp_path) == []


async def test_an_expiry_entry_whose_image_never_came_is_dropped(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = ImageStore(tmp_path)
    # The entry stays for a moment after an interrupted put too, and the expiry pass drops it alone.
    stale = f"{int((time.time() - 5) * 1000):015d}-{uuid.uuid4()}.png"
    (tmp_path / store_module.EXPIRING_FOLDER).mkdir()
    (tmp_path / store_module.EXPIRING_FOLDER / stale).touch()
    refuse_writes(monkeypatch, errno.EIO)
    with pytest.raises(StoreFailed):
        await store.put(b"x", extension="png", owner=OWNER, ttl=60)
    monkeypatch.undo()
    assert expiring_entries(tmp_path) == [stale]  # the failed put took its own entry back
    assert await store.expire() == 0
    assert expiring_entries(tmp_path) == []


async def test_no_other_process_stores_on_local_disk_and_a_record_adopted_counts_as_a_write(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, Limits(max_bytes=100, max_bytes_per_owner=60))
    # Another machine cannot reach this disk: every image is stored by this process.
    assert store.shared_write("a") is None
    written = await ImageStore(tmp_path / "elsewhere").put(b"a" * 55, extension="png", owner="a")
    store.adopt(written)
    assert (store.used_bytes, store.used_by("a")) == (55, 55)
    with pytest.raises(StoreFailed, match="this API key's images take"):
        await store.put(b"b" * 6, extension="png", owner="a")
    assert [image.uuid for image in await store.recent("a", 10)] == []  # its bytes are not on this store's disk
