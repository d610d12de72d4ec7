"""--engine ray over two Ray nodes: replicas on both, tasks served from both, and a node's death handled as a
replica's is.

The nodes are two ``ray start`` processes on this machine (``bench/ray_nodes.py``): a head at 127.0.0.2 and a
second node at 127.0.0.3 that joins it, each with its own temp dir, ports and custom resource, as two machines
would be. One gateway joins the head with --ray-address and deploys two CPU replicas on the tiny model; Serve
places them on both nodes. The replicas' board says which node each replica is on and how many jobs it ran.

Ray binds a node that is not at 127.0.0.1 to every interface (its GCS, raylets and workers listen on ``*``), and
refuses a second node at 127.0.0.1. So this test runs only in a network namespace of its own, where the only
interface is loopback and nothing outside can reach those ports; elsewhere it is skipped, and under
``IMAGEWIRE_REQUIRE_ISOLATED_NETWORK=1`` (as in CI) that fails it instead:

    unshare -rn sh -c 'ip link set lo up && python -m pytest -m cluster tests/cluster/test_multi_node.py'
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.ray_nodes import RayNode, cluster_environment
from tests.cluster.gateways import Cluster, Gateway
from tests.timing import seconds
from tests.wire import Wire, eventually, inference

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs pip install -e '.[cluster]'"),
    # 127.0.0.2 and 127.0.0.3 answer on Linux's loopback, not on macOS's without an alias.
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs loopback addresses past 127.0.0.1"),
]

# Each node could hold both replicas (one CPU each): they are on both because Serve spreads them.
CPUS_PER_NODE = 2
# A few seconds each on a quiet 2-core machine, several times that on a loaded one: the second node holds two of
# them (one running, one waiting) when it is killed; the head's replica then runs its own two and the dead node's.
SLOW = {"steps": 30, "width": 256, "height": 256}


def only_loopback() -> bool:
    """Whether this process's network namespace has no interface but loopback (``unshare -rn``)."""
    return all(name == "lo" for _, name in socket.if_nameindex())


@pytest.fixture(scope="module", autouse=True)
def isolated_network() -> None:
    if only_loopback():
        return
    why = ("two Ray nodes listen on every interface: run this test in a network namespace of its own, "
           "unshare -rn sh -c 'ip link set lo up && python -m pytest -m cluster tests/cluster/test_multi_node.py'")
    if os.environ.get("IMAGEWIRE_REQUIRE_ISOLATED_NETWORK") == "1":
        pytest.fail("IMAGEWIRE_REQUIRE_ISOLATED_NETWORK=1 but " + why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[RayNode, RayNode, dict[str, str]]]:
    environment = cluster_environment()
    # A short path: Ray's sockets live under it, and a socket's path has at most 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="iw-nodes-"))
    head = RayNode("a", 0, root, environment, cpus=CPUS_PER_NODE)
    try:
        second = RayNode("b", 1, root, environment, cpus=CPUS_PER_NODE, head=head)
    except BaseException:
        head.stop()
        raise
    yield head, second, environment
    second.stop()
    head.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(nodes: tuple[RayNode, RayNode, dict[str, str]], module_data_dir: Path) -> Iterator[Cluster]:
    head, _, environment = nodes
    # One job per replica at a time and one waiting: a few tasks at once keep both replicas busy.
    gateway = Gateway(module_data_dir, "--ray-address", head.gcs_address, "--replicas", "2",
                      "--max-batch-size", "1", "--log-level", "INFO", env=environment)
    yield Cluster((gateway,), head.gcs_address, env=environment)
    gateway.stop()


def jobs_by_node(board: list[dict]) -> dict[str, int]:
    """Node address → jobs its replicas ran."""
    found: dict[str, int] = {}
    for replica in board:
        found[replica["node"]] = found.get(replica["node"], 0) + sum(replica["runs"].values())
    return found


