"""REST: POST /v1 with a task array, one JSON answer, the status codes a client expects."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import urllib.error
import urllib.request
from typing import Any

from PIL import Image

from tests.engines import HeldEngine
from tests.timing import seconds
from tests.wire import API_KEY, inference, new_uuid


def post(url: str, body: bytes | list[Any], *, key: str | None = API_KEY,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=seconds(120)) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def rest(server, body: bytes | list[Any], **options: Any) -> tuple[int, dict[str, Any]]:
    # The server runs on this event loop: post from a thread so it can answer.
    return await asyncio.to_thread(post, f"http://127.0.0.1:{server.port}/v1", body, **options)


def png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), "teal").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def test_every_task_type_over_rest(server):
    upload, search = new_uuid(), new_uuid()
    status, answer = await rest(server, [
        {"taskType": "ping", "ping": True},
        {"taskType": "imageUpload", "taskUUID": upload, "image": png_data_uri()},
        {"taskType": "modelSearch", "taskUUID": search, "search": "tiny"},
    ])
    assert status == 200 and "errors" not in answer
    by_type = {item["taskType"]: item for item in answer["data"]}
    assert by_type["ping"]["pong"] is True
    assert by_type["imageUpload"]["taskUUID"] == upload and by_type["imageUpload"]["imageUUID"]
    assert by_type["modelSearch"]["results"][0]["air"] == "imagewire:tiny@1"
    # The upload is an input of the next request, by UUID.
    task = inference(seedImage=by_type["imageUpload"]["imageUUID"], strength=0.5, numberResults=2)
    status, answer = await rest(server, [task])
    assert status == 200
    assert sorted(item["seed"] for item in answer["data"]) == sorted({item["seed"] for item in answer["data"]})
    assert len(answer["data"]) == 2 and all(item["taskUUID"] == task["taskUUID"] for item in answer["data"])
    image_url = answer["data"][0]["imageURL"]
    assert await asyncio.to_thread(lambda: urllib.request.urlopen(image_url, timeout=seconds(10)).status) == 200


async def test_authentication_as_the_first_task_instead_of_a_header(server):
    task = inference()
    status, answer = await rest(server, [{"taskType": "authentication", "apiKey": API_KEY}, task], key=None)
    assert status == 200 and answer["data"][0]["taskUUID"] == task["taskUUID"]


async def test_async_tasks_are_acknowledged_and_fetched_with_get_response(server):
    task = inference(deliveryMethod="async", seed=11)
    status, answer = await rest(server, [task])
    assert status == 200 and answer == {"data": [{"taskType": "imageInference", "taskUUID": task["taskUUID"]}]}
    for _ in range(600):
        status, answer = await rest(server, [{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
        if answer["data"][0].get("status") == "success":
            break
        await asyncio.sleep(seconds(0.1))
    assert status == 200 and answer["data"][0]["seed"] == 11 and answer["data"][0]["imageUUID"]


async def test_a_frame_that_is_not_a_task_array_is_400(server):
    for body in (b"not json", b'{"taskType": "ping"}'):
        status, answer = await rest(server, body)
        assert status == 400 and answer["errors"][0]["code"] == "invalidMessage"


async def test_a_body_over_the_message_limit_is_413(start_server):
    server = await start_server(max_frame_bytes=1024 * 1024)
    status, answer = await rest(server, [inference(seedImage="A" * (2 * 1024 * 1024))])
    assert status == 413 and "at most 1 MiB" in answer["errors"][0]["message"]


async def test_a_missing_or_wrong_key_is_401(server):
    status, answer = await rest(server, [inference()], key=None)
    assert status == 401 and answer["errors"][0]["code"] == "missingApiKey"
    status, answer = await rest(server, [inference()], key="wrong")
    assert status == 401 and answer["errors"][0]["code"] == "invalidApiKey"
    assert answer["errors"][0]["taskType"] == "authentication"
    status, answer = await rest(server, [{"taskType": "authentication", "apiKey": "wrong"}, inference()], key=None)
    assert status == 401 and {error["code"] for error in answer["errors"]} == {"invalidApiKey", "missingApiKey"}


async def test_client_mistakes_are_4xx_with_error_items_and_a_partial_success_is_200(server):
    bad_size, unknown_model, good = inference(width=100), inference(model="runware:404@1"), inference()
    status, answer = await rest(server, [bad_size])
    assert status == 400 and answer["errors"][0]["code"] == "invalidWidth"
    status, answer = await rest(server, [unknown_model])
    assert status == 404 and answer["errors"][0]["code"] == "modelNotFound"
    status, answer = await rest(server, [inference(width=100), good])
    assert status == 200
    assert answer["data"][0]["taskUUID"] == good["taskUUID"] and answer["errors"][0]["code"] == "invalidWidth"


async def test_a_full_queue_is_503_and_a_key_at_its_limit_is_429(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine, queue_size=1, max_tasks_per_key=3)
    held = asyncio.ensure_future(rest(server, [inference()]))
    assert await asyncio.to_thread(engine.started.wait, seconds(30))
    waiting = asyncio.ensure_future(rest(server, [inference()]))
    while server.device.pending < 1:
        await asyncio.sleep(seconds(0.05))
    status, answer = await rest(server, [inference()])
    assert status == 503 and answer["errors"][0]["code"] == "serviceUnavailable"
    assert "busy" in answer["errors"][0]["message"]
    # Two more: the first is admitted (the key's third unfinished task) and finds the queue full; the second
    # is refused at the key's limit, which is answered first.
    status, answer = await rest(server, [inference(), inference()])
    assert status == 429 and "This API key already has 3 unfinished tasks" in answer["errors"][0]["message"]
    assert answer["errors"][1]["code"] == "serviceUnavailable" and "busy" in answer["errors"][1]["message"]
    engine.release.set()
    assert [(await held)[0], (await waiting)[0]] == [200, 200]


def raw_post(port: int, head: bytes, pieces: list[bytes], *, pause: float = 0.0) -> tuple[int, bytes]:
    """POST /v1 over a plain socket: the head, then each piece of the body (``pause`` seconds apart)."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", port), timeout=seconds(30)) as connection:
        connection.sendall(head)
        try:
            for piece in pieces:
                connection.sendall(piece)
                time.sleep(pause)
        except OSError:
            pass  # the server answered and closed before the rest was sent
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def gzip_bomb(size: int) -> bytes:
    import gzip

    return gzip.compress(b"[" + b" " * size + b"]", compresslevel=9)


