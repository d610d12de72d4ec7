"""The replicas' board (``server/board.py``) and what a gateway makes of it (``server/cluster.py`` ``RayDevice``):
preloads done when every replica loaded the model, ``busy`` while a replica holds jobs, each replica's figures in
/metrics. No Ray cluster here: the board is its plain class, and the gateway's reads are what the test says.
The cases on a real cluster are in test_device_contract_ray.py and test_ray_engine.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from concurrent.futures import Future
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imagewire.air_registry import Catalog
from imagewire.server.config import Config
from imagewire.server.metrics import Metrics, State

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs pip install -e '.[cluster]'"),
]

TINY = Catalog.load().resolve("imagewire:tiny@1")
OTHER = dataclasses.replace(TINY, air="test:other@1")


def state(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "node_id": f"node-of-{name}", "jobs": {}, "pending": 0, "loaded_models": {},
            "device_memory": {}, "preloaded": [], "preload_errors": {}, "device_busy_ratio": 0.0, **fields}


def test_the_board_answers_the_replicas_that_posted_lately_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from imagewire.server import board as board_module

    now = [1000.0]
    monkeypatch.setattr(board_module.time, "monotonic", lambda: now[0])
    board = board_module.Board()
    board.post(state("b"))
    now[0] += board_module.BOARD_EXPIRY - 1
    board.post(state("a"))
    assert [posted["name"] for posted in board.read()] == ["a", "b"]
    now[0] += 2   # b's last post is older than the expiry now: gone
    assert [posted["name"] for posted in board.read()] == ["a"]
    board.remove("a")
    assert board.read() == []


def test_the_board_keeps_the_models_gateways_want_and_answers_them_to_each_post() -> None:
    from imagewire.server.board import Board

    board = Board()
    assert board.post(state("a")) == []
    board.want([TINY])
    board.read(wanted=[OTHER, TINY])   # a gateway sends its own with each read: each is kept once
    assert [entry.air for entry in board.post(state("a"))] == [TINY.air, OTHER.air]
    assert [entry.air for entry in board.wanted()] == [TINY.air, OTHER.air]


def device(**settings: Any) -> Any:
    from imagewire.server.cluster import RayDevice

    config = Config(**{"engine": "ray", "device": "cpu", "replica_wait": 0.0, **settings})
    return RayDevice(config, [], engine_for=lambda _: None)  # type: ignore[arg-type,return-value]


def saw(ray_device: Any, *states: dict[str, Any]) -> None:
    """A read of the board by the gateway's reader."""
    ray_device._saw_board(list(states))
    ray_device._settle_preloads()


def test_a_preload_is_done_once_every_replica_on_the_board_loaded_the_model() -> None:
    ray_device = device()
    done: Future[None] = ray_device.preload(OTHER)
    assert OTHER.air in ray_device._wanted   # sent with the next read
    saw(ray_device, state("a", preloaded=[OTHER.air]), state("b"))
    assert not done.done()
    saw(ray_device, state("a", preloaded=[OTHER.air]), state("b", preloaded=[TINY.air, OTHER.air]))
    assert done.result(timeout=0) is None


def test_a_preload_fails_with_the_reason_of_the_replica_that_could_not_load_it() -> None:
    from imagewire.server.cluster import ReplicaError

    ray_device = device()
    done = ray_device.preload(OTHER)
    saw(ray_device, state("a", preloaded=[OTHER.air]), state("b", preload_errors={OTHER.air: "OSError: no weights"}))
    with pytest.raises(ReplicaError, match=r"^OSError: no weights \(on replica b\)$"):
        done.result(timeout=0)


def test_with_no_replica_a_preload_waits_for_one_unless_the_cluster_scales_from_zero() -> None:
    from imagewire.tasks.errors import ServiceUnavailable

    fixed = device(replica_wait=60.0)
    waiting = fixed.preload(OTHER)
    saw(fixed)
    assert not waiting.done()
    # Replicas that started since load it before they take jobs: they come with it.
    saw(fixed, state("a", preloaded=[OTHER.air]))
    assert waiting.result(timeout=0) is None
    # A fixed cluster with no replica for --replica-wait: the preload fails, as a job would.
    stranded = device(replica_wait=0.0)
    failing = stranded.preload(OTHER)
    saw(stranded)
    with pytest.raises(ServiceUnavailable, match="no replica ran for 0 s"):
        failing.result(timeout=0)
    # Autoscaling from zero: nothing to load it on now; the replica that starts loads it first.
    scaling = device(min_replicas=0, max_replicas=2)
    done = scaling.preload(OTHER)
    saw(scaling)
    assert done.result(timeout=0) is None


def test_the_device_is_busy_while_a_replica_on_the_board_holds_jobs() -> None:
    ray_device = device()
    saw(ray_device, state("a"), state("b"))
    assert not ray_device.busy
    saw(ray_device, state("a"), state("b", jobs={"another-gateways-task": ""}, pending=1))
    assert ray_device.busy
    saw(ray_device, state("a"), state("b"))
    assert not ray_device.busy


def test_metrics_show_each_replicas_figures() -> None:
    replicas = [state("a", jobs={"t1": "m", "t2": "m", "t3": "m"}, pending=2, loaded_models={"m:1@1": "device",
                                                                                             "m:2@1": "ram"},
                      device_memory={"allocated": 5}, device_busy_ratio=0.5),
                state("b")]
    metrics = Metrics(State(queue_depth=lambda: 0, loaded_models=lambda: [], device_memory=lambda: {},
                            connections=lambda: 0, sessions=lambda: 0, ready=lambda: True,
                            replicas=lambda: replicas), max_batch_size=1)
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(metrics.exposition().decode())
               for sample in family.samples}
    a = (("node", "node-of-a"), ("replica", "a"))
    assert samples[("imagewire_replicas", ())] == 2
    assert samples[("imagewire_replica_queue_depth", a)] == 2
    assert samples[("imagewire_replica_running_jobs", a)] == 1
    assert samples[("imagewire_replica_device_busy_ratio", a)] == 0.5
    assert samples[("imagewire_replica_loaded_models", (("air", "m:1@1"), *a))] == 1
    assert ("imagewire_replica_loaded_models", (("air", "m:2@1"), *a)) not in samples   # in RAM, not on the device
    assert samples[("imagewire_replica_device_memory_bytes", (("kind", "allocated"), *a))] == 5
    assert samples[("imagewire_replica_queue_depth", (("node", "node-of-b"), ("replica", "b")))] == 0


def test_without_replicas_metrics_show_no_replica_figures() -> None:
    metrics = Metrics(State(queue_depth=lambda: 0, loaded_models=lambda: [], device_memory=lambda: {},
                            connections=lambda: 0, sessions=lambda: 0, ready=lambda: True), max_batch_size=1)
    assert b"imagewire_replica" not in metrics.exposition()
