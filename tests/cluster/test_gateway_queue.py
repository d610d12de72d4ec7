"""The gateway's own queue (``server/cluster.py`` ``RayDevice``): jobs wait there, in turn, and go to Serve only while
the replicas have room, so a backlog never times out; only a cluster without replicas does, after --replica-wait.

No Ray cluster here: the device's Serve handle is a stand-in whose calls the test runs, and the board is what the
test says it is. The cases on a real cluster are in test_ray_engine.py and test_autoscaling.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from imagewire.server.config import Config
from imagewire.tasks.errors import ServiceUnavailable
from imagewire.tasks.jobs import Failed, Finished, Job, Queued, Results

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs pip install -e '.[cluster]'"),
]

if importlib.util.find_spec("ray") is not None:
    with warnings.catch_warnings():
        # What the gateway imports when it hands a job over, once: Ray Serve's models use pydantic features that
        # pydantic 2 deprecates, and say so on import.
        warnings.simplefilter("ignore", DeprecationWarning)
        import ray.serve.exceptions  # noqa: F401


@dataclass(eq=False)
class Call:
    """One job handed to Serve: it runs when the test lets it (``finish``), as a replica would."""

    job: Job
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False

    def finish(self) -> None:
        self.done.set()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._events()

    async def _events(self) -> AsyncIterator[Any]:
        yield [Queued(0)]
        await self.done.wait()
        yield [Results([self.job.task_uuid]), Finished(0.0, 0.1, 0.1)]

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    """Serve's deployment handle, as the gateway uses it: ``options(...).run.remote(job)`` streams a call."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.run = self

    def options(self, **_: Any) -> Handle:
        return self

    def remote(self, job: Job) -> Call:
        call = Call(job)
        self.calls.append(call)
        return call

    @property
    def open(self) -> list[Call]:
        return [call for call in self.calls if not call.done.is_set() and not call.cancelled]


def replica(name: str, jobs: int = 0, models: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "jobs": {f"{name}-{n}": "" for n in range(jobs)}, "loaded_models": models or {}}


def device(**settings: Any) -> tuple[Any, Handle]:
    from imagewire.server.cluster import RayDevice

    config = Config(**{"engine": "ray", "device": "cpu", "max_batch_size": 1, "queue_size": 8, "max_passed_over": 0,
                       **settings})
    made = RayDevice(config, [], engine_for=lambda _: None)  # type: ignore[arg-type,return-value]
    handle = Handle()
    made._handle, made._accepting = handle, True
    return made, handle


def quiet(ray_device: Any) -> None:
    """The end of a case: its device's dispatcher stops (``stop`` would also let go of Ray)."""
    ray_device._dispatcher.cancel()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def outcome(running: Any) -> list[Any]:
    return [event async for event in running.events() if not isinstance(event, Queued)]


async def test_a_backlog_longer_than_the_replica_wait_is_answered_in_full_without_overfilling_the_replica() -> None:
    ray_device, handle = device(replica_wait=0.3)
    ray_device._saw_board([replica("a")])
    jobs = [ray_device.submit(Job(task_uuid=f"task-{n}")) for n in range(6)]
    outcomes = [asyncio.ensure_future(outcome(job)) for job in jobs]
    most_at_once = 0
    while len(handle.calls) < 6 or handle.open:
        await settle()
        most_at_once = max(most_at_once, len(handle.open))
        await asyncio.sleep(0.15)  # each job takes longer than the wait bound, the backlog five times longer
        if handle.open:
            handle.open[0].finish()
    ends = await asyncio.gather(*outcomes)
    assert [type(event) for events in ends for event in events] == [Results, Finished] * 6, ends
    # One replica takes a running job and a waiting one; the rest waited at the gateway.
    assert most_at_once == ray_device.slots == 2
    quiet(ray_device)


