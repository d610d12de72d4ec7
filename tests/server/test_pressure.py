"""A hostile but well-formed client: it cannot make the server hold its megabytes, stall its own reads,
starve others with half-open connections, or fill the log; and what it gets back is short."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import math
import resource
import socket

from aiohttp import http_exceptions
from PIL import Image
from websockets.asyncio.client import connect

from bench.server_process import ServerProcess
from imagewire.server import handshakes
from imagewire.server.logs import ClientMistakes
from tests.engines import HeldEngine
from tests.timing import seconds
from tests.wire import API_KEY, Wire, eventually, inference, new_uuid


async def raw_http(port: int, request: bytes, wait: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), seconds(wait)):
            answer += chunk
    except TimeoutError:
        pass
    writer.close()
    return answer


async def test_error_items_repeat_no_more_than_a_short_prefix_of_what_was_sent(server):
    wire = await Wire.open(server.url)
    huge_key = "k" * 900_000
    error = await wire.error(inference(**{huge_key: 1}))
    assert error["code"] == "unknownParameter"
    assert len(json.dumps(error)) < 4000 and len(error["parameter"]) <= 200
    await wire.close()


async def test_a_client_that_does_not_read_is_closed_and_its_answers_wait_for_a_resume(start_server, caplog):
    caplog.set_level(logging.WARNING, logger="imagewire.connection")
    server = await start_server(max_outbox_bytes=1024 * 1024, send_timeout=seconds(2))
    # A small receive window, so the kernel's loopback buffers cannot take in megabytes on the client's behalf.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", server.port))
    websocket = await connect(server.url, sock=sock, max_size=None, compression=None)
    await websocket.send(json.dumps([{"taskType": "authentication", "apiKey": API_KEY}]))
    await websocket.recv()
    session = next(iter(server.sessions._sessions.values()))
    websocket.transport.pause_reading()  # from now on this client reads nothing
    for _ in range(40):  # about 1 MiB of answers a round
        await websocket.send(json.dumps(
            [{"taskType": "modelSearch", "taskUUID": new_uuid(), "limit": 100} for _ in range(50)]))
        if not server.connections:
            break
        await asyncio.sleep(seconds(0.2))
    # Closed by the server (not reading), its read loop never stalled, and what it did not take waits in
    # its session for a resume.
    await eventually(lambda: not server.connections)
    assert session.outbox and session.sender is None
    assert any("does not read its answers" in record.message for record in caplog.records)
    websocket.transport.abort()
    # Tasks still running when the socket closed add their answers after it, and the outbox drops its oldest
    # past its bound: what it keeps is known once every task is answered.
    await eventually(lambda: not server.runner.running)

    def task_uuid(frame: str | bytes) -> str:
        message = json.loads(frame)
        return (message.get("data") or message["errors"])[0]["taskUUID"]

    kept = [task_uuid(frame) for frame in session.outbox]
    resumed = await Wire.open(server.url, session=session.uuid)
    assert resumed.session == session.uuid
    assert [task_uuid(json.dumps(await resumed.receive())) for _ in kept] == kept
    await resumed.close()


async def test_a_flood_of_half_handshakes_does_not_lock_out_a_prompt_client(start_server):
    server = await start_server(max_handshakes_per_ip=4, handshake_timeout=seconds(30))
    half_open = []
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /v1 HTTP/1.1\r\nHost: x\r\n")  # never finished
        half_open.append(writer)
    await eventually(lambda: server.handshakes.dropped >= 16)
    assert server.handshakes.pending <= 4
    wire = await Wire.open(server.url)  # the oldest half-open one makes way for it
    assert await wire.run(inference(steps=1))
    await wire.close()
    for writer in half_open:
        writer.close()


class Silent(asyncio.Protocol):
    """aiohttp's protocol, had its handler not started yet."""


class Transport(asyncio.Transport):
    """A connection from 127.0.0.1 that says whether the guard dropped it."""

    aborted = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 5000) if name == "peername" else default

    def abort(self) -> None:
        self.aborted = True


async def test_a_connection_whose_request_head_arrived_is_never_dropped_as_handshaking() -> None:
    # The guard hears of a request when its head is in, not when its handler starts: on a busy event loop
    # handlers start late, and connections already past their handshake were dropped as the oldest.
    guard = handshakes.HandshakeGuard(Silent, timeout=seconds(30), per_address=1, trusted=[], grace=0)
    first, second, third = (guard(), Transport()), (guard(), Transport()), (guard(), Transport())
    first[0].connection_made(first[1])
    for piece in (b"POST /v1 HTTP/1.1\r\nHost: x\r", b"\nContent-Length: 2\r\n\r", b"\n[]"):  # split anywhere
        first[0].data_received(piece)
    second[0].connection_made(second[1])
    second[0].data_received(b"POST /v1 HTTP/1.1\r\nHost: x\r\n")  # not finished
    assert not first[1].aborted and guard.pending == 1
    third[0].connection_made(third[1])  # crowds out the unfinished one only
    assert second[1].aborted and not first[1].aborted and guard.dropped == 1
    for protocol, _ in (first, second, third):
        protocol.connection_lost(None)
    assert guard.pending == 0


