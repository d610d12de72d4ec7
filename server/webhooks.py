"""Webhook delivery for tasks sent with a webhookURL: each finished result is POSTed as ``{"data": [item]}``.

Deliveries run in the background with bounded retries and exponential backoff; the URL is
held to the same address rules as image URLs (no loopback or private networks unless the
operator allows them), because a webhook is a request the server makes on a client's word.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec

from imagewire.storage import InputRejected, UrlFetcher

log = logging.getLogger("imagewire.webhook")


class WebhookSender:
    def __init__(self, fetcher: UrlFetcher, *, attempts: int, first_delay: float = 1.0) -> None:
        self.fetcher = fetcher
        self.attempts = attempts
        self.first_delay = first_delay
        self._deliveries: set[asyncio.Task[bool]] = set()

    @property
    def pending(self) -> int:
        """Deliveries not finished yet, retries included."""
        return len(self._deliveries)

    def send(self, url: str, item: dict[str, Any]) -> asyncio.Task[bool]:
        delivery = asyncio.create_task(self._deliver(url, item))
        self._deliveries.add(delivery)
        delivery.add_done_callback(self._deliveries.discard)
        return delivery

    async def _deliver(self, url: str, item: dict[str, Any]) -> bool:
        body = msgspec.json.encode({"data": [item]})
        task_uuid = item.get("taskUUID")
        for attempt in range(1, self.attempts + 1):
            try:
                status = await self.fetcher.post_json(url, body)
                log.info("taskUUID=%s webhook delivered status=%d attempt=%d", task_uuid, status, attempt)
                return True
            except InputRejected as error:
                log.warning("taskUUID=%s webhook attempt %d/%d failed: %s", task_uuid, attempt, self.attempts,
                            error.describe("webhookURL"))
            if attempt < self.attempts:
                await asyncio.sleep(self.first_delay * 2 ** (attempt - 1))
        return False

    async def close(self, timeout: float) -> None:
        """Give deliveries in progress up to ``timeout`` seconds, then drop them."""
        if not self._deliveries:
            return
        _, unfinished = await asyncio.wait(set(self._deliveries), timeout=timeout)
        for delivery in unfinished:
            delivery.cancel()