async def test_a_keyless_body_is_read_only_as_far_as_an_authentication_task_needs(server):
    bomb = gzip_bomb(48 * 1024 * 1024)
    assert len(bomb) < 64 * 1024  # under the size a body is charged at, before this change
    head = (b"POST /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: " + str(len(bomb)).encode() + b"\r\n\r\n")
    status, body = await asyncio.to_thread(raw_post, server.port, head, [bomb])
    answer = json.loads(body)
    assert status == 401 and answer["errors"][0]["code"] == "missingApiKey"
    assert "Authorization header" in answer["errors"][0]["message"]
    # Nothing was charged or held for it.
    assert server.inbound.held == 0
    # A small keyless body still authenticates with a task, compressed or not.
    import gzip
    status, answer = await rest(server, gzip.compress(json.dumps(
        [{"taskType": "authentication", "apiKey": API_KEY}, {"taskType": "ping", "ping": True}]).encode()),
        key=None, headers={"Content-Encoding": "gzip"})
    assert status == 200 and any(item.get("pong") for item in answer["data"])


async def test_a_refused_compressed_body_is_thrown_away_rather_than_decompressed(server, monkeypatch):
    # Answered 401 after its first 64 KiB, the rest of a bomb was still read to keep the connection, and
    # decompressed: 48 MiB of work per 48 KiB sent, for a client without a key.
    from aiohttp.compression_utils import ZLibDecompressor

    made = []
    decompress = ZLibDecompressor.decompress_sync

    def counted(self, data, max_length=0):
        out = decompress(self, data, max_length)
        made.append(len(out))
        return out

    monkeypatch.setattr(ZLibDecompressor, "decompress_sync", counted)
    bomb = gzip_bomb(48 * 1024 * 1024)
    head = (b"POST /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: " + str(len(bomb)).encode() + b"\r\n\r\n")
    for _ in range(3):
        status, _ = await asyncio.to_thread(raw_post, server.port, head, [bomb])
        assert status == 401
    await asyncio.sleep(seconds(3))  # what the connections would still have decompressed after their answers
    assert sum(made) < 3 * 4 * 1024 * 1024, f"{sum(made) / 2**20:.0f} MiB decompressed for 3 refused bodies"