async def test_a_burst_of_prompt_connections_from_one_address_is_not_taken_for_a_flood() -> None:
    # A client library opens thirty connections at once and sends each its request; a busy server accepts them
    # all before it reads any. None may be dropped for that, while a silent one past the grace still is.
    guard = handshakes.HandshakeGuard(Silent, timeout=seconds(30), per_address=4, trusted=[], grace=0.2)
    burst = [(guard(), Transport()) for _ in range(30)]
    for protocol, transport in burst:
        protocol.connection_made(transport)
    for protocol, _ in burst[:-1]:  # every request but the last one's arrives, after all were accepted
        protocol.data_received(b"POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]")
    assert not any(transport.aborted for _, transport in burst) and guard.pending == 1
    crowd = [(guard(), Transport()) for _ in range(4)]  # now over the bound: the silent one is the oldest
    for protocol, transport in crowd:
        protocol.connection_made(transport)
    assert not burst[-1][1].aborted, "dropped before its grace was over"
    await asyncio.sleep(0.3)
    assert burst[-1][1].aborted and guard.dropped == 1 and guard.pending == 4
    assert not any(transport.aborted for _, transport in burst[:-1] + crowd)
    for protocol, _ in burst + crowd:
        protocol.connection_lost(None)
    assert guard.pending == 0


