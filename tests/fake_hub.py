"""A Hugging Face hub of our own on loopback, for the tests of hub downloads: it serves the repos it is given
(a folder each) through the few endpoints ``huggingface_hub.snapshot_download`` calls, slowly when asked, so
that a download's progress can be seen. ``point_hub_at`` makes huggingface_hub of this process use it (and an
empty cache of the test's own), as an operator's ``HF_ENDPOINT`` and ``HF_HUB_CACHE`` would.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from aiohttp import web

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# The repo the fixtures serve (the tiny model's files), and the catalog entry that names it.
REPO = "imagewire-test/tiny-sd"
HUB_MODEL = "hubtest:tiny@1"


class FakeHub:
    def __init__(self, repos: dict[str, Path], *, chunk: int = 64 * 1024, pause: float = 0.0) -> None:
        self.repos = repos
        self.chunk, self.pause = chunk, pause   # the file bodies go out ``chunk`` bytes at a time, ``pause`` apart
        self.requests: list[str] = []
        self.refuse_files = False   # answer the listing, and no file's body: a hub that fails mid-download
        self.url = ""
        self._runner: web.AppRunner | None = None

    def files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {path.relative_to(root).as_posix(): path for path in sorted(root.rglob("*")) if path.is_file()}

    @staticmethod
    def etag(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    async def start(self) -> FakeHub:
        app = web.Application()
        app.router.add_get("/api/models/{owner}/{name}/revision/{revision}", self._repo_info)
        app.router.add_get("/api/models/{owner}/{name}/tree/{revision:.*}", self._tree)
        app.router.add_route("*", "/{owner}/{name}/resolve/{revision}/{path:.+}", self._file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _repo(self, request: web.Request) -> str:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        self.requests.append(f"{request.method} {request.path}")
        if repo not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"})
        return repo

    async def _repo_info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        return web.json_response({"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                                  "siblings": [{"rfilename": name} for name in self.files(repo)]})

    async def _tree(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        return web.json_response([
            {"type": "file", "path": name, "size": path.stat().st_size, "oid": self.etag(path)[:40]}
            for name, path in self.files(repo).items()])

    async def _file(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        path = self.files(repo).get(request.match_info["path"])
        if path is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        body = path.read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{self.etag(path)}"', "Content-Length": str(len(body)),
                   "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        if self.refuse_files:
            raise web.HTTPForbidden()
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        for start in range(0, len(body), self.chunk):
            await response.write(body[start:start + self.chunk])
            if self.pause:
                await asyncio.sleep(self.pause)
        await response.write_eof()
        return response


def point_hub_at(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub in this process downloads from ``hub`` into ``cache`` (it reads its settings once, at
    import: the module's values are what it uses)."""
    import huggingface_hub.constants as hub_constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
