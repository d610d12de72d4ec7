"""Prints the replicas' board as JSON: run as a process of its own, a Ray driver joining the cluster at argv[1]
(so that the test process itself never imports Ray)."""

from __future__ import annotations

import json
import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # keep to loopback, as the gateways do
os.environ.setdefault("RAY_AUTH_MODE", "token")

import ray  # noqa: E402

from imagewire.server.board import read_board  # noqa: E402

ray.init(address=sys.argv[1], namespace="imagewire", configure_logging=False, log_to_driver=False)
print(json.dumps(read_board()))
ray.shutdown()
