"""A result image stored by the device that made it (``tasks/outputs.py`` ``stored_results``, a job's
``store_on_device``) answers as one the task stores itself: the same forms, its ttl for getResponse, its bytes in the
store's usage. Against moto's S3 server on loopback; the Ray replica that stores so is exercised in
tests/cluster/test_replica_store.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PIL import Image

from imagewire.storage import OUTPUT_FORMATS, ImageStore, StoredImage
from imagewire.storage.s3 import S3Location, S3Store
from imagewire.storage.store import Limits
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import StorageError
from imagewire.tasks.jobs import GeneratedImage, ImageEncoding, encoded_results
from imagewire.tasks.outputs import ImageOutput, store_image, stored_results
from tests.contexts import pure_context

OWNER = "owner-of-the-key"


def context(store: object) -> TaskContext:
    ctx = pure_context(owner=OWNER)
    ctx.services = dataclasses.replace(ctx.services, store=store, base_url="http://gateway:8080")  # type: ignore[arg-type]
    return ctx


def webp(ttl: int | None = None, *types: str) -> ImageOutput:
    return ImageOutput(types=list(types or ("URL",)), format=OUTPUT_FORMATS["WEBP"], quality=70, ttl=ttl)


def chunk(encoding: ImageEncoding) -> list[GeneratedImage]:
    pictures = [Image.new("RGB", (64, 64), color) for color in ((200, 40, 90), (20, 140, 90))]
    made = [GeneratedImage(index, seed=index, image=picture, seconds=0.5) for index, picture in enumerate(pictures)]
    return encoded_results(made, encoding)


async def test_only_a_task_answering_records_into_a_bucket_lets_the_device_store(
        s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    bucket = S3Store(S3Location.parse(f"s3://{s3_bucket}/images"), endpoint_url=s3_endpoint)
    on_bucket = context(bucket)
    where = webp(600).store_on_device(on_bucket)
    assert where is not None and where.ttl == 600 and where.shared == bucket.shared_write(OWNER)
    # The bytes are needed here for base64Data, a dataURI or an upload; a disk of this machine is this machine's.
    assert webp(None, "URL", "base64Data").store_on_device(on_bucket) is None
    assert webp(None, "dataURI").store_on_device(on_bucket) is None
    uploading = dataclasses.replace(webp(), upload_endpoint="https://uploads.example/put")
    assert uploading.store_on_device(on_bucket) is None
    assert webp().store_on_device(context(ImageStore(tmp_path / "images"))) is None


async def test_an_image_the_device_stored_answers_as_one_the_task_stores(s3_endpoint: str, s3_bucket: str) -> None:
    location = S3Location.parse(f"s3://{s3_bucket}/images")
    gateway, device = S3Store(location, endpoint_url=s3_endpoint), S3Store(location, endpoint_url=s3_endpoint)
    output = webp(600)
    ctx = context(gateway)
    where = output.store_on_device(ctx)
    assert where is not None
    encoded = chunk(output.encoding)

    stored = await stored_results(device, encoded, OWNER, where)
    assert stored.failure is None and stored.written == sum(len(result.image.data) for result in encoded)
    records = [result.image for result in stored.results]
    assert all(isinstance(record, StoredImage) for record in records)
    answered = [await store_image(ctx, record, output) for record in records]

    # The same task storing the same bytes itself.
    itself = context(gateway)
    by_task = [await store_image(itself, result.image, output) for result in encoded]
    for record, answer, own in zip(records, answered, by_task, strict=True):
        assert isinstance(record, StoredImage)
        assert answer.url == f"http://gateway:8080/image/{record.uuid}.webp" and answer.uuid == record.uuid
        assert dataclasses.replace(answer, uuid="", url="") == dataclasses.replace(own, uuid="", url="")
        assert await gateway.read(await gateway.get(record.uuid, owner=OWNER)) == await gateway.read(
            await gateway.get(own.uuid, owner=OWNER))
    # Its ttl ends getResponse's answers, as for an image the task stored; its bytes count as the gateway's writes.
    expiries = [record.expires for record in records]
    assert itself.expires is not None and ctx.expires is not None and abs(ctx.expires - itself.expires) < 5
    assert None not in expiries and ctx.expires == min(expiries)
    assert gateway.used_by(OWNER) == 2 * stored.written


async def test_a_write_the_gateways_bound_or_the_store_refuses_ends_the_chunk_with_the_tasks_error(
        s3_endpoint: str, s3_bucket: str) -> None:
    location = S3Location.parse(f"s3://{s3_bucket}/images")
    output = webp()
    encoded = chunk(output.encoding)
    first = len(encoded[0].image.data)
    bounded = S3Store(location, endpoint_url=s3_endpoint, limits=Limits(max_bytes_per_owner=first + 1))
    where = output.store_on_device(context(bounded))
    assert where is not None
    device = S3Store(location, endpoint_url=s3_endpoint)

    stored = await stored_results(device, encoded, OWNER, where)
    # The first fits and is kept; the second is refused in the gateway's words.
    assert [type(result.image) for result in stored.results] == [StoredImage] and stored.written == first
    assert isinstance(stored.failure, StorageError)
    assert stored.failure.message.startswith("The result image could not be stored: this API key's images take")

    # The bucket goes away: the store's failure, as the task answers it.
    for key in [entry["Key"] for entry in device._list("")]:
        device._client.delete_object(Bucket=s3_bucket, Key=key)
    device._client.delete_bucket(Bucket=s3_bucket)
    failed = await stored_results(device, encoded, OWNER, where)
    assert failed.results == [] and failed.written == 0 and isinstance(failed.failure, StorageError)
    assert failed.failure.message == (
        "The result image could not be stored: the server's image storage failed (NoSuchBucket).")
