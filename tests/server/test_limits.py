"""Bounds: each one answered with a clear error while the server keeps serving."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from imagewire.server.admission import DeviceTime
from imagewire.server.state import StateUnavailable
from tests.engines import HeldEngine
from tests.timing import seconds
from tests.wire import API_KEY, Wire, eventually, inference


async def test_tasks_in_flight_per_connection_are_bounded(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine, max_tasks_in_flight=2)
    wire = await Wire.open(server.url)
    tasks = [inference() for _ in range(3)]
    await wire.send(tasks)
    _, errors = await wire.items_for(tasks[2]["taskUUID"], 1)
    assert errors[0]["code"] == "serviceUnavailable" and "max 2" in errors[0]["message"]
    engine.release.set()
    answers = await wire.answers({task["taskUUID"]: 1 for task in tasks[:2]})
    assert all(data and not errors for data, errors in answers.values())
    await wire.close()


async def test_tasks_in_flight_per_api_key_are_bounded_over_connections(start_server):
    engine = HeldEngine()
    server = await start_server(engine_factory=lambda: engine, max_tasks_per_key=2)
    first, second = await Wire.open(server.url), await Wire.open(server.url)
    await first.send([inference(), inference()])
    refused = inference()
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    error = await second.error(refused)
    assert error["code"] == "serviceUnavailable" and "API key" in error["message"]
    engine.release.set()
    await first.close()
    await second.close()


async def test_unauthenticated_sockets_per_address_are_bounded_by_closing_the_oldest(start_server):
    server = await start_server(max_unauthenticated_per_ip=2)
    oldest, idle = await connect(server.url), await connect(server.url)
    await eventually(lambda: len(server.waiting_room) == 2)
    newest = await connect(server.url)
    # The oldest waiting socket makes room: a flood cannot lock out a client that authenticates at once.
    message = await asyncio.wait_for(oldest.recv(), seconds(5))
    assert "serviceUnavailable" in message and "authenticate" in message and "oldest" in message
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(oldest.recv(), seconds(5))
    assert oldest.close_code == 1008
    await newest.send(json.dumps([{"taskType": "authentication", "apiKey": API_KEY}]))
    assert "connectionSessionUUID" in await asyncio.wait_for(newest.recv(), seconds(5))
    for websocket in (idle, newest):
        await websocket.close()


async def test_sockets_opened_at_once_that_authenticate_at_once_are_all_let_in(start_server):
    # A client opening many sockets together is not a flood: each sends its key at once, though the server may
    # accept them all before it reads one.
    server = await start_server(max_unauthenticated_per_ip=2)

    async def open_and_authenticate():
        websocket = await connect(server.url)
        await websocket.send(json.dumps([{"taskType": "authentication", "apiKey": API_KEY}]))
        return websocket, await asyncio.wait_for(websocket.recv(), seconds(10))

    opened = await asyncio.gather(*(open_and_authenticate() for _ in range(12)))
    assert all("connectionSessionUUID" in answer for _, answer in opened), [a for _, a in opened if "errors" in a]
    for websocket, _ in opened:
        await websocket.close()


async def test_a_socket_displaced_while_its_key_is_checked_keeps_its_place(start_server, monkeypatch):
    server = await start_server(max_unauthenticated_per_ip=1)
    checking, checked = asyncio.Event(), asyncio.Event()
    open_session = server.sessions.open

    async def slow_open(*args, **kwargs):
        checking.set()
        await checked.wait()
        return await open_session(*args, **kwargs)

    monkeypatch.setattr(server.sessions, "open", slow_open)
    first = await connect(server.url)
    await first.send(json.dumps([{"taskType": "authentication", "apiKey": API_KEY}]))
    await asyncio.wait_for(checking.wait(), seconds(5))
    newest = await connect(server.url)  # the first is the oldest socket without a key: it is displaced
    await eventually(lambda: len(server.connections) == 2)
    await asyncio.sleep(0.1)  # the refusal, scheduled, runs now
    checked.set()
    # Told it is in, it stays in: no error item after its answer, and it keeps answering.
    assert "connectionSessionUUID" in await asyncio.wait_for(first.recv(), seconds(5))
    await first.send(json.dumps([{"taskType": "ping", "ping": True}]))
    assert '"pong":true' in (await asyncio.wait_for(first.recv(), seconds(5))).replace(" ", "")
    for websocket in (first, newest):
        await websocket.close()


async def test_a_socket_whose_session_could_not_open_past_its_deadline_is_closed(start_server, monkeypatch):
    server = await start_server(auth_timeout=seconds(0.5))

    async def unreachable(*args, **kwargs):
        await asyncio.sleep(seconds(1.0))  # past the deadline, as a frozen Redis would be
        raise StateUnavailable()

    monkeypatch.setattr(server.sessions, "open", unreachable)
    websocket = await connect(server.url)
    await websocket.send(json.dumps([{"taskType": "authentication", "apiKey": API_KEY}]))
    assert "Redis" in await asyncio.wait_for(websocket.recv(), seconds(5))
    assert "No authentication within" in await asyncio.wait_for(websocket.recv(), seconds(5))
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(websocket.recv(), seconds(5))
    assert websocket.close_code == 1008


async def test_a_socket_that_never_authenticates_is_closed(start_server):
    server = await start_server(auth_timeout=seconds(1.0))
    websocket = await connect(server.url)
    message = await asyncio.wait_for(websocket.recv(), seconds(5))
    assert "No authentication within" in message
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(websocket.recv(), seconds(5))
    # an authenticated socket is not affected by the deadline
    wire = await Wire.open(server.url)
    await asyncio.sleep(seconds(1.5))
    await wire.send([{"taskType": "ping", "ping": True}])
    assert (await wire.receive())["data"][0]["pong"] is True
    await wire.close()


async def test_a_frame_over_the_limit_closes_only_that_socket(start_server):
    server = await start_server(max_frame_bytes=1024 * 1024)
    wire = await Wire.open(server.url)
    await wire.send("[" + " " * (2 * 1024 * 1024) + "]")
    with pytest.raises(ConnectionClosed):
        await wire.receive(timeout=seconds(5))
    assert wire.websocket.close_code == 1009  # message too big
    other = await Wire.open(server.url)
    assert await other.run(inference())
    await other.close()


def test_device_time_fills_back_at_its_hourly_rate_and_forgets_full_keys():
    now = [0.0]
    budget = DeviceTime(36.0, clock=lambda: now[0])  # 36 s an hour: 0.01 s back per second
    assert budget.refuse("a") is None
    budget.use("a", 40.0)
    refused = budget.refuse("a")
    assert refused is not None and "36 device seconds an hour" in refused.message
    assert "about 500 s" in refused.message  # 4 s short, and 1 s more to run on, at 0.01 s a second
    assert budget.refuse("b") is None  # another key is not touched
    now[0] = 401.0
    assert budget.refuse("a") is None and budget.left("a") == pytest.approx(0.01)
    now[0] = 10_000.0
    budget.use("a", 0.0)
    assert budget.left("a") == 36.0 and "a" not in budget._buckets


async def test_a_key_past_its_device_time_is_refused_while_other_keys_run(start_server):
    engine = HeldEngine()
    other = "another-key"
    server = await start_server(engine_factory=lambda: engine, api_keys=(API_KEY, other),
                                device_seconds_per_key_hour=0.2)
    wire = await Wire.open(server.url)
    first = inference()
    await wire.send([first])
    assert await asyncio.to_thread(engine.started.wait, seconds(10))
    await asyncio.sleep(0.5)  # the call holds the device for at least this long: more than 0.2 s
    engine.release.set()
    data, errors = await wire.items_for(first["taskUUID"], 1)
    assert data and not errors
    error = await wire.error(inference())
    assert error["code"] == "serviceUnavailable" and "device time" in error["message"], error
    other_wire = await Wire.open(server.url, api_key=other)
    assert await other_wire.run(inference())
    await wire.close()
    await other_wire.close()
