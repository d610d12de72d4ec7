"""The task runner without sockets: admission, prepare, records, delivery and every way a task ends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from imagewire.server.admission import Admission
from imagewire.server.sessions import TaskRegistry
from imagewire.server.task_runner import TaskRunner
from imagewire.server.webhooks import WebhookSender
from imagewire.storage import UrlFetcher
from imagewire.tasks import schema
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter
from imagewire.tasks.task_type import Delivery, TaskType, unchanged
from tests.contexts import pure_context
from tests.timing import seconds
from tests.wire import new_uuid

OWNER = "owner-a"


class Replies:
    """What the transport would send: one entry per reply call."""

    def __init__(self) -> None:
        self.frames: list[tuple[list[Any], list[dict[str, Any]]]] = []

    async def __call__(self, data: Sequence[Any] = (), errors: Sequence[dict[str, Any]] = ()) -> None:
        self.frames.append((list(data), list(errors)))

    @property
    def data(self) -> list[Any]:
        return [item for data, _ in self.frames for item in data]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [item for _, errors in self.frames for item in errors]


def search(**fields: Any) -> schema.ModelSearch:
    return schema.ModelSearch(taskUUID=new_uuid(), **fields)


def results(count: int, *, fail_with: BaseException | None = None, hold: asyncio.Event | None = None):
    async def run(task: schema.ModelSearch, ctx: TaskContext) -> AsyncIterator[dict[str, Any]]:
        for index in range(count):
            yield {"taskType": "modelSearch", "taskUUID": task.taskUUID, "index": index}
        if hold is not None:
            await hold.wait()
        if fail_with is not None:
            raise fail_with

    return run


def task_type(run: Any, **options: Any) -> TaskType[Any, Any]:
    return TaskType(struct=schema.ModelSearch, prepare=options.pop("prepare", unchanged), run=run, **options)


@pytest.fixture
def runner() -> TaskRunner:
    services = pure_context().services
    return TaskRunner(services, registry=TaskRegistry(retention=60),
                      webhooks=WebhookSender(UrlFetcher(), attempts=1),
                      admission=Admission(per_connection=2, per_key=3))


async def start(runner: TaskRunner, kind: TaskType[Any, Any], task: schema.ModelSearch, replies: Replies,
                connection: object = "socket-1") -> asyncio.Task[None] | None:
    return await runner.start(task, kind, task.taskUUID, owner=OWNER, connection=connection, reply=replies)


async def test_a_sync_task_streams_each_item_and_is_recorded(runner: TaskRunner, caplog) -> None:
    replies, task = Replies(), search()
    with caplog.at_level(logging.INFO, logger="imagewire.task"):
        running = await start(runner, task_type(results(2)), task, replies)
        assert running is not None
        await asyncio.wait_for(running, seconds(10))
    assert [frame for frame, _ in replies.frames] == [[{"taskType": "modelSearch", "taskUUID": task.taskUUID,
                                                        "index": i}] for i in range(2)]
    record = await runner.registry.get(task.taskUUID, OWNER)
    assert record is not None and record.status == "success" and len(record.items) == 2
    assert runner.admission.unfinished() == 0
    [line] = [r.getMessage() for r in caplog.records if "outcome=" in r.getMessage()]
    assert f"taskUUID={task.taskUUID} taskType=modelSearch outcome=success results=2" in line


async def test_a_task_that_fails_its_checks_is_answered_at_once_and_not_recorded(runner: TaskRunner) -> None:
    def refuse(task: schema.ModelSearch, ctx: TaskContext) -> None:
        raise InvalidParameter("no such thing", parameter="search")

    replies, task = Replies(), search()
    assert await start(runner, task_type(results(1), prepare=refuse), task, replies) is None
    assert replies.errors == [{"code": "invalidParameter", "message": "no such thing", "parameter": "search",
                               "taskType": "modelSearch", "taskUUID": task.taskUUID}]
    assert await runner.registry.get(task.taskUUID, OWNER) is None
    assert runner.admission.unfinished() == 0


async def test_an_async_task_is_acknowledged_and_its_results_kept_not_sent(runner: TaskRunner) -> None:
    kind = task_type(results(2), delivery=lambda task: Delivery(asynchronous=True))
    replies, task = Replies(), search()
    running = await start(runner, kind, task, replies)
    assert running is not None
    await asyncio.wait_for(running, seconds(10))
    assert replies.frames == [([schema.Acknowledgement(taskType="modelSearch", taskUUID=task.taskUUID)], [])]
    record = await runner.registry.get(task.taskUUID, OWNER)
    assert record is not None and [item["index"] for item in record.items] == [0, 1]


async def test_a_reused_task_uuid_is_a_conflict(runner: TaskRunner) -> None:
    replies, task = Replies(), search()
    first = await start(runner, task_type(results(1)), task, replies)
    assert first is not None
    await first
    assert await start(runner, task_type(results(1)), task, replies) is None
    assert replies.errors[0]["code"] == "conflictTaskUUID"


async def test_admission_bounds_a_connection_and_a_key_and_gives_places_back(runner: TaskRunner) -> None:
    hold, replies = asyncio.Event(), Replies()
    kind = task_type(results(0, hold=hold))
    held = [await start(runner, kind, search(), replies, connection="socket-1") for _ in range(2)]
    assert await start(runner, kind, search(), replies, connection="socket-1") is None
    assert "This connection already has 2 unfinished tasks" in replies.errors[-1]["message"]
    held.append(await start(runner, kind, search(), replies, connection="socket-2"))
    assert await start(runner, kind, search(), replies, connection="socket-3") is None
    assert "This API key already has 3 unfinished tasks" in replies.errors[-1]["message"]
    hold.set()
    await asyncio.wait_for(asyncio.gather(*[task for task in held if task]), seconds(10))
    assert runner.admission.unfinished() == 0
    assert await start(runner, kind, search(), replies, connection="socket-1") is not None


async def test_a_single_frame_task_answers_once_with_its_items_and_error(runner: TaskRunner) -> None:
    kind = task_type(results(2, fail_with=InvalidParameter("half done")), single_frame=True, recorded=False)
    replies, task = Replies(), search()
    running = await start(runner, kind, task, replies)
    assert running is not None
    await running
    assert len(replies.frames) == 1
    data, errors = replies.frames[0]
    assert [item["index"] for item in data] == [0, 1] and errors[0]["message"] == "half done"


async def test_our_own_bug_is_an_internal_error_without_details(runner: TaskRunner) -> None:
    replies, task = Replies(), search()
    running = await start(runner, task_type(results(1, fail_with=KeyError("secret path"))), task, replies)
    assert running is not None
    await running
    assert replies.errors[0]["code"] == "internalServerError" and "secret" not in replies.errors[0]["message"]
    record = await runner.registry.get(task.taskUUID, OWNER)
    assert record is not None and record.status == "error"


async def test_a_task_cut_off_by_shutdown_is_told_so(runner: TaskRunner) -> None:
    replies, task = Replies(), search()
    running = await start(runner, task_type(results(1, hold=asyncio.Event())), task, replies)
    assert running is not None
    while not replies.data:
        await asyncio.sleep(0)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert replies.errors[0]["code"] == "serviceUnavailable" and "shut down" in replies.errors[0]["message"]
    assert runner.admission.unfinished() == 0 and not runner.running
