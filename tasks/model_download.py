"""modelDownload (our extension, docs/protocol.md): fetch a catalog model's files from the Hugging Face hub into
this server's cache, reporting bytes as they arrive, so that a client can offer a model the server lists as
unavailable and show how far its download has got.

Only a server started with ``--allow-downloads`` fetches, and only catalog models whose source is the hub. The
download runs on the bounded download threads (``downloads.py``), as an asyncio task of its own that the
request follows: a client that goes away or cancels stops following, not the download, and a second request
for the model follows the same one. Each file lands whole, the layout's marker file last
(``air_registry.weights.download_hub_weights``), so an interrupted download never looks complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from imagewire.air_registry import ModelEntry, RegistryError, WeightsMissing, availability
from imagewire.air_registry.weights import download_hub_weights, hub_bytes_on_disk, hub_download_size
from imagewire.tasks.context import TaskContext
from imagewire.tasks.downloads import Downloads
from imagewire.tasks.errors import InvalidParameter, ServiceUnavailable, UnsupportedParameter
from imagewire.tasks.inputs import task_error
from imagewire.tasks.schema import ModelDownload, ModelDownloadResult
from imagewire.tasks.task_type import TaskType

log = logging.getLogger(__name__)

# How often a follower looks at the bytes on disk; an item goes out only when the count has moved.
PROGRESS_INTERVAL = 0.25
# The server's log gets a line each tenth of the way, and at least this often while a download is slow.
LOG_INTERVAL = 30.0


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


@dataclass
class HubFetch:
    """One model's download, shared by the requests that follow it."""

    entry: ModelEntry
    total: int | None = None      # bytes to fetch, once the hub has said
    baseline: int = 0             # bytes of the repo in the cache before it began
    task: asyncio.Task[Path] = field(init=False)

    def cancel(self) -> None:
        self.task.cancel()

    def done_bytes(self) -> int:
        if self.total is None:
            return 0
        return max(0, min(self.total, hub_bytes_on_disk(self.entry) - self.baseline))

    async def fetch(self, downloads: Downloads, owner: str) -> Path:
        self.baseline = await asyncio.to_thread(hub_bytes_on_disk, self.entry)
        self.total = await downloads.run(owner, hub_download_size, self.entry)
        air, total = self.entry.air, self.total
        log.info("downloading %s from Hugging Face repo '%s': %s to fetch", air, self.entry.location,
                 megabytes(total))
        started = time.monotonic()
        # One reporter per download, however many requests follow it, so that the log has each line once.
        reporter = asyncio.get_running_loop().create_task(self._log_progress())
        try:
            path = await downloads.run(owner, download_hub_weights, self.entry)
        finally:
            reporter.cancel()
        log.info("downloaded %s: %s in %.1f s", air, megabytes(total), time.monotonic() - started)
        return path

    async def _log_progress(self) -> None:
        """The bytes so far in the server's log: a line each tenth of the total, or after LOG_INTERVAL seconds
        without one (a download that crawls still shows it is alive)."""
        total = self.total or 0
        logged_tenth, logged_at = 0, time.monotonic()
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            done = await asyncio.to_thread(self.done_bytes)
            tenth = 10 * done // total if total else 0
            now = time.monotonic()
            if tenth > logged_tenth or now - logged_at >= LOG_INTERVAL:
                log.info("downloading %s: %.1f of %s (%d%%)", self.entry.air, done / 1e6, megabytes(total),
                         100 * done // total if total else 0)
                logged_tenth, logged_at = tenth, now


def _start(entry: ModelEntry, downloads: Downloads, owner: str) -> HubFetch:
    fetch = HubFetch(entry)
    fetch.task = asyncio.get_running_loop().create_task(fetch.fetch(downloads, owner))

    def ended(task: asyncio.Task[Path]) -> None:
        downloads.forget(entry.air)
        # Read here, so that a failure nobody follows any more is logged rather than left unretrieved.
        if not task.cancelled() and task.exception() is not None:
            log.warning("download of %s failed: %s", entry.air, task.exception())

    fetch.task.add_done_callback(ended)
    return fetch


@dataclass(frozen=True)
class Prepared:
    task_uuid: str
    entry: ModelEntry


def prepare(task: ModelDownload, ctx: TaskContext) -> Prepared:
    services = ctx.services
    if not services.settings.allow_downloads or services.downloads is None:
        raise UnsupportedParameter(
            f"model: this server downloads no model, as it was started without --allow-downloads; its operator "
            f"can start it with --allow-downloads, or download {task.model} with the command modelSearch's "
            "comment gives.", parameter="model")
    try:
        entry = services.catalog.resolve(task.model)
    except RegistryError as exc:
        raise task_error(exc, "model") from exc
    if entry.source != "hub" or entry.problem:
        hub = [other.air for other in services.catalog.entries if other.source == "hub" and not other.problem]
        raise InvalidParameter(
            f"Invalid model: {entry.air} is not downloaded from the Hugging Face hub (its source is "
            f"{entry.source!r}); modelDownload fetches the catalog's hub models, such as "
            f"{', '.join(hub[:5]) or 'none here'}.", parameter="model", type="string", allowed_values=hub[:100])
    return Prepared(task.taskUUID, entry)


def _item(task_uuid: str, entry: ModelEntry, status: str, done: int, total: int) -> ModelDownloadResult:
    return ModelDownloadResult(taskType="modelDownload", taskUUID=task_uuid, air=entry.air, status=status,
                               bytesDone=done, bytesTotal=total)


async def run(prepared: Prepared, ctx: TaskContext) -> AsyncIterator[ModelDownloadResult]:
    downloads, task_uuid, entry = ctx.services.downloads, prepared.task_uuid, prepared.entry
    assert downloads is not None  # prepare refuses downloads without them
    if downloads.under_way(entry.air) is None:
        available, _ = await asyncio.to_thread(availability, entry, data_dir=ctx.services.settings.data_dir)
        if available:
            raise InvalidParameter(
                f"Invalid model: {entry.air} is on this server already (modelSearch lists it available); there "
                "is nothing to download.", parameter="model", type="string")
    fetch: HubFetch = downloads.shared(entry.air, lambda: _start(entry, downloads, ctx.owner))
    sent = -1
    while not fetch.task.done():
        # Waiting does not cancel the download: a follower that is cancelled (or whose client left) only stops
        # following it.
        await asyncio.wait({fetch.task}, timeout=PROGRESS_INTERVAL)
        if fetch.total is not None and not fetch.task.done():
            done = await asyncio.to_thread(fetch.done_bytes)
            if done != sent:
                sent = done
                yield _item(task_uuid, entry, "downloading", done, fetch.total)
    try:
        fetch.task.result()
    except WeightsMissing as exc:
        raise ServiceUnavailable(exc.problem, parameter="model") from exc
    total = fetch.total or 0
    yield _item(task_uuid, entry, "ready", total, total)


TASK_TYPE = TaskType(struct=ModelDownload, prepare=prepare, run=run)
