"""Keeps a process's network traffic on this machine: connections go to loopback addresses only, and
no host name but ``localhost`` is looked up (a lookup is itself traffic, to a name server).

The test session installs it in its own process (tests/conftest.py); a child process gets it by
having this folder on its PYTHONPATH (Python imports ``sitecustomize`` at start). A blocked attempt
raises ConnectionRefusedError or socket.gaierror naming the address, so a test that reaches out fails
loudly instead of sending anything.
"""

from __future__ import annotations

import ipaddress
import socket

_LOCAL_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _is_loopback(host: object) -> bool:
    if not isinstance(host, str):
        return False
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _check(sock: socket.socket, address: object) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0] if isinstance(address, tuple) else address
        if not _is_loopback(host):
            raise ConnectionRefusedError(f"the test network guard allows loopback only, not {host!r}")


def _connect(self: socket.socket, address: object) -> None:
    _check(self, address)
    _real_connect(self, address)


def _connect_ex(self: socket.socket, address: object) -> int:
    _check(self, address)
    return _real_connect_ex(self, address)


def _getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
    if host is not None and not (isinstance(host, bytes | str) and (
            _as_text(host).lower() in _LOCAL_NAMES or _is_numeric(_as_text(host)))):
        raise socket.gaierror(socket.EAI_NONAME, f"the test network guard looks up no host name but localhost: "
                                                 f"{host!r}")
    return _real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]


def _as_text(host: bytes | str) -> str:
    return host.decode() if isinstance(host, bytes) else host


def _is_numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0].strip("[]"))
    except ValueError:
        return False
    return True


def install() -> None:
    socket.socket.connect = _connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = _getaddrinfo  # type: ignore[assignment]


install()