class Answers:
    """Every item a connection receives, by taskUUID, read as it comes."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.items: dict[str, list[dict]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.wire.receive(timeout=seconds(600))
            for item in message.get("data", []) + message.get("errors", []):
                self.items.setdefault(item["taskUUID"], []).append(item)

    async def wait_for(self, task_uuids: list[str], gateway: Gateway, timeout: float) -> None:
        try:
            await eventually(lambda: all(uuid in self.items for uuid in task_uuids) or self._reader.done(),
                             timeout=timeout)
        except AssertionError:
            unanswered = [uuid for uuid in task_uuids if uuid not in self.items]
            raise AssertionError(f"unanswered after {timeout:g} s: {unanswered}\n{gateway.log[-8000:]}") from None
        if self._reader.done():
            self._reader.result()

    def close(self) -> None:
        self._reader.cancel()


async def test_the_replicas_run_on_both_nodes(cluster: Cluster, nodes: tuple[RayNode, RayNode, dict]) -> None:
    head, second, _ = nodes
    board = await eventually(lambda: len(board := cluster.board()) == 2 and board, timeout=seconds(120))
    assert {replica["node"] for replica in board} == {head.address, second.address}, board
    assert len({replica["node_id"] for replica in board}) == 2, board


async def test_tasks_are_served_from_both_nodes(cluster: Cluster, nodes: tuple[RayNode, RayNode, dict]) -> None:
    head, second, _ = nodes
    before = jobs_by_node(cluster.board())
    wire = await Wire.open(cluster.gateways[0].url)
    answers = Answers(wire)
    try:
        tasks = [inference(seed=seed) for seed in range(8)]
        await wire.send(tasks)
        await answers.wait_for([task["taskUUID"] for task in tasks], cluster.gateways[0], seconds(300))
    finally:
        answers.close()
        await wire.close()
    assert all(len(items) == 1 and "imageUUID" in items[0] for items in answers.items.values()), answers.items

    def counted() -> dict[str, int] | None:
        # A replica writes its runs to the board within two seconds of a job's end.
        after = jobs_by_node(cluster.board())
        ran = {node: after.get(node, 0) - before.get(node, 0) for node in (head.address, second.address)}
        return ran if sum(ran.values()) == len(tasks) else None

    ran = await eventually(counted, timeout=seconds(60))
    assert all(ran.values()), ran


async def test_a_node_dying_mid_job_still_answers_its_tasks(cluster: Cluster,
                                                            nodes: tuple[RayNode, RayNode, dict]) -> None:
    head, second, _ = nodes
    gateway = cluster.gateways[0]
    wire = await Wire.open(gateway.url)
    answers = Answers(wire)
    # The replica logs each job it takes, and the gateway's log has the replicas' lines: seen there at once,
    # where the board would take a Ray driver's start to read.
    on_the_second_node = [replica["name"] for replica in cluster.board() if replica["node"] == second.address]
    assert len(on_the_second_node) == 1
    try:
        # Two on each replica: one running, one waiting on it. Serve's router chooses the replica of each, and
        # may give a burst to one: more are sent, a few at a time, until the second node's replica has one.
        slow: list[dict] = []
        for round_ in range(4):
            more = [inference(seed=100 + len(slow) + seed, **SLOW) for seed in range(4 if round_ == 0 else 2)]
            slow += more
            await wire.send(more)
            taken = [f"taskUUID={task['taskUUID']} on replica {on_the_second_node[0]}" for task in slow]
            with contextlib.suppress(AssertionError):
                await eventually(lambda taken=taken: any(line in gateway.log for line in taken), timeout=seconds(40))
                break
        else:
            raise AssertionError(f"the second node's replica took none of {len(slow)} tasks; board "
                                 f"{cluster.board()}; gateway log:\n{gateway.log[-6000:]}")
        second.kill()
        await answers.wait_for([task["taskUUID"] for task in slow], gateway, seconds(300))

        # The cluster serves on: the head's replica takes what comes.
        after = [inference(seed=200 + seed) for seed in range(2)]
        await wire.send(after)
        await answers.wait_for([task["taskUUID"] for task in after], gateway, seconds(300))
    finally:
        answers.close()
        await wire.close()
    # Every task answered once, with its image: those the dead node held were sent again, to the head's replica.
    wrong = {uuid: items for uuid, items in answers.items.items() if len(items) != 1 or "imageUUID" not in items[0]}
    assert not wrong, (wrong, gateway.log[-6000:])
    assert len(answers.items) == len(slow) + len(after)
    # The dead node's jobs (the one running there, and the one waiting unless it had started already) went once
    # more; none failed a second time.
    stopped = [line for line in gateway.log.splitlines() if "its replica stopped" in line]
    assert 1 <= len(stopped) <= 2, gateway.log[-6000:]
    assert all(line.endswith("before any image; trying another replica") for line in stopped), stopped

    def on_the_head_only() -> list[dict] | None:
        board = cluster.board()
        return board if board and {replica["node"] for replica in board} == {head.address} else None

    # The dead node's replica leaves the board once its entry is stale (ten seconds).
    await eventually(on_the_head_only, timeout=seconds(120))
