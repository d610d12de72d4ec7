"""The device queue's order, without a server: API keys take turns, jobs whose models are loaded go first
within that order, and ``max_passed_over`` bounds how long any job is passed over for them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from imagewire.server.device import JobHandle, WorkQueue
from imagewire.tasks.jobs import Job


@dataclass(kw_only=True)
class ModelJob(Job):
    """A job on one model, alone in its call (the default batch key)."""

    model_air: str

    @property
    def models(self) -> tuple[str, ...]:
        return (self.model_air,)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    # Handles only need a loop to post to; these tests take jobs from the queue and post nothing.
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def queue_of(loop: asyncio.AbstractEventLoop, *jobs: tuple[str, str, str]) -> WorkQueue:
    """A queue holding ``(name, owner, model)`` jobs, put in that order."""
    queue = WorkQueue(100)
    for name, owner, model in jobs:
        assert queue.put_job(JobHandle(ModelJob(task_uuid=name, owner=owner, model_air=model), loop)) is not None
    return queue


def taken(queue: WorkQueue, ready: Callable[[Job], bool] | None, max_passed_over: int) -> list[str]:
    order = []
    while queue.jobs:
        order.append(queue.get(ready, max_passed_over).job.task_uuid)
    return order


def loaded(*airs: str) -> Callable[[Job], bool]:
    return lambda job: all(air in airs for air in job.models)


def test_keys_take_turns_when_every_model_is_loaded_or_the_bound_is_zero(loop):
    jobs = [("a1", "a", "x"), ("a2", "a", "x"), ("a3", "a", "x"), ("b1", "b", "y"), ("c1", "c", "x")]
    assert taken(queue_of(loop, *jobs), loaded("x", "y"), 4) == ["a1", "b1", "c1", "a2", "a3"]
    # A bound of 0 keeps strict turns whatever is loaded.
    assert taken(queue_of(loop, *jobs), loaded("y"), 0) == ["a1", "b1", "c1", "a2", "a3"]
    assert taken(queue_of(loop, *jobs), None, 4) == ["a1", "b1", "c1", "a2", "a3"]


def test_a_key_whose_job_needs_a_load_keeps_its_turn_while_loaded_jobs_go_first_up_to_the_bound(loop):
    # Key a's jobs need model x, which is not on the device; key b's need y, which is.
    jobs = [("a1", "a", "x"), ("a2", "a", "x"), ("b1", "b", "y"), ("b2", "b", "y"), ("b3", "b", "y")]
    # b1 and b2 go before a1 (passed over twice), then a1 has waited long enough; b3 goes before a2.
    assert taken(queue_of(loop, *jobs), loaded("y"), 2) == ["b1", "b2", "a1", "b3", "a2"]
    # With a bound of 1 each of a's jobs lets one loaded job go first.
    assert taken(queue_of(loop, *jobs), loaded("y"), 1) == ["b1", "a1", "b2", "b3", "a2"]


def test_within_one_keys_jobs_a_loaded_model_goes_first(loop):
    jobs = [("a1", "a", "x"), ("a2", "a", "y"), ("a3", "a", "x"), ("a4", "a", "y")]
    assert taken(queue_of(loop, *jobs), loaded("y"), 4) == ["a2", "a4", "a1", "a3"]


def test_no_job_is_passed_over_more_than_the_bound_however_many_loaded_jobs_arrive(loop):
    queue = queue_of(loop, ("a1", "a", "x"))
    order = []
    for index in range(6):  # a loaded job arrives before every take
        assert queue.put_job(JobHandle(ModelJob(task_uuid=f"b{index}", owner="b", model_air="y"), loop)) is not None
        order.append(queue.get(loaded("y"), 3).job.task_uuid)
    assert order.index("a1") == 3  # three jobs went before it, no more
    assert all(handle.passed_over <= 3 for handle in queue._in_turn_order())


def test_nothing_loaded_keeps_the_turn_order_and_passes_nobody_over(loop):
    queue = queue_of(loop, ("a1", "a", "x"), ("b1", "b", "y"), ("a2", "a", "x"))
    handles = queue._in_turn_order()
    assert taken(queue, loaded(), 2) == ["a1", "b1", "a2"]
    assert [handle.passed_over for handle in handles] == [0, 0, 0]


def test_a_cancelled_job_leaves_its_keys_line_and_the_turns_go_on(loop):
    queue = queue_of(loop, ("a1", "a", "x"), ("a2", "a", "x"), ("b1", "b", "y"))
    first = queue._in_turn_order()[0]
    assert queue.remove(first) and not queue.remove(first)
    assert taken(queue, loaded("x", "y"), 2) == ["a2", "b1"]
