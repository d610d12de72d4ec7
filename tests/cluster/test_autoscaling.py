"""--min-replicas / --max-replicas: a backlog on one replica brings a second one up, and every task is answered.

A cluster of its own (one gateway, autoscaling between one and two CPU replicas, one job per replica at a time):
the other module's replicas are a fixed count.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator

import pytest

from tests.cluster.gateways import JOIN, Cluster, Gateway
from tests.timing import seconds
from tests.wire import Wire, eventually, inference

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs pip install -e '.[cluster]'"),
]

# About ten seconds each on a 2-core machine: eight of them keep one replica busy well past Serve's upscale delay
# (30 s) and the new replica's start.
BACKLOG = [{"steps": 100, "width": 256, "height": 256, "seed": seed} for seed in range(8)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    gateway = Gateway(tmp_path_factory.mktemp("autoscaling"), "--min-replicas", "1", "--max-replicas", "2",
                      "--max-batch-size", "1", "--log-level", "INFO")
    joined = JOIN.search(gateway.log)
    assert joined, gateway.log[-4000:]
    yield Cluster((gateway,), joined.group(1))
    gateway.stop()


async def test_a_backlog_on_one_replica_brings_up_a_second_and_every_task_is_answered(cluster: Cluster) -> None:
    async def replicas() -> int:
        return len(await asyncio.to_thread(cluster.board))  # each replica writes itself there every 2 s

    await eventually(lambda: replicas(), timeout=seconds(60))
    assert await replicas() == 1
    wire = await Wire.open(cluster.gateways[0].url)
    tasks = [inference(**fields) for fields in BACKLOG]
    try:
        await wire.send(tasks)

        async def two_replicas() -> bool:
            return await replicas() == 2

        await eventually(two_replicas, timeout=seconds(300))
        answers = await wire.answers({task["taskUUID"]: 1 for task in tasks}, timeout=seconds(600))
    finally:
        await wire.close()
    assert all(len(data) == 1 and not errors for data, errors in answers.values()), answers
    # Both replicas took some of the backlog: the second one came up to work, not only to exist.
    ran = [sum(replica["runs"].values()) for replica in await asyncio.to_thread(cluster.board)]
    assert len(ran) == 2 and all(ran), ran
