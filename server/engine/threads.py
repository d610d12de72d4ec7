"""How many threads torch may use for inference on a CPU."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("imagewire.engine")

# An operator's explicit thread count wins over ours.
THREADS_VARIABLE = "OMP_NUM_THREADS"


def serving_cpu_threads(cores: int) -> int:
    """Torch threads for inference on a CPU with ``cores`` usable cores: all but one.

    torch's OpenMP threads meet at the end of every operation. When anything else takes one of
    their cores (this process's event loop and image encoding, or another process), the threads
    that got there first spin until the missing one is scheduled again, so every operation waits
    a scheduler time slice. On 2 cores with one busy neighbour, a 2-thread pipeline ran 5–80×
    slower and a 1-thread pipeline 1.2× slower (see BENCHMARKS.md); the spare core keeps the
    server responsive and its throughput steady.
    """
    return max(1, cores - 1)


def limit_cpu_threads(device: str) -> int | None:
    """Set torch's thread count for CPU inference in the calling thread; None when left as it is.

    Call it from the thread that runs the pipelines. Left alone on CUDA devices (the CPU only
    feeds the GPU there) and when ``OMP_NUM_THREADS`` is set.
    """
    if device != "cpu" or os.environ.get(THREADS_VARIABLE):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = serving_cpu_threads(cores)
    torch.set_num_threads(threads)
    log.info("CPU inference on %d torch threads of %d cores (%s overrides)", threads, cores, THREADS_VARIABLE)
    return threads
