"""Gateways of the cluster tests: server processes with --engine ray, and the replicas' board."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.timing import seconds
from tests.wire import API_KEY, Wire

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"imagewire ready: (ws://\S+)")
JOIN = re.compile(r"--ray-address (\S+)")


class Gateway:
    """A server process with --engine ray; its stderr is kept (Ray's and the replicas' lines too)."""

    def __init__(self, data_dir: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imagewire.server", "--port", "0", "--data-dir", str(data_dir),
             "--api-key", API_KEY, "--engine", "ray", *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment, cwd=ROOT)
        self.lines: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(seconds(300)) or not self.url:
            self.stop()
            raise AssertionError("the gateway did not start:\n" + self.log[-4000:])

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            match = READY.search(line)
            if match:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(seconds(60))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(seconds(30))
        assert self.process.stderr is not None
        self.process.stderr.close()


class Cluster:
    def __init__(self, gateways: tuple[Gateway, ...], address: str, env: dict[str, str] | None = None) -> None:
        self.gateways = gateways
        self.address = address
        self.env = env or {}   # what a process joining it needs (a cluster's own token)

    def board(self) -> list[dict]:
        """The replicas as they describe themselves (name, pid, loaded models, jobs held, jobs run per model)."""
        result = subprocess.run([sys.executable, str(Path(__file__).with_name("board.py")), self.address],
                                capture_output=True, text=True, timeout=seconds(60), cwd=ROOT, check=True,
                                env={**os.environ, **self.env})
        return list(json.loads(result.stdout.strip().splitlines()[-1]))


async def run_on(gateway: Gateway, task: dict) -> list[dict]:
    wire = await Wire.open(gateway.url)
    try:
        return await wire.run(task, timeout=seconds(180))
    finally:
        await wire.close()
