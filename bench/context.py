"""What every section needs: the server, the raw runner, the budget, and seed images on both sides."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from PIL import Image

from bench.client import BenchConnection
from bench.cpuload import ForeignLoad, wait_until_quiet
from bench.images import data_uri, encoded, test_picture
from bench.raw import RawRunner
from bench.server_process import ServerProcess
from bench.workloads import Budget, Workload

_STARTED = time.monotonic()
T = TypeVar("T")


def progress(message: str) -> None:
    """A line on stderr so a long run shows where it is; stdout is kept for the tables."""
    print(f"[bench {time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


class Conditions:
    """Keeps measurements apart from other processes' work: waits for quiet, records what load there was."""

    # A block of measurements during which other processes used more than this many cores is
    # measured again, at most ``RETRIES`` times: on 2 cores one busy neighbour changes every figure.
    MAX_FOREIGN_CORES = 0.2
    RETRIES = 3

    def __init__(self, quiet_wait: float) -> None:
        self.quiet_wait = quiet_wait  # longest wait for other processes to go quiet; 0: never wait nor retry
        self.our_pids: list[int] = []  # processes of this run besides this one (the server)
        self.by_section: dict[str, dict[str, Any]] = {}
        self.repeated_blocks = 0

    async def quiet(self) -> float | None:
        """Wait for other processes to go quiet (up to ``quiet_wait``); their load in the last window."""
        if self.quiet_wait <= 0:
            return None
        return await asyncio.to_thread(wait_until_quiet, lambda: self.our_pids, window=1.0,
                                       max_wait=self.quiet_wait)

    async def clean(self, run: Callable[[], Awaitable[T]]) -> T:
        """Run one block of measurements; repeat it while other processes disturbed it (see MAX_FOREIGN_CORES)."""
        attempt = 0
        while True:
            await self.quiet()
            load = ForeignLoad(lambda: self.our_pids)
            load.start()
            result = await run()
            if self.quiet_wait <= 0 or load.cores() <= self.MAX_FOREIGN_CORES or attempt == self.RETRIES:
                return result
            attempt += 1
            self.repeated_blocks += 1
            progress(f"other processes used {load.cores():.2f} cores during a block: measuring it again")

    async def measured(self, label: str, run: Callable[[], Awaitable[T]]) -> T:
        """Run a section after a quiet wait, and record how much CPU other processes used during it."""
        before = await self.quiet()
        load = ForeignLoad(lambda: self.our_pids)
        load.start()
        result = await run()
        self.by_section[label] = {"foreign_cpu_cores": load.cores(), "foreign_cpu_cores_before": before}
        return result


@dataclass
class BenchContext:
    server: ServerProcess
    raw: RawRunner | None  # None in sections that never call the pipeline in-process
    api_key: str
    budget: Budget
    conditions: Conditions
    _seeds: dict[tuple[int, int], tuple[str, Image.Image]] = field(default_factory=dict)

    async def connect(self) -> BenchConnection:
        return await BenchConnection.open(self.server.url, self.api_key)

    async def seed_image(self, workload: Workload,
                         connection: BenchConnection | None = None) -> tuple[str | None, Image.Image | None]:
        """For img2img: the seed picture uploaded once (its imageUUID) and the same picture decoded locally.

        Both sides start from the same PNG bytes; the server decodes them from its store on every task,
        as it would for a client reusing an uploaded image. Without ``connection``, the upload goes over
        a connection of its own.
        """
        if not workload.img2img:
            return None, None
        size = (workload.width, workload.height)
        if size not in self._seeds:
            picture = test_picture(workload.width).resize(size)
            upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()),
                      "image": data_uri(encoded(picture, "PNG"), "PNG")}
            if connection is not None:
                _, item = await connection.run(upload)
            else:
                own = await self.connect()
                try:
                    _, item = await own.run(upload)
                finally:
                    await own.close()
            self._seeds[size] = (item["imageUUID"], picture)
        return self._seeds[size]

