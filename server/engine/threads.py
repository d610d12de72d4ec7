"""How many threads torch may use for inference on a CPU."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

import torch

log = logging.getLogger("imagewire.engine")

# An operator's explicit thread count wins over ours.
THREADS_VARIABLE = "OMP_NUM_THREADS"
# Other processes' CPU, in cores, at which a core is left to them, and below which it is taken back: apart,
# so that a neighbour near the line does not flip the count call after call.
CROWDED_CORES = 0.5
QUIET_CORES = 0.25
# The shortest stretch over which other processes' CPU is judged: long enough for the kernel's 10 ms ticks to
# add up to a figure (25 per core), short enough that a neighbour which starts or stops mid-call is seen
# within a step or two, as the count is judged again between a pipeline's steps.
WINDOW_SECONDS = 0.25

# (monotonic seconds, CPU seconds the machine spent busy, CPU seconds this process spent)
CpuClock = Callable[[], tuple[float, float, float]]


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def leaves_threads_alone(device: str) -> bool:
    """Whether torch's thread count is left as it is: on CUDA devices (the CPU only feeds the GPU there), and
    when the operator set ``OMP_NUM_THREADS``."""
    return device != "cpu" or bool(os.environ.get(THREADS_VARIABLE))


def serving_cpu_threads(cores: int) -> int:
    """Torch threads on a CPU with ``cores`` usable cores while another process keeps one busy: all but one.

    torch's OpenMP threads meet at the end of every operation. When another process takes one of their
    cores, the threads that got there first spin until the missing one is scheduled again, so every
    operation waits a scheduler time slice: on 2 cores beside one busy process a 2-thread pipeline ran
    5–80× slower, a 1-thread one 1.2× slower (BENCHMARKS.md). The server's own work beside a call
    (the event loop, encoding and storing results) is short enough not to matter: with every core, 16
    connections got 1.8× the images of one thread, pings at 6 ms p99.
    """
    return max(1, cores - 1)


def machine_cpu_clock() -> tuple[float, float, float]:
    """Now, the machine's busy CPU seconds so far (``/proc/stat``), and this process's own."""
    own = os.times()
    try:
        with open("/proc/stat", "rb") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        busy = own.user + own.system  # no /proc: nobody else is seen
    else:
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is counted in user already
    return time.monotonic(), busy, own.user + own.system


class CpuThreads:
    """Sets torch's thread count in the thread that runs the pipelines, before each call and between a
    call's steps: every core, as torch and a plain script would take, unless other processes keep about a
    core busy; then all but one.

    Judged between steps too, because one call can last minutes on a CPU: a neighbour that starts mid-call
    would otherwise slow the rest of it several times over, and one that stops would leave a core unused.
    Each judgement looks at the last ``WINDOW_SECONDS`` or a little more, however long the device was idle
    before: a background thread reads the clock every half window (``sample_in_background``), so that a
    neighbour busy minutes ago but quiet now does not cost the next call a core.
    Left alone where ``leaves_threads_alone``.
    """

    def __init__(self, device: str, *, clock: CpuClock = machine_cpu_clock, sample_in_background: bool = True) -> None:
        self.cores = usable_cores()
        self.fixed = leaves_threads_alone(device)
        self.clock = clock
        self.current: int | None = None
        # Clock readings, oldest first: the newest one at least a window old, and every later one.
        self._readings: collections.deque[tuple[float, float, float]] = collections.deque()
        self._lock = threading.Lock()
        if not self.fixed:
            log.info("CPU inference on %d torch threads, %d while other processes keep a core busy "
                     "(%s overrides)", self.cores, serving_cpu_threads(self.cores), THREADS_VARIABLE)
            self._set(self.cores)
            self.sample()
            if sample_in_background:
                threading.Thread(target=_sample_while_used, args=(weakref.ref(self),), name="imagewire-cpu-sampler",
                                 daemon=True).start()

    def sample(self) -> tuple[float, float, float]:
        """Read the clock and keep the reading; return it."""
        reading = self.clock()
        with self._lock:
            self._readings.append(reading)
            while len(self._readings) > 2 and reading[0] - self._readings[1][0] >= WINDOW_SECONDS:
                self._readings.popleft()
        return reading

    def others(self) -> float | None:
        """Other processes' CPU, in cores, over the last window or a little more; None before a window has passed."""
        now = self.sample()
        with self._lock:
            since = self._readings[0]
        wall = now[0] - since[0]
        if wall < WINDOW_SECONDS:
            return None
        return max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / wall

    def adjust(self) -> int | None:
        """Set the count for what runs next (a call, or the rest of one) from what other processes did lately;
        None when left as it is."""
        if self.fixed:
            return None
        others = self.others()
        if others is not None:
            if others >= CROWDED_CORES:
                self._set(serving_cpu_threads(self.cores))
            elif others < QUIET_CORES:
                self._set(self.cores)
        return self.current

    def _set(self, threads: int) -> None:
        if threads != self.current:
            if self.current is not None:
                log.info("CPU inference now on %d torch threads (other processes %s)", threads,
                         "keep a core busy" if threads < self.cores else "are quiet")
            torch.set_num_threads(threads)
            self.current = threads


def _sample_while_used(threads: weakref.ref[CpuThreads]) -> None:
    """Read the clock every half window for as long as the engine holding ``threads`` exists."""
    while True:
        time.sleep(WINDOW_SECONDS / 2)
        held = threads()
        if held is None:
            return
        held.sample()
        del held


def limit_cpu_threads(device: str) -> int | None:
    """Set, in the calling thread, the count the server starts with; None when left as it is."""
    return CpuThreads(device, sample_in_background=False).current
