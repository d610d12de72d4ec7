"""The Redis registries themselves (server/state.py), against a real redis-server on loopback: a taskUUID is
taken once over all servers, results expire after the retention and stay within the bound, and a task whose
server died is reported as failed once its lease lapses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import orjson
import pytest
import pytest_asyncio

from imagewire.tasks.errors import ConflictTaskUUID
from tests.timing import seconds
from tests.wire import eventually, new_uuid

if TYPE_CHECKING:
    from imagewire.server.state import RedisState


def connect_to(url: str, **options: float):
    # Imported once the redis_url fixture found redis-py (an optional extra) installed.
    from imagewire.server.state import RedisState

    return RedisState.connect(url, **options)

OWNER = "owner-token"


@pytest_asyncio.fixture
async def connect(redis_url: str) -> AsyncIterator:
    """Open RedisStates (one per server) on the test's Redis; closed at the end."""
    opened: list[RedisState] = []

    async def open_state(*, lease: float = 10.0, retention: float = 60.0, max_kept_bytes: int = 1 << 20) -> RedisState:
        state = await connect_to(redis_url, lease=lease)
        state.task_registry(retention=retention, max_kept_bytes=max_kept_bytes)
        state.session_registry(resume_window=60.0, max_outbox_bytes=1 << 20)
        await state.start()
        opened.append(state)
        return state

    yield open_state
    for state in opened:
        await state.close()


def item(task_uuid: str, size: int) -> dict:
    return {"taskType": "imageInference", "taskUUID": task_uuid, "imageBase64Data": "x" * size}


async def test_a_task_uuid_is_taken_once_over_all_servers(connect) -> None:
    first, second = await connect(), await connect()
    assert first.tasks is not None and second.tasks is not None
    task_uuid = new_uuid()
    outcomes = await asyncio.gather(*(state.tasks.begin(task_uuid, "imageInference", OWNER)
                                      for state in (first, second, first, second)), return_exceptions=True)
    assert sum(not isinstance(outcome, BaseException) for outcome in outcomes) == 1
    assert all(isinstance(outcome, ConflictTaskUUID) for outcome in outcomes if isinstance(outcome, BaseException))
    # Another key's UUID space is its own.
    await second.tasks.begin(task_uuid, "imageInference", "another-owner")


async def test_results_are_read_on_another_server_and_expire_after_the_retention(connect) -> None:
    first, second = await connect(retention=0.5), await connect(retention=0.5)
    assert first.tasks is not None and second.tasks is not None
    task_uuid = new_uuid()
    record = await first.tasks.begin(task_uuid, "imageInference", OWNER)
    await first.tasks.keep(record, item(task_uuid, 10))
    first.tasks.progress(record, 40)
    seen = await eventually(lambda: _progress(second, task_uuid))
    assert (seen.status, seen.progress, len(seen.items)) == ("processing", 40, 1)
    record.errors.append({"code": "inferenceError", "message": "it broke", "taskUUID": task_uuid})
    await first.tasks.finish(record, "error")
    finished = await second.tasks.get(task_uuid, OWNER)
    assert finished is not None and finished.status == "error" and finished.errors[0]["message"] == "it broke"
    assert finished.items == [item(task_uuid, 10)] and not finished.items_dropped
    assert await second.tasks.get(task_uuid, "another-owner") is None
    await asyncio.sleep(seconds(0.7))
    assert await second.tasks.get(task_uuid, OWNER) is None
    await second.tasks.begin(task_uuid, "imageInference", OWNER)  # free again


async def _progress(state: RedisState, task_uuid: str):
    assert state.tasks is not None
    record = await state.tasks.get(task_uuid, OWNER)
    return record if record is not None and record.progress is not None else None


async def test_past_the_bound_the_oldest_finished_results_go_first_on_every_server(connect) -> None:
    first, second = await connect(max_kept_bytes=10_000), await connect(max_kept_bytes=10_000)
    assert first.tasks is not None and second.tasks is not None
    names = {name: new_uuid() for name in ("old", "running", "new")}
    old = await first.tasks.begin(names["old"], "imageInference", OWNER)
    running = await second.tasks.begin(names["running"], "imageInference", OWNER)
    new = await second.tasks.begin(names["new"], "imageInference", OWNER)
    for record in (old, running, new):
        await (first if record is old else second).tasks.keep(record, item(record.task_uuid, 4000))
    await first.tasks.finish(old, "success")
    assert not (await second.tasks.get(names["old"], OWNER)).items_dropped
    await second.tasks.finish(new, "success")  # 8 kB of finished results: within the bound
    assert not (await second.tasks.get(names["old"], OWNER)).items_dropped
    third = await second.tasks.begin(new_uuid(), "imageInference", OWNER)
    await second.tasks.keep(third, item(third.task_uuid, 4000))
    await second.tasks.finish(third, "success")  # 12 kB: the oldest goes, on whichever server it finished
    dropped = await first.tasks.get(names["old"], OWNER)
    assert dropped is not None and dropped.items_dropped and dropped.items == []
    assert [len(r.items) for r in [await first.tasks.get(names["new"], OWNER)]] == [1]
    assert len((await first.tasks.get(names["running"], OWNER)).items) == 1, "a running task's results stay"
    assert int(await first.client.get("imagewire:kept:total")) == 2 * len(_encoded(item(new.task_uuid, 4000)))
    with pytest.raises(ConflictTaskUUID):  # the record stays: its taskUUID is still taken
        await first.tasks.begin(names["old"], "imageInference", OWNER)


