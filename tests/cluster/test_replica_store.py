"""A Ray replica storing the images it makes (``server/replica.py``, a job's ``store_on_device``): with ``--store``
on a bucket, a job whose task answers only the images' records gets records back, the images being in the bucket
already; a job that needs the bytes gets them; the gateway's bounds and the store's failures answer as the gateway
would have answered storing them itself.

One Ray cluster of this machine for the module, with one CPU replica on the real engine and the tiny model, deployed
with ``--store`` on a bucket of moto's S3 server on loopback, and this process's own device queue on the same engine
(``--engine local``) to compare with. The gateway's side is watched where the replica's messages arrive
(``RayDevice._batches``). Run with ``python -m pytest -m cluster tests/cluster/test_replica_store.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imagewire.air_registry import Catalog, locate_weights
from imagewire.server.config import Config
from imagewire.server.device import DeviceQueue
from imagewire.storage import OUTPUT_FORMATS, StoredImage, StoreFailed
from imagewire.storage.s3 import S3Location, S3Store
from imagewire.storage.store import Limits
from imagewire.tasks.errors import StorageError
from imagewire.tasks.inputs import RESULT_IMAGE, task_error
from imagewire.tasks.jobs import (
    DeviceEvent,
    EncodedImage,
    Failed,
    Finished,
    GeneratedImage,
    ImageEncoding,
    InferenceJob,
    Queued,
    Results,
    StoreOnDevice,
)
from tests.cluster.replica_beside_local import ray_beside_local, record_messages
from tests.engines import data_dir_with_models
from tests.timing import seconds

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs pip install -e '.[cluster]'"),
]

TINY = Catalog.load().resolve("imagewire:tiny@1")
OWNER = "owner-of-the-key"
PREFIX = "images"
# Dummy credentials for moto's S3 server on loopback, in this process's environment before Ray starts, so that the
# replica's process inherits them; no AWS configuration of this machine is read.
S3_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "replica-access-key", "AWS_SECRET_ACCESS_KEY": "replica-secret-key",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                  "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@dataclasses.dataclass
class Devices:
    ray: Any
    local: DeviceQueue
    data_dir: Path
    endpoint: str
    bucket: str
    client: Any          # boto3's, on moto's server
    gateway_store: S3Store  # what the gateway opens for --store, without bounds


@pytest.fixture(scope="module")
def devices(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Devices]:
    import boto3

    with pytest.MonkeyPatch.context() as environment:
        for name, value in S3_ENVIRONMENT.items():
            environment.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            environment.delenv(name, raising=False)
        bucket = f"replica-store-{os.getpid()}"
        client = boto3.client("s3", endpoint_url=s3_endpoint)
        client.create_bucket(Bucket=bucket)
        data = data_dir_with_models(tmp_path_factory.mktemp("replica-store") / "data", models_dir)
        config = Config(engine="ray", device="cpu", data_dir=data, replicas=1, queue_size=8, max_batch_size=4,
                        max_passed_over=0, log_level="WARNING", store=f"s3://{bucket}/{PREFIX}",
                        s3_endpoint=s3_endpoint)
        with ray_beside_local(config) as (ray_device, local):
            yield Devices(ray_device, local, data, s3_endpoint, bucket, client,
                          S3Store(S3Location.parse(f"s3://{bucket}/{PREFIX}"), endpoint_url=s3_endpoint))


@pytest.fixture
def messages(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[DeviceEvent]]]:
    return record_messages(monkeypatch)


def job(name: str, *, weights: Path = Path("found-by-the-replica"), seeds: tuple[int, ...] = (11, 12),
        **fields: Any) -> InferenceJob:
    return InferenceJob(task_uuid=name, owner=OWNER, model=TINY, weights=weights, prompt="a lighthouse at dawn",
                        negative_prompt=None, width=128, height=128, steps=3, cfg_scale=7.0, sampler=None,
                        seeds=list(seeds), report_steps=False, **fields)


async def events(device: Any, submitted: InferenceJob) -> list[DeviceEvent]:
    async def collect() -> list[DeviceEvent]:
        return [event async for event in device.submit(submitted).events() if not isinstance(event, Queued)]

    return await asyncio.wait_for(collect(), seconds(300))


def made(received: list[DeviceEvent]) -> list[GeneratedImage]:
    found = [result for event in received if isinstance(event, Results) for result in event.chunk]
    return sorted(found, key=lambda generated: generated.index)


def keys(devices: Devices) -> set[str]:
    listed = devices.client.list_objects_v2(Bucket=devices.bucket, Prefix=f"{PREFIX}/")
    return {entry["Key"] for entry in listed.get("Contents", ())}


def bucket_object(devices: Devices, key: str) -> bytes:
    with devices.client.get_object(Bucket=devices.bucket, Key=key)["Body"] as body:
        data: bytes = body.read()
    return data


async def local_bytes(devices: Devices, encoding: ImageEncoding, seeds: tuple[int, ...]) -> list[bytes]:
    """What ``--engine local`` stores for the same job: the task encodes the local device's pixels."""
    weights = locate_weights(TINY, data_dir=devices.data_dir, allow_downloads=False)
    pictures = made(await events(devices.local, job(f"local-{seeds}", weights=weights, seeds=seeds)))
    assert all(isinstance(generated.image, Image.Image) for generated in pictures)
    return [encoding.encode(generated.image).data for generated in pictures]  # type: ignore[arg-type]


