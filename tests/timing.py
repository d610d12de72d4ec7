"""One time unit for every wait in the tests.

Each timeout, deadline and pause is written as ``seconds(n)``: on a slow or loaded machine,
``IMAGEWIRE_TEST_TIME_SCALE=3 python -m pytest`` stretches every one of them alike, instead of
some tests failing for want of time. Waits are for conditions (``tests.wire.eventually``), never
for a fixed time that is hoped to be enough; what remains of pauses is where a test shows that
something does *not* happen within a while.
"""

from __future__ import annotations

import os

SCALE = float(os.environ.get("IMAGEWIRE_TEST_TIME_SCALE") or 1)


def seconds(value: float) -> float:
    return value * SCALE
