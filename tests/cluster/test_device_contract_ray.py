"""The device contract (``tests/server/test_device_contract.py``) on ``RayDevice``: the same cases, on a Ray cluster
of this machine with one CPU replica whose device queue runs ``GateEngine`` (handed to the replica as its engine
factory; the replica's process holds and logs through the files the cases read). One cluster for the module.
Run with ``python -m pytest -m cluster tests/cluster/test_device_contract_ray.py``.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagewire.server.config import Config
from tests.server.test_device_contract import (  # noqa: F401 (the cases, collected here too)
    Bench,
    GateEngine,
    test_a_cancelled_running_job_leaves_its_batch_mates_running,
    test_a_cancelled_running_job_stops_its_call,
    test_a_cancelled_waiting_job_never_runs_and_ends_with_no_results,
    test_a_failing_job_leaves_its_batch_mates_their_own_answers,
    test_a_preload_that_fails_holds_why,
    test_a_preloaded_model_is_loaded_once_its_preload_is_done,
    test_events_come_in_order_queued_then_steps_then_results_then_the_end,
    test_jobs_of_one_owner_run_in_the_order_they_were_submitted,
    test_jobs_waiting_together_with_one_batch_key_share_a_call,
    until,
)
from tests.timing import seconds

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs pip install -e '.[cluster]'"),
]


@pytest.fixture(scope="module")
def ray_device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    from imagewire.server.cluster import RayDevice, given_engine

    folder = tmp_path_factory.mktemp("ray-device")
    # The local benches' settings: batches of up to four images, strict turn order.
    config = Config(engine="ray", device="cpu", data_dir=folder / "data", replicas=1, queue_size=16,
                    max_batch_size=4, max_passed_over=0, log_level="WARNING")
    device = RayDevice(config, [], engine_for=functools.partial(given_engine, functools.partial(GateEngine, folder)))
    with warnings.catch_warnings():
        # Ray Serve's models use pydantic features that pydantic 2 deprecates: its noise, on import.
        warnings.simplefilter("ignore", DeprecationWarning)
        device.start()
    try:
        yield device, folder
    finally:
        device.stop(timeout=seconds(30))


async def _bench(ray_device: tuple[Any, Path]) -> AsyncIterator[Bench]:
    device, folder = ray_device
    bench = Bench(device, folder, weights=folder / "unused", gated=True)
    try:
        yield bench
    finally:
        await bench.finish()
        # The replica lets go of a cancelled job once Serve's cancel reaches it: before the next case holds it.
        for watched in bench.watched:
            await bench.gone_from_device(watched)


@pytest.fixture
async def bench(ray_device: tuple[Any, Path]) -> AsyncIterator[Bench]:
    async for made in _bench(ray_device):
        yield made


@pytest.fixture
async def gated(ray_device: tuple[Any, Path]) -> AsyncIterator[Bench]:
    async for made in _bench(ray_device):
        yield made


async def test_the_device_is_busy_while_a_replica_holds_a_job(gated: Bench) -> None:
    bench = gated
    # Idle: no replica holds a job (as the board shows within a second of the last one's end).
    await until(lambda: not bench.device.busy, "idle")
    blocker = await bench.hold()
    assert bench.device.busy
    # Busy from the board too, not only from this gateway's own count: the replica says it holds the job.
    await until(lambda: any(blocker.job.task_uuid in state["jobs"] for state in bench.device.replicas), "on the board")
    bench.release()
    assert len(await blocker.results()) == 1
    await until(lambda: not bench.device.busy, "idle again")
