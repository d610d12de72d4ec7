"""A session's kept frames on resume (server/sessions.py): they reach the socket just attached in the order they
were made, and a task answered while they go queues behind them."""

from __future__ import annotations

import asyncio

from imagewire.server.sessions import SessionRegistry

OWNER = "owner-token"


async def resume_while_a_task_answers(session, kept: list[bytes]) -> list[bytes]:
    """Attach a socket that holds its first frame until a task has sent one more; what the socket took, in order."""
    taken: list[bytes] = []
    first_out, release = asyncio.Event(), asyncio.Event()

    async def socket(frame: bytes) -> bool:
        taken.append(frame)
        if len(taken) == 1:
            first_out.set()
            await release.wait()   # a slow client: the kept frames are still going out
        return True

    attaching = asyncio.create_task(session.attach(socket))
    await first_out.wait()
    answering = asyncio.create_task(session.send(b"answered during the resume"))
    for _ in range(5):
        await asyncio.sleep(0)
    release.set()
    await asyncio.wait_for(asyncio.gather(attaching, answering), timeout=10)
    return taken


async def test_a_task_answered_during_a_resume_comes_after_the_kept_frames() -> None:
    registry = SessionRegistry(resume_window=60.0, max_outbox_bytes=1 << 20)
    session, _ = await registry.open(OWNER, None)
    kept = [b"one", b"two", b"three"]
    for frame in kept:
        await session.send(frame)   # no socket: kept
    assert await resume_while_a_task_answers(session, kept) == [*kept, b"answered during the resume"]
    assert session.outbox == [] and session.outbox_bytes == 0


async def test_a_socket_that_closes_during_the_resume_leaves_the_rest_kept_in_order() -> None:
    registry = SessionRegistry(resume_window=60.0, max_outbox_bytes=1 << 20)
    session, _ = await registry.open(OWNER, None)
    for frame in (b"one", b"two", b"three"):
        await session.send(frame)
    taken: list[bytes] = []

    async def closing(frame: bytes) -> bool:
        if taken:
            return False   # closed after the first frame
        taken.append(frame)
        return True

    await session.attach(closing)
    await session.detach(closing)
    await session.send(b"four")
    assert taken == [b"one"] and session.outbox == [b"two", b"three", b"four"]
    assert session.outbox_bytes == len(b"twothreefour")