async def test_a_job_that_only_stores_its_images_gets_their_records_and_the_bucket_holds_them(
        devices: Devices, messages: dict[str, list[list[DeviceEvent]]]) -> None:
    encoding = ImageEncoding(OUTPUT_FORMATS["WEBP"], 70)
    where = StoreOnDevice(devices.gateway_store.shared_write(OWNER), ttl=600)
    started = time.time()
    received = await events(devices.ray, job("stored", encoding=encoding, store_on_device=where))

    # Records crossed, not bytes: each image stored on the replica, as the gateway would have stored it.
    records = [generated.image for generated in made(received)]
    assert [type(record) for record in records] == [StoredImage, StoredImage]
    assert isinstance(received[-1], Finished)
    expected = await local_bytes(devices, encoding, (11, 12))
    for record, data in zip(records, expected, strict=True):
        assert isinstance(record, StoredImage)
        assert (record.extension, record.owner, record.size, record.path) == ("webp", OWNER, len(data), None)
        assert record.expires is not None and started + 600 <= record.expires <= time.time() + 600
        assert bucket_object(devices, f"{PREFIX}/images/{record.uuid}.webp") == data
        metadata = json.loads(bucket_object(devices, f"{PREFIX}/meta/{record.uuid}.json"))
        assert (metadata["owner"], metadata["size"], metadata["expires"]) == (OWNER, len(data), record.expires)
        assert metadata["content_type"] == "image/webp"
        assert any(key.endswith(f"-{record.uuid}.webp") for key in keys(devices) if "/expiring/" in key)
        # Any gateway on the bucket serves it to its owner.
        found = await devices.gateway_store.get(record.uuid, owner=OWNER)
        assert await devices.gateway_store.read(found) == data
    # Still two messages: its queue position, then its records with its end.
    (position,), rest = messages["stored"]
    assert isinstance(position, Queued)
    assert [type(event) for event in rest] == [Results, Finished]


