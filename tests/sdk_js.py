"""Runware's official JavaScript SDK (``@runware/sdk-js`` on npm) for tests, driven by Node in child processes.

Like the newer Python SDK (tests/sdk.py) it is installed once per machine, with npm from the npm registry, under
``$XDG_CACHE_HOME/imagewire-tests``, whole or not at all; the tests themselves reach nothing but loopback: the
scripts run with tests/node_guard preloaded, which refuses any other connection.

Node and npm are not Python packages: where they are missing the tests are skipped, unless
``IMAGEWIRE_REQUIRE_NODE=1`` (as in CI), where their absence fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.timing import seconds

RUNWARE_SDK_JS = "@runware/sdk-js@1.3.2"
NODE_GUARD = Path(__file__).with_name("node_guard") / "loopback_only.cjs"
# Older Node lacks what the SDK's ws dependency and the scripts use (fetch, structuredClone).
OLDEST_NODE_MAJOR = 18


def runware_sdk_js_dir() -> Path:
    """The folder npm installed the SDK into (its node_modules inside), made on first use."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagewire-tests"
    target = cache / ("runware-sdk-js-" + RUNWARE_SDK_JS.rpartition("@")[2])
    if (target / "node_modules" / "@runware" / "sdk-js" / "package.json").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to install " + RUNWARE_SDK_JS)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted install left is started over
    staging.mkdir(parents=True)
    # --ignore-scripts: nothing of the package runs at install; the optional native bufferutil is not built,
    # and ws works without it.
    subprocess.run([npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund", "--ignore-scripts",
                    "--no-save", "--loglevel", "error", RUNWARE_SDK_JS],
                   check=True, timeout=seconds(300), capture_output=True)
    if not target.exists():
        staging.replace(target)  # whole or not at all
    else:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    return target


def node_or_skip() -> str:
    """Node's path, where it is new enough; else the test is skipped (or fails under IMAGEWIRE_REQUIRE_NODE=1)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    problem = None
    if node is None or npm is None:
        problem = "node and npm are needed for the JavaScript SDK's tests (apt-get install nodejs npm)"
    else:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout
        if int(version.strip().lstrip("v").split(".")[0]) < OLDEST_NODE_MAJOR:
            problem = f"node {version.strip()} is older than {OLDEST_NODE_MAJOR}, which the JavaScript SDK needs"
    if problem is None:
        assert node is not None
        return node
    if os.environ.get("IMAGEWIRE_REQUIRE_NODE") == "1":
        pytest.fail("IMAGEWIRE_REQUIRE_NODE=1 but " + problem)
    pytest.skip(problem)


def run_node_script(node: str, sdk: Path, script: str, *arguments: str) -> Any:
    """Run ``script`` (CommonJS, the SDK loadable as ``require("@runware/sdk-js")``); its last stdout line,
    parsed as JSON. ``process.argv[1:]`` are the arguments."""
    environment = {**os.environ, "NODE_PATH": str(sdk / "node_modules")}
    result = subprocess.run([node, "--require", str(NODE_GUARD), "--eval", script, "--", *arguments],
                            capture_output=True, text=True, env=environment, timeout=seconds(300), check=False)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return json.loads(result.stdout.strip().splitlines()[-1])
