"""The task registry: taskUUIDs are used once, results are kept for getResponse within a memory bound."""

from __future__ import annotations

import gc

import pytest

from imagewire.server import sessions
from imagewire.server.sessions import TaskRegistry
from imagewire.tasks.errors import ConflictTaskUUID


def item(task_uuid: str, size: int) -> dict:
    return {"taskType": "imageInference", "taskUUID": task_uuid, "imageBase64Data": "x" * size}


async def test_a_task_uuid_is_used_once_until_its_record_expires():
    registry = TaskRegistry(retention=60)
    record = await registry.begin("a", "imageInference", "owner")
    with pytest.raises(ConflictTaskUUID) as refused:
        await registry.begin("a", "imageInference", "owner")
    assert "getResponse" in refused.value.message
    await registry.keep(record, item("a", 1000))
    await registry.finish(record, "success")
    assert await registry.sweep(now=record.finished_at + 61) == 1
    assert registry.kept_bytes == 0
    await registry.begin("a", "imageInference", "owner")


async def test_past_the_bound_the_oldest_finished_results_go_first():
    registry = TaskRegistry(retention=60, max_kept_bytes=10_000)
    old, running, new = [await registry.begin(name, "imageInference", "owner") for name in ("old", "running", "new")]
    await registry.keep(old, item("old", 4000))
    await registry.keep(running, item("running", 4000))
    await registry.finish(old, "success")
    assert not old.items_dropped
    await registry.keep(new, item("new", 4000))  # 12 kB kept: over the bound
    kept = await registry.get("old", "owner")
    assert kept is not None, "the record stays: getResponse can say why its results are gone"
    assert kept.items_dropped and kept.items == [] and kept.status == "success"
    assert len(running.items) == 1 and len(new.items) == 1 and not running.items_dropped
    assert registry.kept_bytes <= 10_000
    with pytest.raises(ConflictTaskUUID):  # its taskUUID is still taken
        await registry.begin("old", "imageInference", "owner")


async def test_a_running_task_alone_over_the_bound_lets_go_of_its_own_results():
    registry = TaskRegistry(retention=60, max_kept_bytes=10_000)
    huge = await registry.begin("huge", "imageInference", "owner")
    for _ in range(3):
        await registry.keep(huge, item("huge", 6000))
    assert huge.items_dropped and registry.kept_bytes <= 10_000


async def test_a_finished_record_reads_back_as_it_ended():
    registry = TaskRegistry(retention=60)
    record = await registry.begin("a", "imageInference", "owner")
    record.expires = 1234.5
    await registry.keep(record, item("a", 10))
    record.errors.append({"code": "x", "taskUUID": "a"})
    await registry.finish(record, "error")
    kept = await registry.get("a", "owner")
    assert kept is not None and kept is not record
    assert (kept.task_type, kept.status, kept.items, kept.errors, kept.expires, kept.finished_at) == (
        "imageInference", "error", [item("a", 10)], [{"code": "x", "taskUUID": "a"}], 1234.5, record.finished_at)
    assert await registry.get("a", "someone else") is None
    assert await registry.cancel("a", "owner") is False and await registry.cancel("b", "owner") is None


async def test_many_small_records_are_bounded_too_oldest_forgotten_first():
    registry = TaskRegistry(retention=3600, max_kept_bytes=200_000)
    for index in range(5000):
        record = await registry.begin(f"task-{index}", "imageInference", "owner")
        await registry.keep(record, item(f"task-{index}", 10))
        await registry.finish(record, "success")
    assert registry.kept_bytes <= 200_000
    assert 0 < len(registry) < 5000
    assert await registry.get("task-0", "owner") is None
    newest = await registry.get("task-4999", "owner")
    assert newest is not None and newest.items == [item("task-4999", 10)]


async def test_sweeping_forgets_only_the_records_past_retention(monkeypatch):
    registry = TaskRegistry(retention=60)
    for name, finished_at in (("old", 100.0), ("middle", 130.0), ("new", 160.0)):
        monkeypatch.setattr(sessions.time, "monotonic", lambda at=finished_at: at)
        await registry.finish(await registry.begin(name, "imageInference", "owner"), "success")
    assert await registry.sweep(now=180.0) == 1
    assert [await registry.get(name, "owner") is not None for name in ("old", "middle", "new")] == [False, True, True]
    assert await registry.sweep(now=200.0) == 1
    assert await registry.get("middle", "owner") is None and await registry.get("new", "owner") is not None


async def test_finished_records_give_the_garbage_collector_nothing_to_walk():
    # A full collection walks every tracked object: records kept as objects made its pauses grow with the
    # number of tasks answered in the last hour.
    registry = TaskRegistry(retention=3600)
    gc.collect()
    before = len(gc.get_objects())
    for index in range(3000):
        record = await registry.begin(f"task-{index}", "imageInference", "owner")
        await registry.keep(record, item(f"task-{index}", 10))
        await registry.finish(record, "success")
    del record
    gc.collect()
    assert len(gc.get_objects()) - before < 100
