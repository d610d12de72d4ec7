"""What the figures were measured on: machine, library versions, date, and the exact command."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from bench.server_process import REPO_ROOT

PACKAGES = ("torch", "diffusers", "transformers", "websockets", "pillow", "numpy")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{revision}{'+changes' if dirty else ''}"


def _accelerator(device: str) -> dict[str, Any]:
    if not device.startswith("cuda"):
        return {"kind": "cpu"}
    import torch

    properties = torch.cuda.get_device_properties(torch.device(device))
    return {"kind": "cuda", "name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
            "cuda": torch.version.cuda}


def _server_threads(device: str, default: int) -> int:
    """The torch thread count the server's engine starts inference on (``server/engine/threads.py``): a thread
    per usable core, fewer while other processes keep its CPUs busy; an explicit ``OMP_NUM_THREADS`` wins."""
    from imagewire.server.engine.threads import leaves_threads_alone, usable_cores

    return default if leaves_threads_alone(device) else usable_cores()


def describe(device: str, argv: Sequence[str]) -> dict[str, Any]:
    import torch

    from imagewire.server.engine.threads import usable_cores

    return {
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "accelerator": _accelerator(device),
        "cpu_model": cpu_model(),
        "cpu_cores": usable_cores(),
        "torch_default_threads": torch.get_num_threads(),
        "server_torch_threads": _server_threads(device, torch.get_num_threads()),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {package: _version(package) for package in PACKAGES},
        "git_revision": _git_revision(),
        "executable": sys.executable,
    }
