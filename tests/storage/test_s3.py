"""The S3 store against moto's S3 server on loopback: the same contract as the local store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
import uuid
from typing import Any

import pytest

from imagewire.storage import s3
from imagewire.storage.errors import ImageNotStored, InputRejected, StoreFailed
from imagewire.storage.s3 import S3Location, S3Store
from imagewire.storage.store import Limits
from imagewire.tasks.errors import ImageNotFound, StorageError
from imagewire.tasks.inputs import task_error
from tests.timing import seconds

OWNER = "owner-a"
PREFIX = "imagewire/images-test"


def open_store(endpoint: str, bucket: str, limits: Limits | None = None) -> S3Store:
    return S3Store(S3Location.parse(f"s3://{bucket}/{PREFIX}"), endpoint_url=endpoint, limits=limits)


def objects(store: S3Store) -> dict[str, dict[str, Any]]:
    """Every object under the store's prefix: key → its head."""
    client, bucket = store._client, store.location.bucket
    listed = client.list_objects_v2(Bucket=bucket, Prefix=store.location.prefix).get("Contents", [])
    return {entry["Key"]: client.head_object(Bucket=bucket, Key=entry["Key"]) for entry in listed}


def metadata_of(store: S3Store, image_uuid: str) -> dict[str, Any]:
    body = store._client.get_object(Bucket=store.location.bucket, Key=f"{PREFIX}/meta/{image_uuid}.json")["Body"]
    with body:
        loaded: dict[str, Any] = json.loads(body.read())
    return loaded


def rewrite_metadata(store: S3Store, image_uuid: str, **fields: Any) -> None:
    metadata = metadata_of(store, image_uuid) | fields
    store._client.put_object(Bucket=store.location.bucket, Key=f"{PREFIX}/meta/{image_uuid}.json",
                             Body=json.dumps(metadata).encode())


def test_locations_parse_and_refuse_what_is_not_a_bucket() -> None:
    assert S3Location.parse("s3://images") == S3Location("images", "")
    assert S3Location.parse("s3://images/a/b/") == S3Location("images", "a/b/")
    assert str(S3Location.parse("s3://images/a/b/")) == "s3://images/a/b"
    for text in ("images", "s3://", "s3://Upper", "s3://a", "file:///tmp", "s3://bad_name/x"):
        with pytest.raises(ValueError):
            S3Location.parse(text)


