"""One CPU replica on the real engine beside this process's own device queue on the same engine (``--engine
local``), and the replica's messages as the gateway receives them: what the replica tests compare
(``test_replica_messages.py``, ``test_replica_store.py``)."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from imagewire.server.app import diffusers_engine_factory
from imagewire.server.config import Config
from imagewire.server.device import DeviceQueue
from imagewire.tasks.jobs import DeviceEvent
from tests.timing import seconds


@contextlib.contextmanager
def ray_beside_local(config: Config) -> Iterator[tuple[Any, DeviceQueue]]:
    """A started ``RayDevice`` with ``config`` (one replica) and a started local device queue with the same
    settings; both stopped on leaving."""
    from imagewire.server.cluster import RayDevice

    ray_device = RayDevice(config, [], engine_for=diffusers_engine_factory)
    local = DeviceQueue(diffusers_engine_factory(dataclasses.replace(config, engine="local")),
                        queue_size=config.queue_size, max_batch_size=config.max_batch_size,
                        max_passed_over=config.max_passed_over)
    with warnings.catch_warnings():
        # Ray Serve's models use pydantic features that pydantic 2 deprecates: its noise, on import.
        warnings.simplefilter("ignore", DeprecationWarning)
        ray_device.start()
    local.start()
    try:
        yield ray_device, local
    finally:
        local.stop(timeout=seconds(30))
        ray_device.stop(timeout=seconds(30))


def record_messages(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[DeviceEvent]]]:
    """Each job's messages from its replica, as the gateway receives them (``RayDevice._batches``), by taskUUID,
    from now on."""
    from imagewire.server.cluster import RayDevice

    received: dict[str, list[list[DeviceEvent]]] = {}
    receive = RayDevice._batches

    async def recording(self: Any, stream: Any, remote: Any) -> AsyncIterator[list[DeviceEvent]]:
        async for batch in receive(self, stream, remote):
            received.setdefault(remote.job.task_uuid, []).append(batch)
            yield batch

    monkeypatch.setattr(RayDevice, "_batches", recording)
    return received
