"""The download of an uploaded model (``air_registry/uploads.py``), against an HTTP server on 127.0.0.1:
redirects are followed and each target's address checked, the disk reserve is kept, a stop ends it, and
whatever fails leaves nothing behind."""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from imagewire.air_registry.air import parse_air
from imagewire.air_registry.civitai import DownloadLimits
from imagewire.air_registry.uploads import ModelUploads, Upload, UploadFailed
from imagewire.storage import is_forbidden_address

PRIVATE = ipaddress.ip_network("10.0.0.0/8")


@pytest.fixture
async def site() -> AsyncIterator[str]:
    async def data(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 4 * 65536
        await response.prepare(request)
        for _ in range(4):
            await response.write(b"\0" * 65536)
            await asyncio.sleep(0.05)
        return response

    async def moved(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(request.query["to"])

    app = web.Application()
    app.router.add_get("/data", data)
    app.router.add_get("/moved", moved)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server = web.TCPSite(runner, "127.0.0.1", 0)
    await server.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
def loopback_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The address rule with loopback let through (as the test server is there) and 10.0.0.0/8 still refused."""
    monkeypatch.setattr(sys.modules[__name__], "is_forbidden_address", lambda address: address in PRIVATE)


def upload(url: str) -> Upload:
    return Upload(air=parse_air("test:1@1"), url=url, url_parameter="downloadURL", category="checkpoint",
                  architectures=("tiny",), stated="tiny", unique_identifier="x")


async def fetch(uploads: ModelUploads, url: str, stop: threading.Event | None = None) -> Path:
    wanted = upload(url)
    return await asyncio.to_thread(uploads.download, wanted, uploads.partial(wanted), stop)


async def test_a_redirect_is_followed_and_its_target_checked(site, loopback_allowed, tmp_path):
    uploads = ModelUploads(models_dir=tmp_path, is_forbidden_address=is_forbidden_address)
    partial = await fetch(uploads, f"{site}/moved?to={site}/data")
    assert partial.stat().st_size == 4 * 65536
    partial.unlink()
    with pytest.raises(UploadFailed, match="non-public address") as caught:
        await fetch(uploads, f"{site}/moved?to=http://10.1.2.3/model.safetensors")
    assert caught.value.parameter == "downloadURL"
    assert list(tmp_path.iterdir()) == []


async def test_the_free_disk_reserve_is_kept_while_writing(site, loopback_allowed, tmp_path):
    uploads = ModelUploads(models_dir=tmp_path, is_forbidden_address=is_forbidden_address,
                           limits=DownloadLimits(min_free_bytes=2 ** 62))
    with pytest.raises(UploadFailed, match="--min-free-disk-gib") as caught:
        await fetch(uploads, f"{site}/data")
    assert caught.value.server_side
    assert list(tmp_path.iterdir()) == []


async def test_a_stop_ends_the_download_at_its_next_chunk(site, loopback_allowed, tmp_path):
    stop = threading.Event()
    stop.set()
    with pytest.raises(UploadFailed, match="cancelled"):
        await fetch(ModelUploads(models_dir=tmp_path, is_forbidden_address=is_forbidden_address), f"{site}/data", stop)
    assert list(tmp_path.iterdir()) == []


async def test_loopback_is_refused_by_the_real_rule(site, tmp_path):
    with pytest.raises(UploadFailed, match="non-public address"):
        await fetch(ModelUploads(models_dir=tmp_path, is_forbidden_address=is_forbidden_address), f"{site}/data")
    assert list(tmp_path.iterdir()) == []
