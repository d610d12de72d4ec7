"""The guard that keeps test traffic on this machine (tests/network_guard) is in force, here and in
the processes tests start."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.timing import seconds

# An address from TEST-NET-1 (RFC 5737): never routed, and never reached even if the guard failed open,
# since the attempt is refused before any packet is sent.
OUTSIDE = ("192.0.2.1", 80)


def test_connections_leave_only_for_loopback() -> None:
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError, match="loopback only"):
        sock.connect(OUTSIDE)
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client.connect(server.getsockname())


def test_no_name_but_localhost_is_looked_up() -> None:
    with pytest.raises(socket.gaierror, match="no host name but localhost"):
        socket.getaddrinfo("example.com", 443)
    assert socket.getaddrinfo("localhost", 80)
    assert socket.getaddrinfo("10.0.0.1", 80)  # a numeric address needs no name server


def test_child_processes_have_the_guard_too() -> None:
    probe = ("import socket\ntry:\n    socket.create_connection(('192.0.2.1', 80), timeout=1)\n"
             "except OSError as e:\n    print(e)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=seconds(60),
                            check=True)
    assert "loopback only" in result.stdout
