"""A CPU replica sets torch's threads as a one-process server does (``replica.use_the_gateways_threads``): Ray
sets ``OMP_NUM_THREADS`` to a CPU actor's ``num_cpus`` when it is unset, which the engine would take for the
operator's choice and keep a replica on one thread whatever the machine has."""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

import pytest

from imagewire.server.config import THREADS_VARIABLE

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs pip install -e '.[cluster]'"),
]


@pytest.fixture
def use_the_gateways_threads() -> Any:
    with warnings.catch_warnings():
        # Ray Serve's models use pydantic features that pydantic 2 deprecates: its noise, on import.
        warnings.simplefilter("ignore", DeprecationWarning)
        from imagewire.server.replica import use_the_gateways_threads
    return use_the_gateways_threads


def test_a_replica_drops_the_thread_count_ray_set_when_the_gateway_set_none(monkeypatch: pytest.MonkeyPatch,
                                                                       use_the_gateways_threads: Any) -> None:
    from imagewire.server.engine.threads import leaves_threads_alone

    monkeypatch.setenv(THREADS_VARIABLE, "1")  # what Ray sets in a replica's process (num_cpus=1)
    assert leaves_threads_alone("cpu")
    use_the_gateways_threads(None)
    assert THREADS_VARIABLE not in os.environ
    assert not leaves_threads_alone("cpu")  # the engine chooses, as in a one-process server


def test_a_replica_takes_the_thread_count_the_gateways_operator_set(monkeypatch: pytest.MonkeyPatch,
                                                                       use_the_gateways_threads: Any) -> None:
    from imagewire.server.engine.threads import leaves_threads_alone

    monkeypatch.setenv(THREADS_VARIABLE, "1")
    use_the_gateways_threads("3")
    assert os.environ[THREADS_VARIABLE] == "3"
    assert leaves_threads_alone("cpu")