def _encoded(value: dict) -> bytes:
    return orjson.dumps(value)


async def test_a_task_whose_server_died_is_reported_failed_once_its_lease_lapses(connect) -> None:
    lease = seconds(1.0)
    alive, dying, reader = await connect(lease=lease), await connect(lease=lease), await connect(lease=lease)
    assert alive.tasks is not None and dying.tasks is not None and reader.tasks is not None
    kept_alive = await alive.tasks.begin(new_uuid(), "imageInference", OWNER)
    orphan = await dying.tasks.begin(new_uuid(), "imageInference", OWNER)
    await dying.close()  # stops renewing, as a killed server would, without finishing its task
    await asyncio.sleep(lease * 1.6)
    lapsed = await reader.tasks.get(orphan.task_uuid, OWNER)
    assert lapsed is not None and lapsed.status == "error"
    [error] = lapsed.errors
    assert error["code"] == "serviceUnavailable" and "stopped before it finished" in error["message"]
    assert await reader.tasks.cancel(orphan.task_uuid, OWNER) is False  # nothing left to stop
    renewed = await reader.tasks.get(kept_alive.task_uuid, OWNER)
    assert renewed is not None and renewed.status == "processing", "a live server's lease is renewed"


async def test_redis_refusing_the_credentials_is_named_at_connect(redis_url: str) -> None:
    import redis

    admin = redis.Redis.from_url(redis_url)
    admin.config_set("requirepass", "right-password")
    try:
        for url in (redis_url, redis_url.replace("redis://", "redis://:wrong-password@")):
            with pytest.raises(ValueError) as refused:
                await connect_to(url)
            message = str(refused.value)
            assert message.startswith("--state redis://") and "Redis refused the credentials" in message
            assert "wrong-password" not in message
        state = await connect_to(redis_url.replace("redis://", "redis://:right-password@"))
        await state.close()
    finally:
        redis.Redis.from_url(redis_url.replace("redis://", "redis://:right-password@")).config_set("requirepass", "")
        admin.close()


async def test_a_session_resumes_on_another_server_with_its_outbox_in_order(connect) -> None:
    first, second = await connect(), await connect()
    assert first.sessions is not None and second.sessions is not None
    session, resumed = await first.sessions.open(OWNER, None)
    assert not resumed
    await session.send(b"one")  # no socket anywhere: kept in Redis
    await session.send(b"two")
    await session.keep([b"untaken-a", b"untaken-b"])  # what a closing socket did not take goes first
    stranger, resumed = await second.sessions.open("another-owner", session.uuid)
    assert not resumed and stranger.uuid != session.uuid
    again, resumed = await second.sessions.open(OWNER, session.uuid)
    assert resumed and again.uuid == session.uuid
    taken: list[bytes] = []

    async def socket(frame: bytes) -> bool:
        taken.append(frame)
        return True

    await again.attach(socket)
    assert taken == [b"untaken-a", b"untaken-b", b"one", b"two"]
    await session.send(b"three")  # produced on the first server, for the socket on the second
    await eventually(lambda: len(taken) == 5)
    assert taken[-1] == b"three"
    await again.detach(socket)
    await session.send(b"four")
    await asyncio.sleep(seconds(0.2))
    assert len(taken) == 5, "a detached socket takes nothing more"
    assert await first.client.lrange(f"imagewire:session:{session.uuid}:outbox", 0, -1) == [b"four"]


async def test_a_task_answered_during_a_resume_comes_after_the_frames_kept_in_redis(connect) -> None:
    from tests.server.test_sessions import resume_while_a_task_answers

    state = await connect()
    assert state.sessions is not None
    session, _ = await state.sessions.open(OWNER, None)
    kept = [b"one", b"two", b"three"]
    for frame in kept:
        await session.send(frame)   # no socket anywhere: kept in Redis
    assert await resume_while_a_task_answers(session, kept) == [*kept, b"answered during the resume"]
    assert await state.client.llen(f"imagewire:session:{session.uuid}:outbox") == 0


async def test_the_server_does_not_start_without_redis_py(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from imagewire.server.app import open_state
    from imagewire.server.config import Config

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "redis" else
                        find_spec(name, *rest))
    with pytest.raises(ValueError) as refused:
        await open_state(Config(state=redis_url.replace("redis://", "redis://:pw@")))
    assert str(refused.value) == (f"--state {redis_url.replace('redis://', 'redis://:***@')}: redis-py is not "
                                  "installed; pip install 'imagewire[redis]'")
