"""Ray nodes of a cluster on this one machine, each its own ``ray start --block`` process: a head and nodes
that join it, as on several machines, for the multi-node test and benchmark (docs/cluster.md, "Replicas on
several nodes").

Each node has its own loopback address (127.0.0.2 for the head, 127.0.0.3, … for the others), its own temp dir
and its own free ports, so that its processes are told apart from another cluster's on the machine and no two
nodes ask for the same port. Not 127.0.0.1: Ray 2.60 takes that address as "this machine" and puts its outward
address in its place unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and with that variable ``ray start``
refuses to join a node to a head. Other loopback addresses are kept as given, so every connection between the
nodes stays on loopback; Ray then listens on every interface (it binds to loopback only for a node at 127.0.0.1),
so the cluster asks for a token of its own (``RAY_AUTH_TOKEN``), which every process that joins it is given.

A node's processes are the ``ray start`` process and its descendants (GCS, raylet, agents, workers, replicas):
``stop`` ends them as ``ray stop`` would, ``kill`` all at once with SIGKILL, as a machine that loses power.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

STARTED = "Ray runtime started"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0   # a node drains for up to 30 s on SIGTERM before it stops its processes


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now (held together while chosen, so that they differ)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def cluster_environment() -> dict[str, str]:
    """What every process of one cluster shares: a token of its own, asked for by every node."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> dict[int, int]:
    """``pid`` and every process below it, each with its start time (a pid may be reused once it ended)."""
    stats = {int(entry.name): _stat(int(entry.name)) for entry in Path("/proc").iterdir() if entry.name.isdigit()}
    found = {pid: stats[pid][1]} if stats.get(pid) else {}
    grew = bool(found)
    while grew:
        grew = False
        for child, stat in stats.items():
            if stat is not None and stat[0] in found and child not in found:
                found[child] = stat[1]
                grew = True
    return found


def kill_still_running(processes: Mapping[int, int]) -> None:
    """SIGKILL those of ``processes`` (pid → start time) that still run: the same processes, not reused pids."""
    for pid, started in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class RayNode:
    """One node: ``ray start --block`` with its own address, temp dir, ports and custom resource."""

    def __init__(self, name: str, index: int, temp_root: Path, environment: Mapping[str, str], *, cpus: int,
                 head: RayNode | None = None) -> None:
        self.name = name
        self.address = f"127.0.0.{2 + index}"
        self.temp_dir = temp_root / name
        self.head = head
        self.port = 0
        self.log_path = temp_root / f"{name}.log"
        ports = free_ports(10)
        environ = {key: value for key, value in os.environ.items() if key != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        environ.update(environment)
        command = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", self.address,
            "--num-cpus", str(cpus), "--resources", f'{{"imagewire_node_{name}": 1}}',
            "--temp-dir", str(self.temp_dir), "--disable-usage-stats",
            "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
            "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
            "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5]),
            # Workers on ports the system picks, rather than from Ray's fixed range another cluster may use.
            "--min-worker-port", "0", "--max-worker-port", "0"]
        if head is None:
            self.port = ports[6]
            command += ["--head", "--port", str(self.port), "--ray-client-server-port", str(ports[7]),
                        "--include-dashboard", "false"]
            # The head's two metrics servers have fixed ports by default: another cluster's head may hold them.
            environ.update({"AUTOSCALER_METRIC_PORT": str(ports[8]), "DASHBOARD_METRIC_PORT": str(ports[9])})
        else:
            command += ["--address", head.gcs_address]
        with self.log_path.open("w") as log:
            # Its own session: a signal to this test's process group never reaches the node.
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=environ, start_new_session=True)
        self._wait_started()

    @property
    def gcs_address(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while STARTED not in self.log:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Ray node {self.name} did not start:\n{self.log[-3000:]}")
            time.sleep(0.5)

    @property
    def processes(self) -> dict[int, int]:
        """The node's processes now: pid → start time."""
        return descendants(self.process.pid) if self.process.poll() is None else {}

    def _with_temp_dir(self) -> dict[int, int]:
        """Processes whose command line names the node's temp dir (its workers do): one its raylet started while
        the node was being stopped may have outlived its parent."""
        marker = f"{self.temp_dir}{os.sep}".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                    stat = _stat(int(entry.name))
                    if stat is not None:
                        found[int(entry.name)] = stat[1]
        return found

    def kill(self) -> list[int]:
        """Every process of the node at once, with SIGKILL: the machine is gone. Returns their pids."""
        processes = self.processes
        kill_still_running(processes)
        self.process.wait()
        kill_still_running(self._with_temp_dir())
        return sorted(processes)

    def stop(self) -> None:
        """As ``ray stop`` on that machine: SIGTERM, the node drains and ends its processes; what is left, SIGKILL."""
        processes = self.processes
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        kill_still_running(processes)
        kill_still_running(self._with_temp_dir())
        shutil.rmtree(self.temp_dir, ignore_errors=True)