async def test_put_get_read_roundtrip_with_data_before_metadata(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_store(s3_endpoint, s3_bucket)
    stored = await store.put(b"\x89PNG fake bytes", extension="png", owner=OWNER)

    assert uuid.UUID(stored.uuid).version == 4
    assert (stored.extension, stored.content_type, stored.owner, stored.size, stored.path) == (
        "png", "image/png", OWNER, 15, None)
    found = objects(store)
    data_key, metadata_key = f"{PREFIX}/images/{stored.uuid}.png", f"{PREFIX}/meta/{stored.uuid}.json"
    [history_key] = set(found) - {data_key, metadata_key}
    assert history_key.startswith(f"{PREFIX}/owners/{OWNER}/") and history_key.endswith(f"-{stored.uuid}-15.png")
    assert found[history_key]["ContentLength"] == 0
    assert found[data_key]["ContentType"] == "image/png"
    # The data is put first: its metadata, which makes it visible, is never older.
    assert found[data_key]["LastModified"] <= found[metadata_key]["LastModified"]
    metadata = metadata_of(store, stored.uuid)
    assert {key: metadata[key] for key in ("uuid", "extension", "content_type", "owner", "size")} == {
        "uuid": stored.uuid, "extension": "png", "content_type": "image/png", "owner": OWNER, "size": 15}

    fetched = await store.get(stored.uuid.upper(), owner=OWNER)
    assert fetched == stored
    assert await store.read(fetched) == b"\x89PNG fake bytes"
    assert await store.recent(OWNER, 10) == [stored]


async def test_another_owners_image_answers_like_a_missing_one(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_store(s3_endpoint, s3_bucket)
    stored = await store.put(b"x", extension="webp", owner=OWNER)
    with pytest.raises(ImageNotStored) as stranger:
        await store.get(stored.uuid, owner="owner-b")
    missing = str(uuid.uuid4())
    with pytest.raises(ImageNotStored) as absent:
        await store.get(missing, owner="owner-b")
    assert str(stranger.value).replace(stored.uuid, missing) == str(absent.value)
    assert isinstance(task_error(stranger.value, "seedImage"), ImageNotFound)
    assert (await store.get(stored.uuid, owner=None)).owner == OWNER  # imageURLs: whoever holds them
    with pytest.raises(InputRejected, match="must be a UUID"):
        await store.get("../../etc/passwd", owner=OWNER)


async def test_only_images_with_metadata_are_served(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_store(s3_endpoint, s3_bucket)
    half = str(uuid.uuid4())
    store._client.put_object(Bucket=s3_bucket, Key=f"{PREFIX}/images/{half}.png", Body=b"data, no metadata")
    with pytest.raises(ImageNotStored):
        await store.get(half, owner=OWNER)
    # Metadata whose data is gone (swept between the two reads): reading it is a missing image, not a failure.
    stored = await store.put(b"y", extension="png", owner=OWNER)
    store._client.delete_object(Bucket=s3_bucket, Key=f"{PREFIX}/images/{stored.uuid}.png")
    with pytest.raises(ImageNotStored):
        await store.read(await store.get(stored.uuid, owner=OWNER))


async def test_a_put_whose_metadata_fails_leaves_nothing_visible(s3_endpoint: str, s3_bucket: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError

    store = open_store(s3_endpoint, s3_bucket)

    def refuse(metadata: dict[str, Any]) -> None:
        raise ClientError({"Error": {"Code": "SlowDown", "Message": "at http://internal:9000/"}}, "PutObject")

    monkeypatch.setattr(store, "_put_metadata", refuse)
    with pytest.raises(StoreFailed) as failed:
        await store.put(b"z", extension="png", owner=OWNER)
    assert failed.value.problem == "the server's image storage failed (SlowDown)"
    assert isinstance(task_error(failed.value, "The result image"), StorageError)
    assert objects(store) == {} and store.used_bytes == 0 and await store.recent(OWNER, 10) == []
    with pytest.raises(StoreFailed):  # with a ttl, its expiry entry goes too
        await store.put(b"z", extension="png", owner=OWNER, ttl=60)
    assert objects(store) == {}


async def test_last_used_is_noted_at_most_once_a_minute(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_store(s3_endpoint, s3_bucket)
    stored = await store.put(b"a", extension="png", owner=OWNER)
    recently = time.time() - 30
    rewrite_metadata(store, stored.uuid, last_used=recently)
    await store.get(stored.uuid, owner=OWNER)
    assert metadata_of(store, stored.uuid)["last_used"] == recently
    rewrite_metadata(store, stored.uuid, last_used=time.time() - 120)
    before = time.time()
    await store.get(stored.uuid, owner=OWNER)
    assert metadata_of(store, stored.uuid)["last_used"] >= before


async def test_reads_go_on_when_noting_uses_fails(s3_endpoint: str, s3_bucket: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError

    store = open_store(s3_endpoint, s3_bucket)
    stored = await store.put(b"b", extension="png", owner=OWNER)
    rewrite_metadata(store, stored.uuid, last_used=time.time() - 10 * 86400)

    def refuse(metadata: dict[str, Any]) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied"}}, "PutObject")

    with monkeypatch.context() as patch:
        patch.setattr(store, "_put_metadata", refuse)
        used = time.time()
        assert await store.read(await store.get(stored.uuid, owner=OWNER)) == b"b"
    # The use counts all the same: a sweep for images unused for a day keeps it, and writes the use down.
    assert await store.sweep(max_age_seconds=86400, now=used + 3600) == 0
    assert metadata_of(store, stored.uuid)["last_used"] >= used


async def test_sweep_deletes_only_images_unused_for_too_long(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_store(s3_endpoint, s3_bucket, Limits(max_bytes=1000))
    kept = await store.put(b"k" * 10, extension="png", owner=OWNER)
    swept = await store.put(b"s" * 20, extension="jpg", owner=OWNER)
    now = time.time() + 10 * 86400
    rewrite_metadata(store, kept.uuid, last_used=now - 3600)  # used an hour before "now"
    assert store.used_bytes == 30

    assert await store.sweep(max_age_seconds=86400, now=now) == 1
    left = {key for key in objects(store) if not key.startswith(f"{PREFIX}/owners/")}
    assert left == {f"{PREFIX}/images/{kept.uuid}.png", f"{PREFIX}/meta/{kept.uuid}.json"}
    # Its history entry went with it.
    assert [image.uuid for image in await store.recent(OWNER, 10)] == [kept.uuid]
    assert len(objects(store)) == 3
    assert store.used_bytes == 10
    with pytest.raises(ImageNotStored):
        await store.get(swept.uuid, owner=OWNER)
    # Nothing is old at the real time.
    assert await store.sweep(max_age_seconds=86400) == 0


async def test_sweep_removes_data_an_interrupted_put_left_once_it_is_old(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_store(s3_endpoint, s3_bucket)
    leftover = f"{PREFIX}/images/{uuid.uuid4()}.png"
    store._client.put_object(Bucket=s3_bucket, Key=leftover, Body=b"never described")
    foreign = f"{PREFIX}/images/notes.txt"
    store._client.put_object(Bucket=s3_bucket, Key=foreign, Body=b"not ours")
    assert await store.sweep(max_age_seconds=86400) == 0
    assert leftover in objects(store)  # young: maybe another server's put in flight
    assert await store.sweep(max_age_seconds=86400, now=time.time() + 2 * 3600) == 0
    assert set(objects(store)) == {foreign}


async def test_the_store_and_each_owner_are_held_to_their_bounds(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_store(s3_endpoint, s3_bucket, Limits(max_bytes=100, max_bytes_per_owner=60))
    await store.put(b"a" * 50, extension="png", owner=OWNER)
    with pytest.raises(StoreFailed, match="this API key's images take") as own:
        await store.put(b"a" * 11, extension="png", owner=OWNER)
    assert own.value.disk_full
    await store.put(b"b" * 50, extension="png", owner="owner-b")
    with pytest.raises(StoreFailed, match="image storage is full"):
        await store.put(b"c", extension="png", owner="owner-c")
    # A server that starts on the same bucket counts what it holds.
    again = open_store(s3_endpoint, s3_bucket, Limits(max_bytes=100, max_bytes_per_owner=60))
    assert (again.used_bytes, again.used_by(OWNER), again.used_by("owner-b")) == (100, 50, 50)
    assert open_store(s3_endpoint, s3_bucket, Limits(max_bytes=100)).used_bytes == 100


async def test_store_failures_are_storage_errors_without_urls_or_credentials(s3_endpoint: str,
                                                                            s3_bucket: str) -> None:
    store = open_store(s3_endpoint, s3_bucket)
    stored = await store.put(b"d", extension="png", owner=OWNER)
    # The bucket goes away under a running server.
    for key in objects(store):
        store._client.delete_object(Bucket=s3_bucket, Key=key)
    store._client.delete_bucket(Bucket=s3_bucket)
    with pytest.raises(StoreFailed) as writing:
        await store.put(b"e", extension="png", owner=OWNER)
    with pytest.raises(StoreFailed) as reading:
        await store.read(stored)
    assert not writing.value.reading and reading.value.reading
    for failure in (writing.value, reading.value):
        message = failure.describe("The result image")
        assert "NoSuchBucket" in message
        for secret in ("127.0.0.1", "http", "test-access-key", "test-secret-key", s3_bucket):
            assert secret not in message


def test_an_unusable_bucket_is_one_clear_start_error(s3_endpoint: str, s3_bucket: str) -> None:
    with pytest.raises(ValueError) as missing:
        S3Store(S3Location.parse("s3://no-such-bucket/x"), endpoint_url=s3_endpoint)
    assert str(missing.value) == (
        f"--store s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist at {s3_endpoint}")
    with pytest.raises(ValueError, match=r"^--store s3://\S+: cannot reach http://127\.0\.0\.1:9$"):
        S3Store(S3Location.parse(f"s3://{s3_bucket}"), endpoint_url="http://127.0.0.1:9/some/path")


def test_without_boto3_the_start_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # what an import finds when the package is absent
    with pytest.raises(ValueError, match=r"^--store s3://images: the S3 store needs boto3; install it with: "
                                         r"pip install 'imagewire\[s3\]'$"):
        S3Store(S3Location.parse("s3://images"))


async def test_an_owners_history_lists_what_every_server_on_the_bucket_stored_newest_first(
        s3_endpoint: str, s3_bucket: str) -> None:
    first, second = open_store(s3_endpoint, s3_bucket), open_store(s3_endpoint, s3_bucket)
    stored = []
    for index in range(5):
        store = (first, second)[index % 2]
        stored.append(await store.put(bytes([index]) * (index + 1), extension=("png", "jpg")[index % 2], owner=OWNER))
        await asyncio.sleep(0.002)  # distinct milliseconds: the order is the order they were stored
    await second.put(b"other", extension="png", owner="owner-b")
    newest_first = list(reversed(stored))
    assert await first.recent(OWNER, 10) == newest_first == await second.recent(OWNER, 10)
    assert await first.recent(OWNER, 2) == newest_first[:2]
    assert [image.owner for image in await first.recent("owner-b", 10)] == ["owner-b"]
    assert await first.recent("owner-c", 10) == []


class FrozenEndpoint:
    """A loopback TCP server that accepts connections and never answers: an S3 endpoint that froze."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self.accepted.append(self.listener.accept()[0])

    def __enter__(self) -> FrozenEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for connection in [*self.accepted, self.listener]:
            connection.close()


async def test_a_frozen_store_fails_a_read_after_its_attempts_within_the_worst_case(
        s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    # The same constants, shortened, so that the worst case takes seconds.
    monkeypatch.setattr(s3, "CONNECT_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(s3, "READ_TIMEOUT_SECONDS", 0.3)
    store = open_store(s3_endpoint, s3_bucket)
    image = await store.put(b"not a real png", extension="png", owner=OWNER)
    with FrozenEndpoint() as frozen:
        store._client = boto3.session.Session().client("s3", endpoint_url=frozen.url,
                                                        config=store._client.meta.config)
        started = time.monotonic()
        with pytest.raises(StoreFailed):
            await store.read(image)
        elapsed = time.monotonic() - started
    assert len(frozen.accepted) == s3.ATTEMPTS  # each attempt waited its read timeout on a connection of its own
    assert s3.ATTEMPTS * s3.READ_TIMEOUT_SECONDS <= elapsed <= s3.worst_case_call_seconds() + seconds(2)


def test_with_the_real_timeouts_a_frozen_store_fails_a_task_well_within_two_minutes() -> None:
    # docs/cluster.md promises two minutes; a fifth of it is kept as margin.
    assert s3.worst_case_task_seconds() <= 0.8 * 120
    assert s3.worst_case_call_seconds() == s3.ATTEMPTS * (s3.CONNECT_TIMEOUT_SECONDS + s3.READ_TIMEOUT_SECONDS) + 3


async def test_an_image_with_a_ttl_is_deleted_when_it_is_over_and_not_before(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_store(s3_endpoint, s3_bucket)
    short = await store.put(b"s" * 10, extension="png", owner=OWNER, ttl=60)
    kept = await store.put(b"k" * 20, extension="jpg", owner=OWNER)
    assert short.expires is not None and metadata_of(store, short.uuid)["expires"] == short.expires
    [entry] = [key for key in objects(store) if key.startswith(f"{PREFIX}/expiring/")]
    assert entry.endswith(f"-{short.uuid}.png")

    assert await store.expire(now=short.expires - 1) == 0
    assert await store.read(await store.get(short.uuid, owner=OWNER)) == b"s" * 10

    # Another server on the bucket (its own memory empty) deletes it just the same.
    other = open_store(s3_endpoint, s3_bucket)
    assert await other.expire(now=short.expires + 1) == 1
    assert not [key for key in objects(store) if short.uuid in key]  # data, metadata, history, expiry entry
    with pytest.raises(ImageNotStored):
        await store.get(short.uuid, owner=OWNER)
    assert await store.read(await store.get(kept.uuid, owner=OWNER)) == b"k" * 20
    assert [image.uuid for image in await store.recent(OWNER, 10)] == [kept.uuid]


async def test_an_image_past_its_ttl_is_not_served_even_before_it_is_deleted(s3_endpoint: str,
                                                                           s3_bucket: str) -> None:
    store = open_store(s3_endpoint, s3_bucket)
    stored = await store.put(b"x", extension="png", owner=OWNER, ttl=60)
    rewrite_metadata(store, stored.uuid, expires=time.time() - 1)
    with pytest.raises(ImageNotStored):
        await store.get(stored.uuid, owner=None)
    assert f"{PREFIX}/images/{stored.uuid}.png" in objects(store)  # deleted by the expiry pass once due
    assert stored.expires is not None and await store.expire(now=stored.expires + 1) == 1
    assert not [key for key in objects(store) if stored.uuid in key]


async def test_another_process_stores_in_the_bucket_within_the_room_this_store_counts(s3_endpoint: str,
                                                                                      s3_bucket: str) -> None:
    bounds = Limits(max_bytes=100, max_bytes_per_owner=60)
    store = open_store(s3_endpoint, s3_bucket, bounds)
    await store.put(b"a" * 50, extension="png", owner=OWNER)
    shared = store.shared_write(OWNER)
    assert (shared.limits, shared.used, shared.used_by_owner) == (bounds, 50, 50)
    # The other process (a Ray replica) opens the same bucket without bounds of its own; it knows it is the same store.
    writer = open_store(s3_endpoint, s3_bucket)
    assert shared.store == writer.address == store.address
    assert S3Store(S3Location.parse(f"s3://{s3_bucket}/elsewhere"), endpoint_url=s3_endpoint).address != shared.store

    # Past a bound it refuses in this store's words, counting what it wrote since.
    shared.check(10)
    with pytest.raises(StoreFailed) as refused:
        shared.check(1, written=10)
    with pytest.raises(StoreFailed) as refused_here:
        await store.put(b"a" * 11, extension="png", owner=OWNER)
    assert refused.value.describe("The result image") == refused_here.value.describe("The result image")
    assert refused.value.disk_full

    record = await writer.put(b"b" * 10, extension="png", owner=OWNER, ttl=600)
    store.adopt(record)
    assert (store.used_bytes, store.used_by(OWNER)) == (60, 60)
    with pytest.raises(StoreFailed, match="this API key's images take 0.00 GiB"):
        await store.put(b"c", extension="png", owner=OWNER)
    # Stored by the other process, served by this one, with its time to live.
    found = await store.get(record.uuid, owner=OWNER)
    assert (found.size, found.expires) == (10, record.expires)
    assert await store.read(found) == b"b" * 10
