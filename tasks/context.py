"""The small interface a task handler may use, and nothing more.

A handler gets a :class:`TaskContext`: the API key's owner token, its stage timings, and the
process-wide :class:`Services`. The device and the result registry are described here as protocols;
the server provides them (``server/device.py``, ``server/sessions.py``), and tests can provide
small stand-ins.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from imagewire.air_registry import Catalog
from imagewire.air_registry.civitai import Civitai
from imagewire.storage import ImageStore, UrlFetcher
from imagewire.tasks.jobs import Job, JobProgress


class Device(Protocol):
    def submit(self, job: Job) -> JobProgress[Any]:
        """Queue a job at once, or raise ServiceUnavailable."""
        ...

    @property
    def unavailable_samplers(self) -> Mapping[str, str]:
        """Sampler names this device cannot run, each with the reason (checked at start)."""
        ...


class RecordedTask(Protocol):
    """What the result registry remembers of a task, as getResponse reads it."""

    @property
    def task_uuid(self) -> str: ...

    @property
    def task_type(self) -> str: ...

    @property
    def status(self) -> str:
        """processing | success | error"""
        ...

    @property
    def items(self) -> Sequence[dict[str, Any]]: ...

    @property
    def errors(self) -> Sequence[dict[str, Any]]: ...

    @property
    def items_dropped(self) -> bool: ...


class Results(Protocol):
    @property
    def retention(self) -> float: ...

    @property
    def max_kept_bytes(self) -> int: ...

    def get(self, task_uuid: str, owner: str) -> RecordedTask | None: ...


@dataclass(frozen=True)
class Settings:
    """The operator's settings that handlers act on."""

    data_dir: Path
    allow_downloads: bool = False
    max_image_pixels: int = 4096 * 4096   # decoded input images (decompression bombs)
    max_image_bytes: int = 32 * 1024 * 1024
    price_per_gpu_second: float = 0.0


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    store: ImageStore
    fetcher: UrlFetcher
    device: Device
    results: Results
    base_url: str = ""   # of imageURLs; set once the server listens (its port may be chosen then)
    civitai: Civitai | None = None   # where civitai:MODEL@VERSION checkpoints come from; None: nowhere

    def image_url(self, image_uuid: str, extension: str) -> str:
        return f"{self.base_url}/image/{image_uuid}.{extension}"


@dataclass
class TaskContext:
    services: Services
    owner: str                       # owner token of the API key the task came with
    timings: dict[str, float] = field(default_factory=dict)  # stage → seconds, for the task's log line

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started