async def test_a_job_that_needs_its_bytes_gets_them(devices: Devices) -> None:
    encoding = ImageEncoding(OUTPUT_FORMATS["PNG"], 95)
    before = keys(devices)
    # A task that answers base64Data, a dataURI or uploads its images sets no store_on_device: the bytes come.
    answered = made(await events(devices.ray, job("bytes", seeds=(13,), encoding=encoding)))
    # A gateway whose --store is another than the replica's (it joined a cluster another gateway deployed) gets
    # the bytes too, and stores them itself.
    elsewhere = S3Store(S3Location.parse(f"s3://{devices.bucket}/another-prefix"), endpoint_url=devices.endpoint)
    other = made(await events(devices.ray, job("another-store", seeds=(13,), encoding=encoding,
                                               store_on_device=StoreOnDevice(elsewhere.shared_write(OWNER)))))
    for generated in (*answered, *other):
        assert isinstance(generated.image, EncodedImage)
        assert generated.image.data == (await local_bytes(devices, encoding, (13,)))[0]
    assert keys(devices) == before


async def test_a_write_past_the_gateways_bound_answers_its_storage_error(devices: Devices) -> None:
    encoding = ImageEncoding(OUTPUT_FORMATS["PNG"], 95)
    first, second = await local_bytes(devices, encoding, (11, 12))
    # The gateway's --max-storage-gib-per-key leaves room for the job's first image, not for its second.
    # A per-key bound makes the store count each key's images at start, as the gateway's does; then the bound is set.
    bounded = S3Store(devices.gateway_store.location, endpoint_url=devices.endpoint,
                      limits=Limits(max_bytes_per_owner=1))
    bounded.limits = Limits(max_bytes_per_owner=bounded.used_by(OWNER) + len(first) + len(second) - 1)
    before = keys(devices)
    received = await events(devices.ray, job("past-the-bound", encoding=encoding,
                                             store_on_device=StoreOnDevice(bounded.shared_write(OWNER))))

    # The first image is stored and answered, as the gateway keeps the images it stored before one is refused.
    stored, failed = received
    assert isinstance(stored, Results) and isinstance(failed, Failed)
    (record,) = [generated.image for generated in stored.chunk]
    assert isinstance(record, StoredImage) and record.size == len(first)
    written = {key for key in keys(devices) - before if "/owners/" not in key}  # its history entry aside
    assert written == {f"{PREFIX}/images/{record.uuid}.png", f"{PREFIX}/meta/{record.uuid}.json"}
    # The second answers word for word what the gateway answers when it refuses the same image itself.
    bounded.adopt(record)
    with pytest.raises(StoreFailed) as refused:
        await bounded.put(second, extension="png", owner=OWNER)
    expected = task_error(refused.value, RESULT_IMAGE)
    assert isinstance(failed.error, StorageError) and failed.error.code == expected.code == "storageError"
    assert failed.error.message == expected.message
    assert "this API key's images take" in failed.error.message


async def test_a_store_that_fails_on_the_replica_answers_the_storage_error_the_gateway_would(
        devices: Devices) -> None:
    encoding = ImageEncoding(OUTPUT_FORMATS["PNG"], 95)
    where = StoreOnDevice(devices.gateway_store.shared_write(OWNER))
    # The bucket goes away under the running cluster.
    for key in keys(devices):
        devices.client.delete_object(Bucket=devices.bucket, Key=key)
    devices.client.delete_bucket(Bucket=devices.bucket)
    try:
        received = await events(devices.ray, job("bucket-gone", encoding=encoding, store_on_device=where))
        with pytest.raises(StoreFailed) as refused:
            await devices.gateway_store.put(b"image", extension="png", owner=OWNER)
    finally:
        devices.client.create_bucket(Bucket=devices.bucket)
    (failed,) = received
    assert isinstance(failed, Failed) and isinstance(failed.error, StorageError)
    assert failed.error.message == task_error(refused.value, RESULT_IMAGE).message == (
        "The result image could not be stored: the server's image storage failed (NoSuchBucket).")
    # The replica serves on: the next job's images are stored.
    again = made(await events(devices.ray, job("after", seeds=(14,), encoding=encoding, store_on_device=where)))
    assert [type(generated.image) for generated in again] == [StoredImage]
