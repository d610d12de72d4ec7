"""The task registry: taskUUIDs are used once, results are kept for getResponse within a memory bound."""

from __future__ import annotations

import pytest

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
    assert old.items_dropped and old.items == []
    assert len(running.items) == 1 and len(new.items) == 1 and not running.items_dropped
    assert registry.kept_bytes <= 10_000
    assert await registry.get("old", "owner") is old, "the record stays: its taskUUID is still taken"


async def test_a_running_task_alone_over_the_bound_lets_go_of_its_own_results():
    registry = TaskRegistry(retention=60, max_kept_bytes=10_000)
    huge = await registry.begin("huge", "imageInference", "owner")
    for _ in range(3):
        await registry.keep(huge, item("huge", 6000))
    assert huge.items_dropped and registry.kept_bytes <= 10_000
