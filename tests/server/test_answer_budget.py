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



async def test_answers_waiting_for_the_bucket_are_paid_in_the_order_they_came() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=100 * FRAME_COST_BYTES, burst=FRAME_COST_BYTES, clock=clock)
    bucket.charge(1)
    bucket.charge(1)  # in debt: whoever comes now waits (10 ms of the bucket's time)
    order: list[int] = []

    async def answer(index: int) -> None:
        await bucket.ready()
        bucket.charge(1)
        order.append(index)

    waiting = [asyncio.ensure_future(answer(index)) for index in range(5)]
    await asyncio.sleep(0)  # they look, find the debt, and wait
    clock.now += 0.02  # the debt is paid off while they sleep: a newcomer now must still queue behind them
    newcomer = asyncio.ensure_future(answer(5))

    async def time_passes() -> None:
        while len(order) < 6:
            await asyncio.sleep(0.002)
            clock.now += 0.01

    await asyncio.wait_for(asyncio.gather(*waiting, newcomer, time_passes()), seconds(10))
    assert order == list(range(6))
