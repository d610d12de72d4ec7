"""A server whose images live in an S3-compatible bucket (moto's server on loopback): uploads, results,
image-to-image and imageURLs all go through the bucket, and nothing is written to the data dir's images."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tests.timing import seconds
from tests.wire import API_KEY, Wire, inference

PREFIX = "gateway"


def png_bytes(color: tuple[int, int, int] = (200, 40, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), color).save(buffer, "PNG")
    return buffer.getvalue()


def request(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """An HTTP request to the server; tests call it through asyncio.to_thread, the server shares their loop."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=seconds(10)) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def bucket_object(endpoint: str, bucket: str, key: str) -> bytes:
    import boto3

    body = boto3.client("s3", endpoint_url=endpoint).get_object(Bucket=bucket, Key=key)["Body"]
    with body:
        data: bytes = body.read()
    return data


async def test_uploads_results_and_image_urls_live_in_the_bucket(start_server, data_dir: Path, s3_endpoint: str,
                                                                 s3_bucket: str) -> None:
    server = await start_server(store=f"s3://{s3_bucket}/{PREFIX}", s3_endpoint=s3_endpoint)
    wire = await Wire.open(server.url)
    source = png_bytes()
    [upload] = await wire.run({"taskType": "imageUpload", "image": base64.b64encode(source).decode()})
    assert bucket_object(s3_endpoint, s3_bucket, f"{PREFIX}/images/{upload['imageUUID']}.png") == source
    assert (await asyncio.to_thread(request, upload["imageURL"]))[::2] == (200, source)

    [text_to_image] = await wire.run(inference(seed=5, outputType="URL"))
    result_key = f"{PREFIX}/images/{text_to_image['imageUUID']}.png"
    status, headers, body = await asyncio.to_thread(request, text_to_image["imageURL"])
    assert status == 200 and body == bucket_object(s3_endpoint, s3_bucket, result_key)
    assert headers["Content-Type"] == "image/png" and headers["X-Content-Type-Options"] == "nosniff"
    assert Image.open(io.BytesIO(body)).size == (128, 128)
    status, headers, body = await asyncio.to_thread(request, text_to_image["imageURL"], "HEAD")
    assert (status, headers["Content-Type"], body) == (200, "image/png", b"")

    # Image-to-image from the uploaded UUID reads the upload back from the bucket: it gives the same pixels
    # as the same picture sent inline, and other pixels than another picture does.
    def edit(seed_image: str) -> dict:
        return inference(seed=5, seedImage=seed_image, strength=0.5, outputType="base64Data")

    [from_bucket] = await wire.run(edit(upload["imageUUID"]))
    [inline] = await wire.run(edit(base64.b64encode(source).decode()))
    [other] = await wire.run(edit(base64.b64encode(png_bytes((20, 200, 60))).decode()))
    assert pixels(from_bucket) == pixels(inline) != pixels(other)
    assert from_bucket["imageUUID"] in await asyncio.to_thread(keys, s3_endpoint, s3_bucket)

    missing = f"{server.config.base_url}/image/{uuid.uuid4()}.png"
    assert (await asyncio.to_thread(request, missing))[0] == 404
    wrong_extension = text_to_image["imageURL"].removesuffix(".png") + ".jpg"
    assert (await asyncio.to_thread(request, wrong_extension))[0] == 404
    assert not (data_dir / "images").exists()
    await wire.close()


def pixels(item: dict) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(item["imageBase64Data"]))).convert("RGB").tobytes()


def keys(endpoint: str, bucket: str) -> str:
    """The keys in ``bucket``, one a line."""
    import boto3

    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])
    return "\n".join(entry["Key"] for entry in listed)


async def test_images_in_the_bucket_stay_scoped_to_their_api_key(start_server, s3_endpoint: str,
                                                                 s3_bucket: str) -> None:
    server = await start_server(store=f"s3://{s3_bucket}", s3_endpoint=s3_endpoint, api_keys=("key-a", "key-b"))
    owner = await Wire.open(server.url, api_key="key-a")
    [upload] = await owner.run({"taskType": "imageUpload", "image": base64.b64encode(png_bytes()).decode()})
    stranger = await Wire.open(server.url, api_key="key-b")
    error = await stranger.error(inference(seedImage=upload["imageUUID"]))
    assert error["code"] == "imageNotFound" and error["parameter"] == "seedImage"
    await owner.close()
    await stranger.close()


async def test_two_servers_on_one_bucket_serve_each_others_images_and_history(start_server, s3_endpoint: str,
                                                                              s3_bucket: str) -> None:
    store = {"store": f"s3://{s3_bucket}/{PREFIX}", "s3_endpoint": s3_endpoint}
    first, second = await start_server(**store), await start_server(**store)
    on_first, on_second = await Wire.open(first.url), await Wire.open(second.url)
    [upload] = await on_first.run({"taskType": "imageUpload", "image": base64.b64encode(png_bytes()).decode()})
    [result] = await on_second.run(inference(seed=3, seedImage=upload["imageUUID"], strength=0.5, outputType="URL"))
    # The second server read the first one's upload, and the first serves the second one's result.
    status, _, body = await asyncio.to_thread(request, result["imageURL"].replace(str(second.port), str(first.port)))
    assert status == 200 and Image.open(io.BytesIO(body)).size == (128, 128)
    for wire in (on_first, on_second):
        [history] = await wire.run({"taskType": "imageHistory"})
        assert [image["imageUUID"] for image in history["images"]] == [result["imageUUID"], upload["imageUUID"]]
    await on_first.close()
    await on_second.close()


@pytest.mark.usefixtures("s3_bucket")
def test_the_server_does_not_start_without_its_bucket(tmp_path: Path, s3_endpoint: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "imagewire.server", "--port", "0", "--data-dir", str(tmp_path), "--api-key", API_KEY,
         "--store", "s3://no-such-bucket/images", "--s3-endpoint", s3_endpoint],
        capture_output=True, text=True, timeout=seconds(120))
    assert result.returncode == 2
    # The line that says the server is starting, then the one that says why it does not.
    assert result.stderr.strip().splitlines()[1:] == [
        f"imagewire-server: error: --store s3://no-such-bucket/images: bucket 'no-such-bucket' does not exist "
        f"at {s3_endpoint}"]
    assert not (tmp_path / "images").exists()
