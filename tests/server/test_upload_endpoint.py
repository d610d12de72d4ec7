"""uploadEndpoint: each result image, once stored, is PUT (its bytes, its Content-Type) to the URL the task names,
under the outbound client's rules; the result says whether the upload succeeded, a failed one adds an error item
naming uploadEndpoint while the image stays available, and a slow endpoint holds up no other task."""

from __future__ import annotations

import asyncio
import io
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

from PIL import Image

from imagewire.tasks import uploads
from tests.engines import HeldEngine
from tests.server.test_tools_end_to_end import encoded, picture
from tests.timing import seconds
from tests.wire import API_KEY, Wire, eventually, inference


@dataclass
class Put:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP endpoint on loopback that answers every request with ``status``, once ``release`` is set."""

    status: int = 200
    release: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[Put] = field(default_factory=list)
    listener: asyncio.Server | None = None

    async def start(self) -> str:
        self.listener = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.listener.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ")
        headers = {name.strip().lower(): value.strip()
                   for name, _, value in (line.partition(":") for line in head[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append(Put(method, target, headers, body))
        await self.release.wait()
        writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    def close(self) -> None:
        self.release.set()
        if self.listener is not None:
            self.listener.close()


async def receiver(status: int = 200, *, held: bool = False) -> tuple[Receiver, str]:
    endpoint = Receiver(status)
    if not held:
        endpoint.release.set()
    return endpoint, await endpoint.start()


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=seconds(10)) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


async def test_the_result_image_is_put_to_the_endpoint_as_stored(start_server):
    endpoint, base = await receiver()
    server = await start_server(allow_private_urls=True, engine_factory=lambda: HeldEngine(released=True))
    wire = await Wire.open(server.url)
    # A presigned URL's path and query reach the endpoint as they are.
    url = f"{base}/bucket/generated/fox.png?X-Amz-Signature=abc123&X-Amz-Expires=3600"
    [item] = await wire.run(inference(uploadEndpoint=url, outputType="URL"))
    assert item["uploaded"] is True
    [put] = endpoint.requests
    assert (put.method, put.target) == ("PUT", "/bucket/generated/fox.png?X-Amz-Signature=abc123&X-Amz-Expires=3600")
    assert put.headers["content-type"] == "image/png"
    status, stored = await asyncio.to_thread(http_get, item["imageURL"])
    assert status == 200 and put.body == stored  # the bytes of the stored image, nothing else
    assert Image.open(io.BytesIO(put.body)).size == (128, 128)
    # Without uploadEndpoint nothing is sent, and the result does not speak of uploads.
    [plain] = await wire.run(inference())
    assert "uploaded" not in plain and len(endpoint.requests) == 1
    endpoint.close()
    await wire.close()


async def test_every_task_type_that_makes_an_image_uploads_it(server):
    endpoint, base = await receiver()
    wire = await Wire.open(server.url)
    [guide] = await wire.run({"taskType": "controlNetPreprocess", "taskUUID": str(uuid.uuid4()),
                              "inputImage": encoded(picture((64, 64))), "preProcessorType": "canny",
                              "outputFormat": "WEBP", "uploadEndpoint": f"{base}/guide"})
    assert guide["uploaded"] is True
    [put] = endpoint.requests
    assert put.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(put.body)).format == "WEBP"
    for task in ({"taskType": "upscale", "upscaleFactor": 2}, {"taskType": "removeBackground", "outputFormat": "PNG"}):
        [item] = await wire.run({**task, "taskUUID": str(uuid.uuid4()), "inputImage": encoded(picture((64, 64))),
                                 "uploadEndpoint": f"{base}/{task['taskType']}"})
        assert item["uploaded"] is True, task
        put = endpoint.requests[-1]
        assert put.target == f"/{task['taskType']}"
        assert put.body == (await asyncio.to_thread(http_get, item["imageURL"]))[1]
    assert len(endpoint.requests) == 3
    endpoint.close()
    await wire.close()


async def test_a_failing_endpoint_is_an_error_naming_it_and_the_image_stays(start_server, monkeypatch):
    monkeypatch.setattr(uploads, "FIRST_DELAY_SECONDS", 0.01)
    endpoint, base = await receiver(500)
    server = await start_server(allow_private_urls=True, engine_factory=lambda: HeldEngine(released=True))
    wire = await Wire.open(server.url)
    task = inference(uploadEndpoint=f"{base}/put-here?signature=secret", outputType="URL")
    await wire.send([task])
    [item], [error] = await wire.items_for(task["taskUUID"], 2)
    assert item["uploaded"] is False and item["imageUUID"]
    assert (error["code"], error["parameter"], error["taskUUID"]) == ("uploadFailed", "uploadEndpoint",
                                                                      task["taskUUID"])
    assert f"URL {base} answered HTTP 500" in error["message"] and item["imageUUID"] in error["message"]
    assert "secret" not in error["message"]  # a presigned URL's query is a credential
    assert len(endpoint.requests) == uploads.ATTEMPTS
    assert (await asyncio.to_thread(http_get, item["imageURL"]))[0] == 200
    [again] = await wire.run(inference(seedImage=item["imageUUID"], strength=0.5))  # reusable as ever
    assert again["imageUUID"]

    # Delivered async, getResponse answers the result and the error, and the task counts as failed.
    task = inference(uploadEndpoint=f"{base}/async", deliveryMethod="async")
    await wire.send([task])
    await wire.receive()  # acknowledgement

    await eventually(lambda: not server.runner.running)
    asking = await Wire.open(server.url)  # a socket of its own: no results pushed to it in between
    await asking.send([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
    answer = await asking.receive()
    await asking.close()
    assert [each["uploaded"] for each in answer["data"]] == [False]
    assert [(each["code"], each["parameter"]) for each in answer["errors"]] == [("uploadFailed", "uploadEndpoint")]
    endpoint.close()
    await wire.close()


async def test_loopback_without_allow_private_urls_is_refused_naming_uploadEndpoint(start_server, monkeypatch):
    monkeypatch.setattr(uploads, "FIRST_DELAY_SECONDS", 0.01)
    endpoint, base = await receiver()
    server = await start_server(engine_factory=lambda: HeldEngine(released=True))
    wire = await Wire.open(server.url)
    # An address literal is refused before the task runs.
    error = await wire.error(inference(uploadEndpoint=f"{base}/x"))
    assert (error["code"], error["parameter"]) == ("invalidParameter", "uploadEndpoint")
    assert base in error["message"] and "--allow-private-urls" in error["message"]
    for bad in ("ftp://example.com/x", "not a url"):
        refused = await wire.error(inference(uploadEndpoint=bad))
        assert (refused["code"], refused["parameter"]) == ("invalidParameter", "uploadEndpoint"), bad
    # A host name is checked when it is resolved: the image is made, the upload refused.
    task = inference(uploadEndpoint=base.replace("127.0.0.1", "localhost") + "/x")
    await wire.send([task])
    [item], [failed] = await wire.items_for(task["taskUUID"], 2)
    assert item["uploaded"] is False
    assert (failed["code"], failed["parameter"]) == ("uploadFailed", "uploadEndpoint")
    assert "non-public address" in failed["message"]
    assert endpoint.requests == []
    endpoint.close()
    await wire.close()


async def test_one_endpoint_takes_one_image(server):
    wire = await Wire.open(server.url)
    error = await wire.error(inference(uploadEndpoint="https://example.com/x", numberResults=2))
    assert (error["code"], error["parameter"]) == ("invalidParameter", "uploadEndpoint")
    assert "received numberResults 2" in error["message"]
    await wire.close()


async def test_a_slow_endpoint_holds_up_only_its_own_tasks(start_server):
    endpoint, base = await receiver(held=True)
    server = await start_server(allow_private_urls=True, api_keys=("key-a", "key-b"),
                                engine_factory=lambda: HeldEngine(released=True))
    first, second = await Wire.open(server.url, api_key="key-a"), await Wire.open(server.url, api_key="key-b")
    # More uploads waiting than the default thread pool has threads: waiting on an endpoint holds no thread.
    slow = [inference(uploadEndpoint=f"{base}/{index}") for index in range(12)]
    await first.send(slow)
    await eventually(lambda: len(endpoint.requests) == len(slow))
    started = time.perf_counter()
    [other] = await second.run(inference(seed=3))
    assert other["imageUUID"] and time.perf_counter() - started < seconds(5)
    [upload] = await first.run({"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()),
                                "image": encoded(picture())})
    assert upload["imageUUID"]  # the slow key's own other tasks too
    endpoint.release.set()
    done, _ = await first.items_for(slow[0]["taskUUID"], 1)
    assert done[0]["uploaded"] is True
    endpoint.close()
    await first.close()
    await second.close()


async def test_the_python_sdk_sends_upload_endpoint_and_ttl(start_server):
    from runware import IImageInference, Runware

    endpoint, base = await receiver()
    server = await start_server(allow_private_urls=True, engine_factory=lambda: HeldEngine(released=True))
    client = Runware(api_key=API_KEY, url=server.url)
    await client.connect()
    try:
        [image] = await client.imageInference(requestImage=IImageInference(
            model="imagewire:tiny@1", positivePrompt="a castle on a hill", width=128, height=128, steps=2,
            outputFormat="PNG", uploadEndpoint=f"{base}/from-the-sdk.png", ttl=120))
    finally:
        await client.disconnect()
    [put] = endpoint.requests
    assert put.target == "/from-the-sdk.png" and put.body == (await asyncio.to_thread(http_get, image.imageURL))[1]
    stored = await server.store.get(image.imageUUID, owner=None)
    assert stored.expires is not None and 110 < stored.expires - time.time() <= 120
    endpoint.close()


async def test_over_rest_the_answer_holds_the_result_and_the_upload_error(start_server, monkeypatch):
    from tests.server.test_rest import rest

    monkeypatch.setattr(uploads, "FIRST_DELAY_SECONDS", 0.01)
    endpoint, base = await receiver(403)
    server = await start_server(allow_private_urls=True, engine_factory=lambda: HeldEngine(released=True))
    status, answer = await rest(server, [inference(uploadEndpoint=f"{base}/denied")])
    assert status == 200  # the image was made: the answer is not an error as a whole
    [item], [error] = answer["data"], answer["errors"]
    assert item["uploaded"] is False and (await asyncio.to_thread(http_get, item["imageURL"]))[0] == 200
    assert (error["code"], error["parameter"]) == ("uploadFailed", "uploadEndpoint")
    assert "answered HTTP 403" in error["message"]
    endpoint.close()