async def test_jobs_go_to_serve_as_replicas_have_room_and_a_new_replica_takes_more() -> None:
    ray_device, handle = device()
    ray_device._saw_board([replica("a", jobs=1)])  # a job of another gateway holds one of its two places
    for n in range(5):
        ray_device.submit(Job(task_uuid=f"task-{n}"))
    await settle()
    assert [call.job.task_uuid for call in handle.calls] == ["task-0"]
    assert ray_device.pending == 5
    ray_device._saw_board([{**replica("a", jobs=1), "jobs": {"a-0": "", "task-0": ""}}, replica("b")])
    await settle()
    assert len(handle.calls) == 3
    handle.calls[0].finish()
    await settle()
    # The board still shows task-0 on "a": this gateway's own count says its place came free.
    assert len(handle.calls) == 4
    assert ray_device.pending == 4  # three handed over and not started (the stand-in sends no step), one here
    quiet(ray_device)


async def test_keys_take_turns_in_the_gateway_queue() -> None:
    ray_device, handle = device()
    ray_device._saw_board([replica("a", jobs=2)])
    for n in range(3):
        ray_device.submit(Job(task_uuid=f"first-{n}", owner="first"))
    ray_device.submit(Job(task_uuid="second-0", owner="second"))
    await settle()
    assert handle.calls == []
    ray_device._saw_board([replica("a")])
    await settle()
    assert [call.job.task_uuid for call in handle.calls] == ["first-0", "second-0"]
    quiet(ray_device)


async def test_a_job_whose_model_a_free_replica_holds_goes_first() -> None:
    from imagewire.air_registry import Catalog, ModelEntry

    ray_device, handle = device(max_passed_over=4)
    ray_device._saw_board([replica("a", jobs=2), replica("b", jobs=1, models={"m:2@1": "device"})])

    @dataclass(kw_only=True)
    class ModelJob(Job):
        model: ModelEntry | None = None

    tiny = Catalog.load().resolve("imagewire:tiny@1")

    def entry(air: str) -> ModelEntry:
        return dataclasses.replace(tiny, air=air)

    ray_device.submit(ModelJob(task_uuid="cold", owner="one", model=entry("m:1@1")))
    ray_device.submit(ModelJob(task_uuid="warm", owner="two", model=entry("m:2@1")))
    await settle()
    assert [call.job.task_uuid for call in handle.calls] == ["warm"]
    quiet(ray_device)


async def test_a_cancelled_job_leaves_the_gateway_queue_and_never_reaches_serve() -> None:
    ray_device, handle = device()
    ray_device._saw_board([replica("a", jobs=2)])
    waiting = ray_device.submit(Job(task_uuid="cancelled"))
    ray_device.submit(Job(task_uuid="kept"))
    waiting.cancel()
    assert [type(event) for event in await outcome(waiting)] == [Finished]
    ray_device._saw_board([replica("a")])
    await settle()
    assert [call.job.task_uuid for call in handle.calls] == ["kept"]
    quiet(ray_device)


async def test_with_no_replica_for_the_replica_wait_a_waiting_job_answers_service_unavailable() -> None:
    ray_device, handle = device(replica_wait=0.3)
    ray_device._saw_board([])
    waiting = ray_device.submit(Job(task_uuid="stranded"))
    await asyncio.sleep(0.1)
    ray_device._saw_board([])
    await settle()
    assert ray_device.pending == 1  # not yet: the bound counts from its submission
    await asyncio.sleep(0.3)
    ray_device._saw_board([])
    events = await asyncio.wait_for(outcome(waiting), 5)
    assert len(events) == 1 and isinstance(events[0], Failed), events
    error = events[0].error
    assert isinstance(error, ServiceUnavailable) and "No worker was running for 0.3 s" in error.message, error
    assert handle.calls == []
    quiet(ray_device)


async def test_when_autoscaling_from_zero_a_job_goes_to_serve_to_start_a_replica() -> None:
    ray_device, handle = device(min_replicas=0, max_replicas=2)
    ray_device._saw_board([])
    ray_device.submit(Job(task_uuid="wakes-it"))
    await settle()
    assert [call.job.task_uuid for call in handle.calls] == ["wakes-it"]
    quiet(ray_device)