async def test_a_keyed_compressed_body_is_bounded_after_decompression(start_server):
    server = await start_server(max_frame_bytes=1024 * 1024)
    bomb = gzip_bomb(8 * 1024 * 1024)
    head = (b"POST /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Encoding: gzip\r\nAuthorization: Bearer "
            + API_KEY.encode() + b"\r\nContent-Length: " + str(len(bomb)).encode() + b"\r\n\r\n")
    status, body = await asyncio.to_thread(raw_post, server.port, head, [bomb])
    assert status == 413 and "at most 1 MiB" in json.loads(body)["errors"][0]["message"]


async def test_a_body_that_trickles_in_is_answered_408_and_gives_its_charge_back(server, monkeypatch):
    from imagewire.server import rest as rest_module

    monkeypatch.setattr(rest_module, "FRAME_DEADLINE_SECONDS", seconds(1))
    head = (b"POST /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nAuthorization: Bearer "
            + API_KEY.encode() + b"\r\n\r\n")
    pieces = [b"1\r\n[\r\n"] * 40
    status, body = await asyncio.to_thread(raw_post, server.port, head, pieces, pause=0.1)
    assert status == 408 and "did not arrive within" in json.loads(body)["errors"][0]["message"]
    assert server.inbound.held == 0


async def test_an_answer_past_the_outbox_bound_leaves_results_out_with_an_error_each(start_server):
    server = await start_server(max_outbox_bytes=200_000)
    tasks = [inference(numberResults=4, outputType="base64Data", seed=seed) for seed in (1, 2)]
    status, answer = await rest(server, tasks)
    assert status == 200
    kept, left_out = answer["data"], [error for error in answer["errors"] if error["code"] == "responseTooLarge"]
    assert kept and left_out and len(kept) + len(left_out) == 8
    assert sum(len(json.dumps(item, separators=(",", ":"))) for item in kept) <= 200_000
    assert {error["taskUUID"] for error in left_out} <= {task["taskUUID"] for task in tasks}
    assert "--max-outbox-mib" in left_out[0]["message"] and "getResponse" in left_out[0]["message"]
    # Every result is still kept for getResponse, whose answer is bounded the same way.
    uuid = left_out[0]["taskUUID"]
    status, answer = await rest(server, [{"taskType": "getResponse", "taskUUID": uuid}])
    images = {item["imageUUID"] for item in answer["data"] if item.get("imageUUID")}
    assert status == 200 and len(images) + len(answer.get("errors", [])) == 4 and len(images) >= 2


async def test_a_body_cut_off_by_its_client_is_one_line_without_a_traceback(server, caplog):
    import logging
    import socket

    def hang_up() -> None:
        with socket.create_connection(("127.0.0.1", server.port)) as connection:
            connection.sendall(b"POST /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + API_KEY.encode()
                               + b"\r\nContent-Length: 100000\r\n\r\n[" + b" " * 1000)

    with caplog.at_level(logging.INFO):
        for _ in range(3):
            await asyncio.to_thread(hang_up)
        await asyncio.sleep(seconds(1))
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.WARNING]
    # One line per interval at most (another test may have said it within the interval).
    assert len([record for record in caplog.records if "hung up before its request body" in record.getMessage()]) <= 1
