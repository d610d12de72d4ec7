"""Hostile input: property-based tests of the decoder, and a corpus of bad messages sent to a live server."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagewire.server import protocol
from imagewire.tasks.errors import TaskError
from tests.timing import seconds
from tests.wire import Wire, inference, new_uuid

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
task_keys = st.sampled_from(["taskType", "taskUUID", "model", "positivePrompt", "width", "height", "steps",
                             "seedImage", "strength", "numberResults", "outputType", "scheduler", "seed", "lora"])
task_types = st.sampled_from(["imageInference", "imageUpload", "ping", "authentication", "getResponse",
                              "modelSearch", "nope"])
tasks = st.builds(lambda kind, extra: {"taskType": kind, **extra}, task_types,
                  st.dictionaries(task_keys, json_values, max_size=8))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_tasks_or_errors_never_a_crash(frame):
    try:
        decoded = protocol.decode_frame(frame, max_tasks=64)
    except protocol.FrameError as error:
        assert error.code and error.message
        return
    for element in decoded:
        assert (element.task is None) != (element.error is None)


@settings(max_examples=400, deadline=None)
@given(st.lists(tasks, max_size=5))
def test_any_task_shapes_give_a_typed_task_or_a_scoped_error(batch):
    decoded = protocol.decode_frame(msgspec.json.encode(batch), max_tasks=64)
    assert len(decoded) == len(batch)
    for obj, element in zip(batch, decoded, strict=True):
        if element.error is not None:
            assert isinstance(element.error, TaskError)
            item = element.error.to_item(element.task_type, element.task_uuid)
            assert item["code"] and item["message"] and "Traceback" not in item["message"]
            if isinstance(obj.get("taskUUID"), str):
                assert item["taskUUID"] == obj["taskUUID"]
        else:
            assert element.task is not None and element.task_type == obj["taskType"]


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: a decompression bomb in 60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def small_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, "PNG")
    return buffer.getvalue()


HOSTILE_FRAMES = ["", "null", "{}", '"x"', "1e999", "[NaN]", "[Infinity]", deep(5000), "[" * 100000,
                  "\xff\xfe", '[{"taskType": "ping"', "[" + ",".join(["{}"] * 200) + "]"]

HOSTILE_TASKS = [
    {"taskType": "imageInference", "width": 10 ** 30},
    inference(width=-64),
    inference(steps=1e308),
    inference(seed="1"),
    inference(numberResults=True),
    inference(positivePrompt=["a", "b"]),
    inference(positivePrompt="x" * 100_000),
    inference(outputType={"a": 1}),
    inference(model="../../../etc/passwd"),
    inference(model="a" * 10_000),
    inference(seedImage="../../etc/passwd"),
    inference(seedImage="data:image/png;base64," + b64(png_claiming(100_000, 100_000))),
    inference(seedImage=b64(small_png()[:40])),
    inference(seedImage=b64(b"GIF89a" + b"\0" * 100)),
    inference(seedImage="data:text/html;base64,PGh0bWw+"),
    inference(seedImage="file:///etc/passwd"),
    inference(seedImage="http://169.254.169.254/latest/meta-data/"),
    inference(seedImage="http://[::1]:22/"),
    inference(seedImage="http://0x7f000001/"),
    inference(seedImage="http://localhost/x.png"),
    inference(seedImage="gopher://127.0.0.1:25/"),
    {"taskType": "imageUpload", "taskUUID": new_uuid(), "image": "\0" * 1000},
    {"taskType": "imageUpload", "taskUUID": new_uuid(), "image": b64(png_claiming(70_000, 70_000))},
    {"taskType": "imageUpload", "taskUUID": new_uuid(), "image": 12},
    {"taskType": "getResponse", "taskUUID": "../../../x"},
    {"taskType": "modelSearch", "taskUUID": new_uuid(), "limit": 10 ** 9},
    {"taskType": "authentication", "apiKey": {"$ne": None}},
]


async def test_hostile_frames_get_an_error_and_the_connection_stays(start_server):
    server = await start_server()
    wire = await Wire.open(server.url)
    for frame in HOSTILE_FRAMES:
        await wire.send(frame)
        message = await wire.receive(timeout=seconds(10))
        assert message.get("errors"), (frame[:30], message)
    await wire.send([{"taskType": "ping", "ping": True}])
    assert (await wire.receive())["data"][0]["pong"] is True
    await wire.close()


async def test_hostile_tasks_get_an_error_item_and_the_server_lives(start_server):
    server = await start_server()  # URL inputs to private addresses refused, as in production
    wire = await Wire.open(server.url)
    for index, task in enumerate(HOSTILE_TASKS):
        await wire.send([task])
        message = await wire.receive(timeout=seconds(30))
        assert message.get("errors"), (index, message)
        error = message["errors"][0]
        assert error["code"] and error["message"], index
        assert "Traceback" not in error["message"] and "/tmp" not in error["message"], (index, error)
        if isinstance(task.get("taskUUID"), str) and task.get("taskType") != "authentication":
            assert error["taskUUID"] == task["taskUUID"], index
        await wire.send([{"taskType": "ping", "ping": True}])
        assert (await wire.receive())["data"][0]["pong"] is True, index
    # after all of it, the same socket still runs real inference
    assert await wire.run(inference())
    await wire.close()


async def test_values_a_client_sends_reach_the_log_as_one_escaped_line(start_server, caplog):
    """A taskUUID or taskType holding a newline (or a terminal escape) cannot forge a line of the log: the
    record carries it escaped, on the line of the task it belongs to."""
    server = await start_server()
    forged = "imagewire.task taskUUID=forged taskType=imageInference outcome=success"
    wire = await Wire.open(server.url)
    with caplog.at_level("INFO"):
        await wire.send([
            {"taskType": "modelSearch", "taskUUID": f"{new_uuid()}\n{forged}", "search": "tiny"},
            {"taskType": f"imageInference\r\n{forged}\x1b[2J", "taskUUID": new_uuid()},
            inference(taskUUID=f"{new_uuid()}\u2028{forged}", steps=0),
        ])
        errors = []
        while len(errors) < 3:
            errors += (await wire.receive(timeout=seconds(30))).get("errors", [])
    await wire.close()
    messages = [record.getMessage() for record in caplog.records]
    assert not [message for message in messages if any(c in message for c in "\n\r\x1b\u2028")]
    # The values were logged (escaped), so the check above had something to find.
    logged = "\n".join(messages)
    assert f"\\n{forged}" in logged and f"\\r\\n{forged}\\x1b[2J" in logged and f"\\u2028{forged}" in logged
