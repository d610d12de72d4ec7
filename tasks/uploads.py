"""uploadEndpoint: each result image, once stored, is PUT as it is (its bytes, its Content-Type) to the URL the
task names, typically a presigned URL of the client's own bucket.

The request is the outbound client's (``storage/fetch.py``), with the rules every request the server makes on
a client's word follows: only public addresses unless the operator allows private ones
(``--allow-private-urls``), a bounded time per attempt, no redirects, and the answer's body never read. Like a
webhook it is tried again with growing pauses, ``ATTEMPTS`` times in all. It is asynchronous I/O on the event
loop: an upload that waits on a slow endpoint holds no thread, so other tasks, of this key or any other, go on.
It holds only its own task, whose result is answered once the upload is over, saying whether it succeeded.
"""

from __future__ import annotations

import asyncio
import logging

from imagewire.storage import InputRejected
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter, UploadFailed

log = logging.getLogger("imagewire.upload")

PARAMETER = "uploadEndpoint"
ATTEMPTS = 4                # as webhooks (server/config.py webhook_attempts)
FIRST_DELAY_SECONDS = 1.0   # then 2 s, 4 s: at most 7 s of pauses besides the attempts themselves


def check(ctx: TaskContext, url: str) -> str:
    """``url`` if the outbound client could send to it, as far as that is known before the task runs (a host
    name's addresses are checked when it is resolved); InvalidParameter naming uploadEndpoint otherwise."""
    try:
        ctx.services.fetcher.check(url)
    except InputRejected as error:
        raise InvalidParameter(
            f"{error.describe(PARAMETER)}. uploadEndpoint must be an http:// or https:// URL of a public address "
            "(an operator lets this server reach private ones with --allow-private-urls).",
            parameter=PARAMETER, type="string") from None
    return url


async def upload(ctx: TaskContext, url: str, data: bytes, content_type: str, *, image_uuid: str) -> bool:
    """PUT ``data`` to ``url``; True once an attempt succeeds. When every attempt fails, the task is told to end
    with an uploadFailed error naming uploadEndpoint (``ctx.defer``), and False is returned: the image is stored
    and its result answered all the same."""
    problem = ""
    with ctx.timed("upload"):
        for attempt in range(1, ATTEMPTS + 1):
            try:
                status = await ctx.services.fetcher.put(url, data, content_type)
            except InputRejected as error:
                # The error names the origin only: a presigned URL's query is a credential.
                problem = error.problem
                log.warning("image %s upload attempt %d/%d failed: %s", image_uuid, attempt, ATTEMPTS, problem)
            else:
                log.info("image %s uploaded status=%d attempt=%d", image_uuid, status, attempt)
                return True
            if attempt < ATTEMPTS:
                await asyncio.sleep(FIRST_DELAY_SECONDS * 2 ** (attempt - 1))
    ctx.defer(UploadFailed(
        f"Result image {image_uuid} was stored and is available by its imageUUID (and imageURL), but uploading it "
        f"to uploadEndpoint failed after {ATTEMPTS} attempts: {problem}.", parameter=PARAMETER, type="string"))
    return False
