"""The newer official Python SDK (``runware-sdk`` on PyPI) for tests. It installs a package named
``runware``, like the older SDK the test extra brings, so it lives in a folder of its own and runs in
child processes that put that folder first on their path.

The folder is made once per machine (under ``$XDG_CACHE_HOME/imagewire-tests``) with pip, from the
package index, like any test dependency; the tests themselves run with the network guard on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.timing import seconds

RUNWARE_SDK = "runware-sdk==1.8.0"
# What runware-sdk needs that the test environment does not already have.
RUNWARE_SDK_EXTRAS = ("fastjsonschema==2.22.3",)
GUARD = Path(__file__).with_name("network_guard")


def runware_sdk_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagewire-tests"
    target = cache / RUNWARE_SDK.replace("==", "-")
    if (target / "runware" / "client.py").is_file():
        return target
    staging = target.with_name(target.name + ".partial")
    # The install fetches from the package index: without the guard, which keeps tests local.
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--upgrade",
                    "--target", str(staging), RUNWARE_SDK, *RUNWARE_SDK_EXTRAS],
                   check=True, env=environment, timeout=seconds(300))
    if not target.exists():
        staging.replace(target)  # whole or not at all: an interrupted install is redone next time
    return target


def run_script(sdk: Path, script: str, *arguments: str) -> Any:
    """Run ``script`` with the newer SDK importable as ``runware``; its last stdout line, parsed as JSON."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(sdk), str(GUARD)])}
    result = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True,
                            env=environment, timeout=seconds(300), check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
