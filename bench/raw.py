"""The physical limit: the diffusers pipeline called directly, loaded the way the server loads it.

The call mirrors ``server.engine.DiffusersEngine`` for one image: the same ``PipelineCache``
(so the same pipeline class, dtype and device), a fresh scheduler per call, a CPU generator per
seed and the same arguments. Nothing of the served path is here: no queue, no encoding, no socket.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from bench.workloads import FIRST_SEED, NEGATIVE_PROMPT, PROMPT, Workload


class RawRunner:
    """Every torch call of this process goes through one dedicated thread (see ``call``)."""

    def __init__(self, *, device: str, data_dir: Path, catalogs: tuple[Path, ...] = ()) -> None:
        # Imported here: the parent of the server process needs torch only for this section.
        from imagewire.air_registry.catalog import Catalog
        from imagewire.air_registry.loader import PipelineCache

        self.catalog = Catalog.load(catalogs)
        self.cache = PipelineCache(device=device, data_dir=data_dir)
        self.device = device
        # One thread for every torch call: each thread that starts OpenMP work gets its own OpenMP pool,
        # and with more pool threads than cores libgomp stops spinning and every parallel region pays
        # for a futex wake-up (measured: ~12 µs each, ~15 % on the tiny model). The server likewise
        # runs torch on one device thread only.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-raw")
        # The thread count the server's engine sets, set the same way, so raw and served compare like
        # with like; torch's own default is kept as a reference (see ``use_threads``).
        self.default_threads, self.server_threads = self._executor.submit(self._configure_threads).result()

    def _configure_threads(self) -> tuple[int, int]:
        import torch

        from imagewire.server.engine.threads import limit_cpu_threads

        default = torch.get_num_threads()
        limit_cpu_threads(self.device)
        return default, torch.get_num_threads()

    def use_threads(self, threads: int) -> None:
        """Run later calls on ``threads`` torch threads (call it through ``call``)."""
        import torch

        torch.set_num_threads(threads)

    async def call(self, function: Any, *args: Any) -> Any:
        """Run ``function(*args)`` on the raw thread; the event loop stays free meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _pipeline(self, workload: Workload) -> Any:
        entry = self.catalog.resolve(workload.model)
        return self.cache.image_to_image(entry) if workload.img2img else self.cache.text_to_image(entry)

    def load(self, workload: Workload) -> float:
        """Load the workload's pipeline (building the tiny model if needed); seconds it took."""
        started = time.perf_counter()
        self._pipeline(workload)
        return time.perf_counter() - started

    def run_one(self, workload: Workload, index: int, init_image: Image.Image | None) -> float:
        """Seconds for request ``index`` of ``workload``, the pipeline call and its scheduler included."""
        return self.run_call(workload, [index], init_image)

    def run_call(self, workload: Workload, indices: list[int], init_image: Image.Image | None) -> float:
        """Seconds for one pipeline call making the images of requests ``indices`` together."""
        import torch

        from imagewire.air_registry import ARCHITECTURES
        from imagewire.server.engine.families import FAMILIES
        from imagewire.tasks.jobs import InferenceJob

        pipe = self._pipeline(workload)
        entry = self.catalog.resolve(workload.model)
        started = time.perf_counter()
        pipe.scheduler = self.cache.make_sampler(pipe, None)
        # The arguments the server's family adapter gives the pipeline for the same requests.
        jobs = [InferenceJob(task_uuid=str(index), model=entry, weights=Path(), prompt=PROMPT,
                             negative_prompt=NEGATIVE_PROMPT, width=workload.width, height=workload.height,
                             steps=workload.steps, cfg_scale=workload.cfg_scale, sampler=None,
                             seeds=[FIRST_SEED + index], init_image=init_image if workload.img2img else None,
                             strength=workload.strength)
                for index in indices]
        arguments = FAMILIES[ARCHITECTURES[entry.architecture].family].call_arguments(jobs)
        arguments["generator"] = [torch.Generator("cpu").manual_seed(FIRST_SEED + index) for index in indices]
        with torch.inference_mode():
            pipe(**arguments, output_type="pil")
        return time.perf_counter() - started

    def reset_peak_memory(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_mib(self) -> float | None:
        """torch.cuda.max_memory_allocated since the last reset, MiB; None off CUDA."""
        import torch

        if not self.device.startswith("cuda"):
            return None
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)

    def unload(self) -> None:
        self._executor.submit(self.cache.unload_all).result()
        self._executor.shutdown()
