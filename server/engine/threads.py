"""How many threads torch may use for inference on a CPU."""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Collection
from pathlib import Path

import torch

log = logging.getLogger("imagewire.engine")

# An operator's explicit thread count wins over ours.
THREADS_VARIABLE = "OMP_NUM_THREADS"
# Other processes' CPU use, in cores, is rounded to the cores left to them, with a margin either way: one more
# is left once they use half a core beyond those left to them, and one is taken back once they use three
# quarters of a core less, so that a neighbour near a line does not flip the count call after call. On two
# cores: a core is left at 0.5 busy cores and taken back below 0.25.
LEAVE_MARGIN = 0.5
TAKE_BACK_MARGIN = 0.75
# The shortest stretch over which other processes' CPU is judged: long enough for the kernel's 10 ms ticks to
# add up to a figure (25 per core), short enough that a neighbour which starts or stops mid-call is seen
# within a step or two, as the count is judged again between a pipeline's steps.
WINDOW_SECONDS = 0.25
CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_TOPOLOGY = Path("/sys/devices/system/cpu")

# (monotonic seconds, CPU seconds busy on this process's CPUs, CPU seconds this process spent)
CpuClock = Callable[[], tuple[float, float, float]]


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity: a container's cpuset, ``taskset``)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def cpu_quota(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU time this process's cgroups allow, in cores (a container's ``--cpus``, a Kubernetes CPU limit,
    a systemd ``CPUQuota``); None without a limit or where there are no cgroups.

    Every cgroup from this process's own up to the mount's root may limit it, so the smallest limit on
    that path counts. Inside a container the path named in ``/proc/self/cgroup`` can be the host's, with the
    container's own cgroup mounted at the root: the parts of the path that do not exist are skipped.
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, separator, path = rest.partition(":")
        if not separator:
            continue  # not a "hierarchy:controllers:path" line
        if controllers == "":  # cgroup v2: "0::/path"
            limits += _cgroup_limits(root, path, _v2_limit)
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            mounts = [child for child in _children(root) if "cpu" in child.name.split(",")]
            for mount in mounts[:1]:
                limits += _cgroup_limits(mount, path, _v1_limit)
    return min(limits) if limits else None


def _children(root: Path) -> list[Path]:
    try:
        return sorted(child for child in root.iterdir() if child.is_dir())
    except OSError:
        return []


