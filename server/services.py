"""What task handlers may use: the process-wide services and the per-task context."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from air_registry.catalog import Catalog
from server.config import Config
from server.scheduler import Scheduler
from server.sessions import SessionRegistry, TaskRegistry
from server.webhooks import WebhookSender
from storage import ImageStore, UrlFetcher


@dataclass
class Services:
    config: Config
    store: ImageStore
    fetcher: UrlFetcher
    catalog: Catalog
    scheduler: Scheduler
    sessions: SessionRegistry
    registry: TaskRegistry
    webhooks: WebhookSender
    tasks_by_owner: Counter[str] = field(default_factory=Counter)          # unfinished tasks per API key
    unauthenticated_by_ip: Counter[str] = field(default_factory=Counter)   # sockets awaiting authentication


@dataclass
class TaskContext:
    services: Services
    owner: str                       # owner token of the API key the connection authenticated with
    timings: dict[str, float] = field(default_factory=dict)  # stage → seconds, for the task's log line

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started
