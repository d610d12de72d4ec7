"""How busy the machine was with work that is not ours: other processes skew every figure on a small box.

Reads jiffies from /proc: the whole machine's busy time, minus this process and the server's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

_TICKS = os.sysconf("SC_CLK_TCK")


def _machine_busy() -> int:
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy is everything but idle and iowait.
    return sum(fields) - fields[3] - fields[4]


def _process_busy(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0
    # Fields 14–17 of the line (utime, stime, and the same for waited-for children); the split starts at field 3.
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])


class ForeignLoad:
    """Cores' worth of CPU used by other processes between ``start()`` and ``cores()``."""

    def __init__(self, our_pids: Callable[[], Iterable[int]]) -> None:
        self._our_pids = our_pids
        self._started = 0.0
        self._machine = 0
        self._ours = 0

    def _ours_now(self) -> int:
        return sum(_process_busy(pid) for pid in {os.getpid(), *self._our_pids()})

    def start(self) -> None:
        self._started = time.monotonic()
        self._machine = _machine_busy()
        self._ours = self._ours_now()

    def cores(self) -> float:
        elapsed = time.monotonic() - self._started
        if elapsed <= 0:
            return 0.0
        foreign = (_machine_busy() - self._machine) - (self._ours_now() - self._ours)
        return round(max(0.0, foreign / _TICKS / elapsed), 3)


def wait_until_quiet(our_pids: Callable[[], Iterable[int]], *, threshold: float = 0.15, window: float = 2.0,
                     max_wait: float = 120.0) -> float:
    """Wait (up to ``max_wait`` s) for a ``window`` in which other processes used under ``threshold`` cores.

    Returns the last window's foreign load, so a section that had to start anyway says so.
    """
    deadline = time.monotonic() + max_wait
    load = ForeignLoad(our_pids)
    while True:
        load.start()
        time.sleep(window)
        cores = load.cores()
        if cores < threshold or time.monotonic() > deadline:
            return cores
