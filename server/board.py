"""The replicas' board (``--engine ray``): one small actor per Ray cluster where each replica posts its state and
each gateway reads all of them, and where gateways post the models they want on every replica (the default model,
``--preload``).

What a replica posts (``replica.Replica.state``): its name, process, node, loaded models, device memory, samplers it
cannot run, the jobs it holds, how many jobs per model it ran, the wanted models it loaded or failed to load. A
replica posts every ``BOARD_INTERVAL`` seconds and after each change (``POST_GAP`` apart at least); an entry not
posted again for ``BOARD_EXPIRY`` seconds is a replica that is gone, and reads leave it out.

The actor is a detached named actor in the ``imagewire`` namespace, created by the first process that asks for it
(``get_if_exists``): every gateway and replica of one cluster finds the same one, a gateway that leaves takes it
with it only when it started the cluster (and so stops it), and a cluster started with ``ray start`` keeps it for
the next gateways, as it keeps the Serve application. It asks for no CPU, so a node started with ``--num-cpus 0``
(a gateway's) may hold it, and Ray restarts it if its process dies: the replicas post again within
``BOARD_INTERVAL`` and the gateways post their wanted models again with each read.

This module imports Ray and the catalog's entries only (the actor's process imports it, and nothing heavier).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from imagewire.air_registry import ModelEntry

BOARD_NAME = "imagewire-board"
BOARD_NAMESPACE = "imagewire"
BOARD_INTERVAL = 2.0
# The fewest seconds between two posts of one replica: one that takes and ends a dozen jobs a second posts a few
# times a second, not at each change (each post is a call to this actor, on the replica's CPU), and gateways read
# the board only every second.
POST_GAP = 0.25
BOARD_EXPIRY = 10.0
CALL_TIMEOUT = 10.0   # seconds one call to the board may take before the caller says it failed and tries later


class Board:
    """The actor's class: the latest state of each replica with when it came, and the models gateways want."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[float, Mapping[str, Any]]] = {}
        self._wanted: dict[str, ModelEntry] = {}

    def post(self, state: Mapping[str, Any]) -> list[ModelEntry]:
        """A replica's state, replacing its last one; answers the models every replica should load."""
        self._states[state["name"]] = (time.monotonic(), state)
        return list(self._wanted.values())

    def remove(self, name: str) -> None:
        self._states.pop(name, None)

    def want(self, models: Iterable[ModelEntry]) -> None:
        """Models every replica should load (once each; the first gateway to want a model names its entry)."""
        for entry in models:
            self._wanted.setdefault(entry.air, entry)

    def wanted(self) -> list[ModelEntry]:
        return list(self._wanted.values())

    def read(self, wanted: Iterable[ModelEntry] = ()) -> list[Mapping[str, Any]]:
        """The states posted within ``BOARD_EXPIRY`` seconds, by replica name; ``wanted`` is noted first (a gateway
        sends its own with each read, so a board Ray restarted empty learns them again)."""
        self.want(wanted)
        horizon = time.monotonic() - BOARD_EXPIRY
        self._states = {name: posted for name, posted in self._states.items() if posted[0] >= horizon}
        return [state for _, state in sorted(self._states.values(), key=lambda posted: posted[1]["name"])]


def board_actor() -> ActorHandle:
    """The cluster's board (from a process connected to Ray): the one that exists, else a new one."""
    actor: ActorHandle = ray.remote(Board).options(  # type: ignore[assignment]
        name=BOARD_NAME, namespace=BOARD_NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, max_task_retries=-1).remote()
    return actor


def read_board(board: ActorHandle | None = None, wanted: Iterable[ModelEntry] = ()) -> list[Mapping[str, Any]]:
    """The replicas that posted within ``BOARD_EXPIRY`` seconds, sorted by name (from a process connected to Ray)."""
    board = board_actor() if board is None else board
    states: list[Mapping[str, Any]] = ray.get(board.read.remote(list(wanted)), timeout=CALL_TIMEOUT)
    return states
