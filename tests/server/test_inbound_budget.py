"""The server-wide inbound budget: large messages are charged when their first frame header arrives,
a socket whose next message does not fit is not read until it does, and what a socket holds comes back
when its messages are handled or it goes away."""

from __future__ import annotations

import asyncio
import io
import json
import struct

import aiohttp
import pytest

from imagewire.server import inbound_budget
from imagewire.server.inbound_budget import SMALL_MESSAGE_BYTES, FrameCounter, InboundBudget
from tests.timing import seconds
from tests.wire import API_KEY, Wire, eventually

MIB = 1024 * 1024
TEXT, BINARY, CONTINUATION, PING, CLOSE = 0x1, 0x2, 0x0, 0x9, 0x8


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame, masked with a zero key (so the payload goes as it is)."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", first, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    return head + b"\0\0\0\0" + payload


def counter(budget: InboundBudget, resumed: list[int] | None = None) -> FrameCounter:
    return FrameCounter(budget, max_message_bytes=4 * MIB,
                        resume=lambda: resumed.append(1) if resumed is not None else None)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 13, 4096, 10**9])
async def test_messages_are_charged_their_size_however_the_bytes_are_cut(chunk):
    budget = InboundBudget(64 * MIB)
    frames = counter(budget)
    large = 200_000
    stream = (frame(TEXT, b"x" * 10)                               # small: not charged
              + frame(PING, b"hi")                                 # control frames belong to no message
              + frame(BINARY, b"y" * large)                        # charged its size
              + frame(TEXT, b"a" * 100, fin=False)                 # fragments: charged the most allowed
              + frame(PING, b"")                                   # ... a ping may come between them
              + frame(CONTINUATION, b"b" * 100, fin=False)
              + frame(CONTINUATION, b"", fin=True)
              + frame(TEXT, b""))                                  # empty
    for start in range(0, len(stream), chunk):
        assert frames.feed(stream[start:start + chunk]) == len(stream[start:start + chunk])
    assert list(frames._complete) == [0, large, 4 * MIB, 0]
    assert budget.held == frames.held == large + 4 * MIB
    frames.handled()
    frames.handled()
    assert budget.held == 4 * MIB
    frames.handled()
    assert budget.held == 0


async def test_a_message_that_does_not_fit_waits_and_resumes_when_room_comes_back():
    budget = InboundBudget(3 * MIB)
    resumed: list[int] = []
    first, second = counter(budget), counter(budget, resumed)
    two = frame(TEXT, b"x" * (2 * MIB))
    assert first.feed(two) == len(two)
    assert budget.held == 2 * MIB
    # The second socket's message does not fit: only its header passes, the rest waits.
    passed = second.feed(two)
    assert passed == 14 and second.waiting and budget.waiting == 1
    # Small messages never wait (this socket has none waiting before them).
    third = counter(budget)
    ping = frame(TEXT, b"p" * (SMALL_MESSAGE_BYTES - 1))
    assert third.feed(ping) == len(ping)
    first.handled()
    await eventually(lambda: resumed == [1], timeout=seconds(5))
    assert budget.held == 2 * MIB and not second.waiting
    assert second.feed(two[passed:]) == len(two) - passed
    second.handled()
    assert budget.held == 0


async def test_a_small_rest_body_charged_nothing_never_waits_behind_a_large_one():
    budget = InboundBudget(3 * MIB)
    await budget.take(2 * MIB)
    waiting = asyncio.ensure_future(budget.take(2 * MIB))
    await asyncio.sleep(0)
    assert budget.waiting == 1
    await asyncio.wait_for(budget.take(0), seconds(1))
    budget.give_back(2 * MIB)
    await asyncio.wait_for(waiting, seconds(5))
    assert budget.held == 2 * MIB and budget.waiting == 0


async def test_a_message_larger_than_the_budget_gets_through_alone():
    budget = InboundBudget(1 * MIB)
    frames = counter(budget)
    big = frame(BINARY, b"z" * (2 * MIB))
    assert frames.feed(big) == len(big)
    assert budget.held == 2 * MIB
    frames.handled()
    assert budget.held == 0


async def test_a_socket_that_goes_away_gives_back_what_it_holds_and_stops_waiting():
    budget = InboundBudget(3 * MIB)
    holder, waiter, next_in_line = counter(budget), counter(budget), counter(budget, resumed := [])
    two = frame(TEXT, b"x" * (2 * MIB))
    holder.feed(two[:1000])             # half a message: charged in full
    assert budget.held == 2 * MIB
    waiter.feed(two)
    next_in_line.feed(frame(TEXT, b"y" * MIB))
    assert budget.waiting == 2
    waiter.close()                      # gone while waiting: its place in line goes too
    holder.close()                      # gone mid-message: its charge comes back
    await eventually(lambda: resumed == [1], timeout=seconds(5))
    assert budget.held == MIB and budget.waiting == 0


