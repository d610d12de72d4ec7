"""A blocking facade over ``Client`` for code that has no event loop.

It is not a second implementation: a private event loop runs in a daemon thread, the
async ``Client`` lives on it, and each method submits the matching coroutine there and
waits for its result.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from imagewire_client.client import DEFAULT_URL, Client
from imagewire_client.errors import CLIENT_CLOSED, ImagewireError

P = ParamSpec("P")
R = TypeVar("R")


def _blocking(
    method: Callable[Concatenate[Client, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SyncClient, P], R]:
    """The blocking twin of an async ``Client`` method, with the same parameters and docstring."""

    @functools.wraps(method)
    def call(self: SyncClient, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(method(self._client, *args, **kwargs))

    return call


class SyncClient:
    """Blocking imagewire client: ``with SyncClient(url, api_key) as client: client.upload(...)``.

    Takes the same arguments as ``Client``; its methods are ``Client``'s without ``await``.
    """

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="imagewire-client-loop", daemon=True)
        self._thread.start()
        self._closed = False

        async def create() -> Client:
            # Built on its own loop, so that everything it creates belongs to that loop.
            return Client(url, api_key, **options)

        try:
            self._client = self._run(create())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coroutine: Coroutine[Any, Any, R]) -> R:
        if self._closed:
            coroutine.close()
            raise ImagewireError(CLIENT_CLOSED, "The client is closed; create a new one.")
        future: Future[R] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            # E.g. Ctrl-C while waiting: stop the call instead of leaving it running in the background.
            future.cancel()
            raise

    @property
    def session_uuid(self) -> str | None:
        return self._client.session_uuid

    def connect(self) -> SyncClient:
        """Connect and authenticate now rather than on the first call."""
        self._run(self._client.connect())
        return self

    upload = _blocking(Client.upload)
    upload_image = _blocking(Client.upload_image)
    image_inference = _blocking(Client.image_inference)
    cancel = _blocking(Client.cancel)
    models = _blocking(Client.models)
    model_info = _blocking(Client.model_info)
    upload_model = _blocking(Client.upload_model)
    download_model = _blocking(Client.download_model)
    upscale = _blocking(Client.upscale)
    remove_background = _blocking(Client.remove_background)
    caption = _blocking(Client.caption)
    enhance_prompt = _blocking(Client.enhance_prompt)
    controlnet_preprocess = _blocking(Client.controlnet_preprocess)
    mask = _blocking(Client.mask)

    def close(self) -> None:
        """Close the connection and stop the background loop. Safe to call twice."""
        if self._closed:
            return
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        try:
            self.connect()
        except BaseException:
            # The caller never gets the object to close when entering fails: release the thread here.
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
