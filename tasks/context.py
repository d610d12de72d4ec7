"""The small interface a task handler may use, and nothing more.

A handler gets a :class:`TaskContext`: the API key's owner token, its stage timings, and the
process-wide :class:`Services`. The result registry is described here as a protocol, the device in
``tasks/jobs.py`` beside the jobs it runs; the server provides them (``server/sessions.py``,
``server/device.py``), and tests can provide small stand-ins.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from imagewire.air_registry import Catalog
from imagewire.air_registry.civitai import Civitai
from imagewire.air_registry.uploads import ModelUploads
from imagewire.storage import ImageStorage, UrlFetcher
from imagewire.tasks.downloads import Downloads
from imagewire.tasks.errors import ServiceUnavailable, TaskError
from imagewire.tasks.jobs import Device


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

    @property
    def progress(self) -> int | None:
        """Percent done, while it runs and says so."""
        ...

    @property
    def expires(self) -> float | None:
        """When its results stop being served (a ``ttl`` ended; seconds since the epoch), if they do."""
        ...


class Results(Protocol):
    @property
    def retention(self) -> float: ...

    @property
    def max_kept_bytes(self) -> int: ...

    async def get(self, task_uuid: str, owner: str, follower: str | None = None) -> RecordedTask | None:
        """``follower``: a session UUID to push the task's later results to, where another server runs it."""
        ...

    async def cancel(self, task_uuid: str, owner: str) -> bool | None:
        """Stop the task if it runs: True when it was stopped, False when it had ended, None when
        ``owner`` has no such task."""
        ...


class Subscription(Protocol):
    """One socket's subscription to the results of a task running on this server (``Feed.follow``).

    It is taken before getResponse reads the record, so that nothing the task keeps meanwhile is missed, and
    started once the answer is known: ``seen`` is how many result items the answer holds (those are never
    pushed again), ``running`` whether the task was still processing (if not, there is nothing to push)."""

    async def start(self, seen: int, running: bool) -> None: ...

    def cancel(self) -> None: ...


class Feed(Protocol):
    """What getResponse may do beyond reading the record; the runner provides it."""

    @property
    def hold_seconds(self) -> float:
        """How long getResponse may hold its answer for a task to finish (0: answer at once)."""
        ...

    def follow(self, task_uuid: str) -> Subscription | None:
        """Push the results of ``task_uuid`` to the asking socket as they come; None when that is not possible
        here (the transport answers once, or the task does not run on this server, or is not async)."""
        ...

    def follower(self, task_uuid: str) -> str | None:
        """The asking socket's session, to subscribe with the read of the record when ``follow`` could not
        (the task runs on another server); None when the transport answers once."""
        ...

    async def changed(self, task_uuid: str, timeout: float) -> None:
        """Return when the task may have finished, at the latest after ``timeout`` seconds."""
        ...


# progress(items, overall percent, push): what a handler reports while its task runs; the runner keeps
# ``overall`` for getResponse and sends ``items`` on when ``push`` (the task asked for progress).
ProgressSink = Callable[[Sequence[Any], int, bool], None]


@dataclass(frozen=True)
class Settings:
    """The operator's settings that handlers act on. No defaults here: the server fills every field from
    its Config (``server/config.py``), where each setting's default is written once."""

    data_dir: Path
    allow_downloads: bool
    max_image_pixels: int         # decoded input images (decompression bombs)
    max_image_bytes: int
    price_per_gpu_second: float
    max_output_pixels: int        # results of the tools that enlarge an image (upscale)
    upscale_tile_size: int        # upscaling works on tiles of at most this many input pixels a side
    safety_checker: str           # the catalog model content checks run
    # Whether the engine reads model weights. False with --engine fake, which serves every catalog model without
    # its files: the one switch that makes tasks skip looking for weights (``inputs.weights``) and modelSearch
    # call every model available.
    needs_weights: bool
    # Whether the device finds the weights itself, on its own machine: with --engine ray each replica looks them
    # up (``server/replica.py``), so the gateway hands over the catalog entry without looking at its disk.
    weights_on_device: bool
    image_ttl: float              # seconds stored images are kept after their last use: the longest ``ttl``


class PixelBudget:
    """Decoded input pixels that unfinished tasks hold, all together (``--max-waiting-megapixels``).

    A task waiting for the device keeps its decoded seed image, mask and guides; without a bound, a
    queue of image-to-image tasks with large inputs grows memory without limit. Past the bound a new
    image is refused (``serviceUnavailable``) rather than held; a lone image always fits, so a bound
    smaller than one image slows the server down to one such task at a time rather than none.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, pixels: int) -> bool:
        if self.held and self.held + pixels > self.limit:
            return False
        self.held += pixels
        return True

    def give(self, pixels: int) -> None:
        self.held -= pixels


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} MP"


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    store: ImageStorage
    fetcher: UrlFetcher
    device: Device
    results: Results
    pixels: PixelBudget
    base_url: str = ""   # of imageURLs; set once the server listens (its port may be chosen then)
    civitai: Civitai | None = None   # where civitai:MODEL@VERSION checkpoints come from; None: nowhere
    downloads: Downloads | None = None   # the threads downloads run on; None: nothing is downloaded
    uploads: ModelUploads | None = None  # where modelUpload keeps what it fetches; None: nowhere

    def image_url(self, image_uuid: str, extension: str) -> str:
        return f"{self.base_url}/image/{image_uuid}.{extension}"


@dataclass
class TaskContext:
    services: Services
    owner: str                       # owner token of the API key the task came with
    timings: dict[str, float] = field(default_factory=dict)  # stage → seconds, for the task's log line
    progress_sink: ProgressSink | None = None
    held_pixels: int = 0             # of the budget, given back when the task is over (``release``)
    feed: Feed | None = None         # for getResponse: holding its answer, pushing results as they come
    # An error that does not take back the results already made (an uploadEndpoint that failed): the runner
    # answers it after the task's last result, and the task ends with it.
    deferred: TaskError | None = None
    # When the task's results stop being served (a ``ttl``: seconds since the epoch); getResponse answers
    # that they expired from then on.
    expires: float | None = None

    def progress(self, items: Sequence[Any], overall: int, *, push: bool) -> None:
        if self.progress_sink is not None:
            self.progress_sink(items, overall, push)

    def defer(self, error: TaskError) -> None:
        """Report ``error`` once the results are answered (the first one, of several)."""
        if self.deferred is None:
            self.deferred = error

    def hold_pixels(self, pixels: int, *, parameter: str) -> None:
        """Count a decoded input image of ``pixels`` against the budget for as long as the task lasts."""
        budget = self.services.pixels
        if not budget.take(pixels):
            raise ServiceUnavailable(
                f"The server holds {_megapixels(budget.held)} of decoded input images for unfinished tasks, "
                f"and {parameter} ({_megapixels(pixels)}) would pass the bound of {_megapixels(budget.limit)}; "
                "send it again once some tasks have finished, or send a smaller image.", parameter=parameter)
        self.held_pixels += pixels

    def let_go_of_pixels(self, pixels: int) -> None:
        """An image this task held is gone (replaced by a smaller one)."""
        self.services.pixels.give(pixels)
        self.held_pixels -= pixels

    def release(self) -> None:
        """The task is over: what it held goes back to the budget."""
        self.let_go_of_pixels(self.held_pixels)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started
