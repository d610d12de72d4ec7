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

# About three seconds each on a quiet 2-core machine.
SLOW = {"steps": 30, "width": 256, "height": 256}
# Jobs kept unanswered while one replica runs: one running and one waiting on it (its places), four more waiting
# in the gateway's queue. Serve scales up once a replica's ongoing requests stay above target for its upscale
# delay (30 s).
BACKLOG = 6


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
    sent: list[str] = []
    answers: dict[str, list[dict]] = {}

    async def read() -> None:
        while True:
            message = await wire.receive(timeout=seconds(600))
            for item in message.get("data", []) + message.get("errors", []):
                answers.setdefault(item["taskUUID"], []).append(item)

    async def send(count: int) -> None:
        if count <= 0:
            return
        tasks = [inference(**SLOW, seed=len(sent) + n) for n in range(count)]
        sent.extend(task["taskUUID"] for task in tasks)
        await wire.send(tasks)

    reader = asyncio.create_task(read())
    loop = asyncio.get_running_loop()
    try:
        # The backlog is kept full until the second replica exists, however fast this machine runs the jobs:
        # a fixed number of them could all be answered before Serve's upscale delay is over.
        deadline = loop.time() + seconds(300)
        while await replicas() < 2:
            assert loop.time() < deadline, f"still one replica after {len(sent)} jobs"
            assert not reader.done(), reader
            await send(BACKLOG - (len(sent) - len(answers)))
            await asyncio.sleep(0.5)
        # One more backlog once it is there: the new replica must take some of it.
        await send(BACKLOG)
        try:
            await eventually(lambda: len(answers) == len(sent) or reader.done(), timeout=seconds(600))
        except AssertionError:
            raise AssertionError(f"{len(answers)} of {len(sent)} answered\n{cluster.gateways[0].log[-6000:]}") from None
    finally:
        reader.cancel()
        await wire.close()
    assert len(answers) == len(sent), reader
    wrong = {uuid: items for uuid, items in answers.items() if len(items) != 1 or "imageUUID" not in items[0]}
    assert not wrong, (wrong, cluster.gateways[0].log[-6000:])
    # Both replicas ran some of the jobs: the second one came up to work, not only to exist.
    ran = [sum(replica["runs"].values()) for replica in await asyncio.to_thread(cluster.board)]
    assert len(ran) == 2 and all(ran) and sum(ran) == len(sent), ran