def _cgroup_limits(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    parts = [part for part in path.split("/") if part and part not in (".", "..")]
    limits = []
    for depth in range(len(parts), -1, -1):
        limit = read(mount.joinpath(*parts[:depth]))
        if limit is not None:
            limits.append(limit)
    return limits


def _v2_limit(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def physical_cores(cpus: Collection[int], topology: Path = CPU_TOPOLOGY) -> int | None:
    """How many physical cores ``cpus`` sit on: two hyperthreads of one core count once. None where the
    kernel does not say (no sysfs)."""
    cores = set()
    for cpu in cpus:
        for name in ("core_cpus_list", "thread_siblings_list"):  # the newer name, then the older
            try:
                cores.add((topology / f"cpu{cpu}" / "topology" / name).read_text().strip())
                break
            except OSError:
                continue
        else:
            return None
    return len(cores) or None


@functools.cache
def _torch_default_threads() -> int:
    """torch's own count as first read, before this module sets one: a thread per physical core."""
    return torch.get_num_threads()


def usable_cores() -> int:
    """The cores this process may keep busy at once, and at least one: a thread per physical core among its
    CPUs, as torch's default takes a thread per physical core (hyperthreads share a core's arithmetic units),
    and no more than the whole cores of its CPU quota. torch's default ignores the CPU affinity and the quota:
    under a quota of one core on 2 CPUs its 2 threads ran 1.5× slower than one (BENCHMARKS.md); at 1.5 cores,
    one thread and two measured the same."""
    return cores_within(allowed_cpus(), cpu_quota())


def cores_within(cpus: Collection[int], quota: float | None) -> int:
    """``usable_cores`` for the CPUs ``cpus`` under the CPU quota ``quota`` (None: no limit)."""
    cores = physical_cores(cpus)
    if cores is None:  # no topology to read (not Linux): torch's default is the physical cores there too
        cores = min(len(cpus), _torch_default_threads())
    return max(1, cores if quota is None else min(cores, int(quota)))


def leaves_threads_alone(device: str) -> bool:
    """Whether torch's thread count is left as it is: on CUDA devices (the CPU only feeds the GPU there), and
    when the operator set ``OMP_NUM_THREADS``."""
    return device != "cpu" or bool(os.environ.get(THREADS_VARIABLE))


def cores_left_to_others(others: float, left: int) -> int:
    """How many of this process's CPUs to leave to other processes that used ``others`` cores of them lately,
    when ``left`` were left to them so far."""
    if others >= left + LEAVE_MARGIN:
        return math.floor(others + LEAVE_MARGIN)
    if others < left - TAKE_BACK_MARGIN:
        return max(0, math.ceil(others - (1 - TAKE_BACK_MARGIN)))
    return left


def machine_cpu_clock(cpus: Collection[int] | None = None) -> tuple[float, float, float]:
    """Now, the CPU seconds spent busy so far on ``cpus`` (every CPU if None; ``/proc/stat``), and this
    process's own."""
    own = os.times()
    try:
        with open("/proc/stat", "rb") as stat:
            lines = stat.read().splitlines()
    except OSError:
        lines = []
    if cpus is None:
        rows = [line for line in lines[:1] if line.startswith(b"cpu ")]
    else:
        names = {b"cpu%d" % cpu for cpu in cpus}
        rows = [line for line in lines if line.partition(b" ")[0] in names]
    ticks = 0
    for row in rows:
        fields = [int(value) for value in row.split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
        ticks += sum(fields[:8]) - idle  # guest time is counted in user already
    # No /proc: nobody else is seen.
    busy = ticks / os.sysconf("SC_CLK_TCK") if rows else own.user + own.system
    return time.monotonic(), busy, own.user + own.system


class CpuThreads:
    """Sets torch's thread count in the thread that runs the pipelines, before each call and between a
    call's steps: every usable core, as torch and a plain script would take, less the cores that other
    processes keep busy on this process's CPUs.

    Why leave them those cores: torch's OpenMP threads meet at the end of every operation. When another
    process takes one of their cores, the threads that got there first spin until the missing one is
    scheduled again, so every operation waits a scheduler time slice: on 2 cores beside one busy process a
    2-thread pipeline ran 5–80× slower, a 1-thread one 1.2× slower (BENCHMARKS.md). The server's own work
    beside a call (the event loop, encoding and storing results) is short enough not to matter: with every
    core, 16 connections got 1.8× the images of one thread, pings at 6 ms p99. Only the CPUs this process may
    run on count: a neighbour on other CPUs takes none of ours, and under a CPU quota with CPUs to spare the
    scheduler finds free ones.

    Judged between steps too, because one call can last minutes on a CPU: a neighbour that starts mid-call
    would otherwise slow the rest of it several times over, and one that stops would leave a core unused.
    Each judgement looks at the last ``WINDOW_SECONDS`` or a little more, however long the device was idle
    before: a background thread reads the clock every half window (``sample_in_background``), so that a
    neighbour busy minutes ago but quiet now does not cost the next call a core.
    Left alone where ``leaves_threads_alone``.
    """

    def __init__(self, device: str, *, clock: CpuClock | None = None, sample_in_background: bool = True) -> None:
        cpus, quota = allowed_cpus(), cpu_quota()
        self.cpus = len(cpus)
        self.cores = cores_within(cpus, quota)
        self.fixed = leaves_threads_alone(device)
        self.clock = clock or functools.partial(machine_cpu_clock, cpus)
        self.current: int | None = None
        self.left_to_others = 0
        # Clock readings, oldest first: the newest one at least a window old, and every later one.
        self._readings: collections.deque[tuple[float, float, float]] = collections.deque()
        self._lock = threading.Lock()
        if not self.fixed:
            log.info("CPU inference on %d torch threads (%s), fewer while other processes keep its CPUs busy "
                     "(%s overrides)", self.cores, self._what_limits(quota), THREADS_VARIABLE)
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
            self.left_to_others = cores_left_to_others(others, self.left_to_others)
            self._set(self.threads_beside(self.left_to_others))
        return self.current

    def _what_limits(self, quota: float | None) -> str:
        if quota is not None and int(quota) <= self.cores:
            return f"a CPU quota of {quota:g} core{'' if quota == 1 else 's'}"
        return f"a thread per core of {self.cpus} CPU{'' if self.cpus == 1 else 's'}"

    def threads_beside(self, left_to_others: int) -> int:
        """Threads while ``left_to_others`` of this process's CPUs are left to other processes."""
        return max(1, min(self.cores, self.cpus - left_to_others))

    def _set(self, threads: int) -> None:
        if threads != self.current:
            if self.current is not None:
                log.info("CPU inference now on %d torch threads (other processes %s)", threads,
                         f"keep {self.left_to_others} of {self.cpus} CPUs busy" if self.left_to_others
                         else "are quiet")
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
