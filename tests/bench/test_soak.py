"""The soak test on a small budget: 20 s, 20 mixed clients (the hostile ones included) against the fake engine.

As for the other bench smoke tests, no timing is asserted (the soak's own ping bound is reported, not held
here, on a shared 2-core box); that every task is answered exactly once and memory stays bounded is.
"""

from __future__ import annotations

import asyncio

from bench.soak import soak


def test_a_short_soak_answers_every_task_exactly_once() -> None:
    result = asyncio.run(soak(20, clients=20, max_rss_growth_mib=512))
    assert result["tasks_sent"] > 20 and result["unanswered"] == 0 and result["answered_twice"] == 0, result
    assert result["checks"]["every task answered exactly once"] and result["checks"]["RSS grew at most 512 MiB"]
    assert result["hostile"]["storm frames"] > 0 and result["ping_ms"]["count"] > 0
    assert {"success", "invalidParameter"} <= set(result["outcomes"]), result["outcomes"]