async def test_a_connection_that_never_sends_its_request_is_dropped(start_server):
    server = await start_server(handshake_timeout=seconds(0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await asyncio.wait_for(reader.read(), seconds(10)) == b""  # closed by the server
    writer.close()
    assert server.handshakes.dropped == 1


def test_behind_a_trusted_proxy_the_client_is_the_last_untrusted_forwarded_address() -> None:
    from aiohttp.test_utils import make_mocked_request

    trusted = handshakes.networks(["10.0.0.0/8", "::1/128"])

    def request(peer: str, forwarded: str | None) -> str:
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        transport = type("Transport", (), {"get_extra_info": lambda self, name, default=None:
                                           (peer, 1234) if name == "peername" else default})()
        return handshakes.client_address(make_mocked_request("GET", "/", headers=headers, transport=transport),
                                       trusted)

    assert request("10.1.2.3", "203.0.113.7, 10.9.9.9") == "203.0.113.7"
    assert request("10.1.2.3", "198.51.100.1, 203.0.113.7") == "203.0.113.7"  # only the proxy's own entry counts
    assert request("192.0.2.50", "203.0.113.7") == "192.0.2.50"  # an untrusted peer cannot claim another address
    assert request("10.1.2.3", "not-an-address, 203.0.113.7") == "203.0.113.7"
    assert request("10.1.2.3", None) == "10.1.2.3"


async def test_head_sends_no_body_and_images_are_not_sniffed(server):
    wire = await Wire.open(server.url)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "teal").save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    [upload] = await wire.run({"taskType": "imageUpload", "image": image})
    path = upload["imageURL"].split(str(server.port), 1)[1]
    stored = await server.store.get(upload["imageUUID"], owner=None)
    reads = []
    real_read = server.store.read

    async def read(image):
        reads.append(image.uuid)
        return await real_read(image)

    server.store.read = read
    head = await raw_http(server.port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    headers, _, body = head.partition(b"\r\n\r\n")
    assert headers.startswith(b"HTTP/1.1 200") and body == b""
    assert b"X-Content-Type-Options: nosniff" in headers and b"Content-Type: image/png" in headers
    # Its length without its bytes: the store's record answers HEAD, and nothing is read.
    assert f"Content-Length: {stored.size}".encode() in headers and stored.size == len(buffer.getvalue())
    assert reads == []
    get = await raw_http(server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert get.partition(b"\r\n\r\n")[2] == buffer.getvalue() and reads == [upload["imageUUID"]]
    await wire.close()


async def test_malformed_http_is_answered_400_and_logged_as_one_line(server, caplog):
    with caplog.at_level(logging.INFO, logger="aiohttp.server"):
        for request in (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"):
            assert (await raw_http(server.port, request)).startswith(b"HTTP/1.")
    lines = [record for record in caplog.records if record.name == "aiohttp.server"]
    assert lines and all(record.exc_info is None for record in lines)


def test_client_mistakes_are_logged_once_per_interval() -> None:
    mistakes = ClientMistakes()

    def record() -> logging.LogRecord:
        error = http_exceptions.BadHttpMessage("bad")
        return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (),
                                 (type(error), error, None))

    first = record()
    assert mistakes.filter(first) and first.exc_info is None and "BadHttpMessage" in first.getMessage()
    assert not any(mistakes.filter(record()) for _ in range(100))
    ours = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (),
                             (KeyError, KeyError("a bug"), None))
    assert mistakes.filter(ours) and ours.exc_info is not None  # our own bugs keep their tracebacks


def test_the_open_file_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
            assert handshakes.raise_open_file_limit() == hard
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_lone_surrogate_fails_only_its_task_and_names_the_field(server):
    wire = await Wire.open(server.url)
    good, bad = inference(), inference()
    # JSON text with half a surrogate pair escaped: valid JSON syntax, no character.
    frame = json.dumps([good, bad]).replace("a red fox in the snow", "a red \\ud800 fox")
    frame = frame.replace("a red \\ud800 fox", "a red fox in the snow", 1)
    await wire.send(frame)
    answers = await wire.answers({good["taskUUID"]: 1, bad["taskUUID"]: 1})
    assert answers[good["taskUUID"]][0] and not answers[good["taskUUID"]][1]
    error = answers[bad["taskUUID"]][1][0]
    assert error["parameter"] == "positivePrompt" and "surrogate" in error["message"]
    await wire.close()


def one_colour_png(side: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def test_waiting_image_to_image_tasks_hold_their_seed_at_the_size_used_and_no_more(start_server):
    """A 1600² seed for a 128² output is held at 128² while its task waits; past the budget of decoded
    input pixels a new one is refused, naming seedImage; a finished task gives its share back."""
    engine = HeldEngine()
    used = 128 * 128
    # Decoding briefly holds the seed reduced by a whole factor (267² here) before the final resize, so
    # four tasks fit: the fourth arrives at 3 × 128² + 267² = 120,441 and the fifth would need 136,825.
    server = await start_server(engine_factory=lambda: engine, max_waiting_pixels=130_000)
    wire = await Wire.open(server.url)
    seed = one_colour_png(1600)
    waiting = [inference(seedImage=seed, strength=0.5, seed=index) for index in range(4)]
    for count, task in enumerate(waiting, start=1):
        await wire.send([task])
        await eventually(lambda count=count: server.services.pixels.held == count * used)
    refused = await wire.error(inference(seedImage=seed, strength=0.5))
    assert refused["code"] == "serviceUnavailable" and refused["parameter"] == "seedImage", refused
    assert "seedImage (0.0713 MP) would pass the bound of 0.13 MP" in refused["message"], refused["message"]
    engine.release.set()
    found = await wire.answers({task["taskUUID"]: 1 for task in waiting})
    assert all(data and not errors for data, errors in found.values()), found
    await eventually(lambda: server.services.pixels.held == 0)
    await wire.close()



async def test_a_storm_of_get_response_from_one_key_leaves_another_keys_pongs_fast(tmp_path):
    # A server process of its own (the fake engine, which answers at once): in this process, the storm's own
    # client would share the event loop with the server, and slow itself as much as the server.
    other_key = "another-key"
    server = ServerProcess(data_dir=tmp_path, api_key=API_KEY, device="cpu",
                           extra_args=("--engine", "fake", f"--api-key={other_key}"))
    await asyncio.to_thread(server.start)
    try:
        storm, pinger = await Wire.open(server.url), await Wire.open(server.url, api_key=other_key)
        # The storm's target: a finished task with 20 results, each getResponse answering all of them from memory.
        finished = inference(numberResults=20, width=128, height=128)
        assert len(await storm.run(finished, count=20)) == 20
        frame = json.dumps([{"taskType": "getResponse", "taskUUID": finished["taskUUID"]}] * 64)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds(4)
        answered = 0

        async def flood() -> None:
            # Slowed, the storm's socket is not read for a while: its sends wait for the kernel's buffers.
            with contextlib.suppress(TimeoutError):
                while loop.time() < deadline:
                    await asyncio.wait_for(storm.send(frame), max(0.01, deadline - loop.time()))

        async def drain() -> None:
            nonlocal answered
            with contextlib.suppress(TimeoutError):
                while loop.time() < deadline:
                    message = await storm.receive(timeout=max(0.01, deadline - loop.time()))
                    answered += bool(message.get("data"))

        async def ping() -> list[float]:
            round_trips = []
            while loop.time() < deadline:
                started = loop.time()
                await pinger.send([{"taskType": "ping", "ping": True}])
                assert (await pinger.receive())["data"][0]["pong"] is True
                round_trips.append(loop.time() - started)
                await asyncio.sleep(0.02)
            return round_trips

        round_trips, *_ = await asyncio.gather(ping(), flood(), drain())
        assert answered > 200  # it was a storm: the key's burst went out at once, the rest at its rate
        round_trips.sort()
        assert round_trips[math.ceil(len(round_trips) * 0.99) - 1] < seconds(0.1), round_trips[-5:]
        storm.websocket.transport.abort()
        await pinger.close()
    finally:
        server.stop()