# Over the wire: one socket's half-sent message holds the budget; others wait, small messages do not.

async def raw_socket(url: str) -> aiohttp.ClientWebSocketResponse:
    session = aiohttp.ClientSession()
    websocket = await session.ws_connect(url, max_msg_size=0, autoping=False)
    websocket._test_session = session  # type: ignore[attr-defined]
    await websocket.send_str(json.dumps([{"taskType": "authentication", "apiKey": API_KEY}]))
    await websocket.receive(timeout=seconds(30))
    return websocket


async def close_raw(websocket: aiohttp.ClientWebSocketResponse) -> None:
    await websocket.close()
    await websocket._test_session.close()  # type: ignore[attr-defined]


def ping_message(size: int) -> bytes:
    """A ping task padded to ``size`` bytes with an unknown key: its answer is a short error item."""
    head = b'[{"taskType":"ping","ping":true,"pad":"'
    tail = b'"}]'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_over_the_wire_a_large_message_waits_for_room_and_small_ones_do_not(start_server):
    server = await start_server(max_inbound_bytes=3 * MIB, max_frame_bytes=4 * MIB)
    holder, waiter = await raw_socket(server.url), await raw_socket(server.url)
    prompt = await Wire.open(server.url)
    held_back = frame(TEXT, ping_message(2 * MIB))
    holder._writer.transport.write(held_back[:MIB])  # type: ignore[attr-defined]  # half a message, then nothing
    await eventually(lambda: server.inbound.held == 2 * MIB, timeout=seconds(10))

    await waiter.send_bytes(ping_message(2 * MIB))
    await eventually(lambda: server.inbound.waiting == 1, timeout=seconds(10))
    # A small message on a third socket is answered while the large one waits.
    await prompt.send([{"taskType": "ping", "ping": True}])
    assert (await prompt.receive())["data"][0]["pong"] is True
    with pytest.raises(asyncio.TimeoutError):
        await waiter.receive(timeout=seconds(1))
    assert server.inbound.held == 2 * MIB

    holder._writer.transport.write(held_back[MIB:])  # type: ignore[attr-defined]
    for websocket in (holder, waiter):
        answer = json.loads((await websocket.receive(timeout=seconds(30))).data)
        assert answer["errors"][0]["parameter"] == "pad"
    await eventually(lambda: server.inbound.held == 0 and server.inbound.waiting == 0, timeout=seconds(10))
    await prompt.close()
    for websocket in (holder, waiter):
        await close_raw(websocket)


async def test_over_the_wire_a_rest_body_waits_for_room_too(start_server):
    server = await start_server(max_inbound_bytes=3 * MIB, max_frame_bytes=4 * MIB)
    holder = await raw_socket(server.url)
    held_back = frame(TEXT, ping_message(2 * MIB))
    holder._writer.transport.write(held_back[:MIB])  # type: ignore[attr-defined]
    await eventually(lambda: server.inbound.held == 2 * MIB, timeout=seconds(10))
    async with aiohttp.ClientSession() as session:
        post = asyncio.ensure_future(session.post(
            f"http://127.0.0.1:{server.port}/v1", data=io.BytesIO(ping_message(2 * MIB)),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}))
        await eventually(lambda: server.inbound.waiting == 1, timeout=seconds(10))
        assert not post.done()
        holder._writer.transport.write(held_back[MIB:])  # type: ignore[attr-defined]
        response = await asyncio.wait_for(post, seconds(30))
        assert response.status == 400 and (await response.json())["errors"][0]["parameter"] == "pad"
    await eventually(lambda: server.inbound.held == 0, timeout=seconds(10))
    await close_raw(holder)


async def test_a_message_that_trickles_in_is_closed_and_gives_its_room_back(start_server, monkeypatch):
    monkeypatch.setattr(inbound_budget, "FRAME_DEADLINE_SECONDS", seconds(1))
    server = await start_server(max_inbound_bytes=3 * MIB, max_frame_bytes=4 * MIB)
    holder = await raw_socket(server.url)
    holder._writer.transport.write(frame(TEXT, ping_message(2 * MIB))[:MIB])  # type: ignore[attr-defined]
    closing = await holder.receive(timeout=seconds(30))
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1008
    assert "too slowly" in closing.extra
    await eventually(lambda: server.inbound.held == 0, timeout=seconds(10))
    await close_raw(holder)
