"""The answer budget: a token bucket of answer bytes, in debt after a large answer, waited off at its rate."""

from __future__ import annotations

import asyncio

from imagewire.server.answer_budget import FRAME_COST_BYTES, MAX_BUCKETS, AnswerBudget, TokenBucket
from tests.timing import seconds


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_fills_at_its_rate_up_to_its_burst_and_a_frame_costs_at_least_the_floor() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1000, burst=10 * FRAME_COST_BYTES, clock=clock)
    assert bucket.level() == 10 * FRAME_COST_BYTES
    bucket.charge(10)  # a pong: charged what handling a frame costs, not its ten bytes
    assert bucket.level() == 9 * FRAME_COST_BYTES
    bucket.charge(12 * FRAME_COST_BYTES)  # larger than the bucket: it goes, and the bucket is in debt
    assert bucket.level() == -3 * FRAME_COST_BYTES
    clock.now += 3 * FRAME_COST_BYTES / 1000
    assert bucket.level() == 0
    clock.now += 3600
    assert bucket.level() == 10 * FRAME_COST_BYTES and bucket.full


async def test_answers_in_debt_wait_it_off_one_at_a_time() -> None:
    # Real time, small numbers: 20 frames at 200 frames' worth a second after a burst of two take ~0.09 s.
    bucket = TokenBucket(rate=200 * FRAME_COST_BYTES, burst=2 * FRAME_COST_BYTES)
    paid: list[float] = []
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def answer() -> None:
        await bucket.ready()
        bucket.charge(1)
        paid.append(loop.time() - started)

    await asyncio.gather(*(answer() for _ in range(20)))
    # Three go at once (two from the burst, the third into debt), the rest one per 5 ms: never all at once.
    assert paid[2] < 0.004 <= paid[3]
    assert 0.08 <= paid[-1] < seconds(0.5)


def test_keys_have_their_own_buckets_and_full_ones_are_forgotten_when_many() -> None:
    clock = Clock()
    budget = AnswerBudget(rate=1000, burst=FRAME_COST_BYTES, clock=clock)
    budget.bucket("a").charge(5 * FRAME_COST_BYTES)
    assert budget.bucket("a").level() < 0 and budget.bucket("b").level() == FRAME_COST_BYTES
    assert budget.per_socket() is not budget.per_socket()
    for index in range(MAX_BUCKETS):
        budget.bucket(f"key-{index}")
    assert len(budget) <= MAX_BUCKETS and budget.bucket("a").level() < 0  # a key in debt is kept
