"""What the gateway and the replicas use of Ray: only its public, documented APIs, but for one workaround that this
file keeps honest. No Ray cluster here (Ray is imported, not started).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs pip install -e '.[cluster]'"),
]

SERVER = Path(__file__).resolve().parents[2] / "server"
# Ray's private modules, its internal key-value store, Serve's internal run, private arguments: none may be used,
# but for the one line that names the module ``keep_serve_on_loopback`` patches (its test is below).
PRIVATE = re.compile(r"\._private\b|internal_kv|serve\._run\b|\b_blocking\b|\b_run_many\b|\b_node_ip_address\b")
ALLOWED = {("replica.py", 'SERVE_REPLICA_MODULE = "ray.serve._private.replica"')}


def modules() -> tuple[ModuleType, ModuleType]:
    """Ours (``server/replica.py``) and Serve's replica module."""
    with warnings.catch_warnings():
        # Ray Serve's models use pydantic features that pydantic 2 deprecates: its noise, on import.
        warnings.simplefilter("ignore", DeprecationWarning)
        from imagewire.server import replica

        return replica, importlib.import_module(replica.SERVE_REPLICA_MODULE)


def test_the_server_uses_no_private_ray_api() -> None:
    found = [(path.name, line.strip()) for path in sorted(SERVER.rglob("*.py"))
             for line in path.read_text().splitlines() if PRIVATE.search(line)]
    assert [use for use in found if use not in ALLOWED] == []
    assert len(found) == len(ALLOWED)


def test_serve_still_binds_the_replicas_grpc_server_through_the_function_the_replica_patches() -> None:
    # Serve starts each replica's inter-deployment gRPC server on [::] through this function; the replica replaces
    # it to bind loopback instead (``keep_serve_on_loopback``). Should Ray move or rename it, or bind another way,
    # the replacement would do nothing and the server would listen on every interface: this fails first.
    replica, serve_replica = modules()
    bind = getattr(serve_replica, replica.SERVE_GRPC_BIND, None)
    assert callable(bind), f"{replica.SERVE_REPLICA_MODULE}.{replica.SERVE_GRPC_BIND} moved"
    source = inspect.getsource(serve_replica)
    binds = re.findall(r"(\w+)\([^()]*[\"']\[::\]:0[\"']\)", source)
    assert binds == [replica.SERVE_GRPC_BIND], binds
    assert not re.search(r"add_(insecure|secure)_port\(", source), "the replica binds a port another way"


def test_on_a_loopback_node_the_replicas_grpc_server_binds_the_nodes_address(monkeypatch: pytest.MonkeyPatch) -> None:
    replica, serve_replica = modules()
    import ray

    bound: list[str] = []

    def bind(_server: Any, address: str) -> int:
        bound.append(address)
        return 1234

    monkeypatch.setattr(serve_replica, replica.SERVE_GRPC_BIND, bind)
    # One of several nodes on one machine, each on a loopback address of its own.
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.2")
    replica.keep_serve_on_loopback()
    replica.keep_serve_on_loopback()   # a second replica in the same process: not wrapped twice
    assert getattr(serve_replica, replica.SERVE_GRPC_BIND)(object(), "[::]:0") == 1234
    assert bound == ["127.0.0.2:0"]
