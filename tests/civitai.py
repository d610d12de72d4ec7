"""A stand-in for Civitai's public API on 127.0.0.1: model versions as JSON and their files, served
whole, cut off half-way, or not at all, so that every way a download can go is tested offline."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeCivitai:
    """Versions by id; ``files`` by name; what each request carried, in ``requests``."""

    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    interrupted: set[str] = field(default_factory=set)   # file names sent only half-way
    unannounced: set[str] = field(default_factory=set)   # file names sent without a Content-Length
    seconds_per_chunk: dict[str, float] = field(default_factory=dict)  # file names sent slowly, 64 KiB a step
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Authorization)
    url: str = ""
    runner: web.AppRunner | None = None

    async def close(self) -> None:
        """Stop answering: Civitai out of reach."""
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()

    def add_version(self, *, model: int, version: int, data: bytes, file_name: str = "model.safetensors",
                    kind: str = "Checkpoint", sha256: str | None = None, **file_fields: Any) -> str:
        """Serve ``data`` as the primary file of ``civitai:model@version``; its AIR."""
        self.files[file_name] = data
        self.versions[str(version)] = {
            "id": version, "modelId": model, "name": f"v{version}", "baseModel": "SD 1.5",
            "model": {"name": f"Model {model}", "type": kind},
            "files": [{
                "name": file_name, "type": "Model", "primary": True, "sizeKB": len(data) / 1024,
                "metadata": {"format": "SafeTensor" if file_name.endswith(".safetensors") else "PickleTensor"},
                "hashes": {"SHA256": (sha256 or hashlib.sha256(data).hexdigest()).upper()},
                "downloadUrl": f"{self.url}/files/{file_name}",
                **file_fields,
            }],
        }
        return f"civitai:{model}@{version}"

    def downloads(self) -> int:
        return sum(1 for path, _ in self.requests if path.startswith("/files/"))

    async def _version(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        version = self.versions.get(request.match_info["version"])
        if version is None:
            return web.json_response({"error": "No version with id"}, status=404)
        return web.json_response(version)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        name = request.match_info["name"]
        data = self.files.get(name)
        if data is None:
            return web.Response(status=404, text="not found")
        delay = self.seconds_per_chunk.get(name)
        if name in self.unannounced or delay is not None:
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            if name not in self.unannounced:
                response.content_length = len(data)
            await response.prepare(request)
            for start in range(0, len(data), 65536):
                await response.write(data[start:start + 65536])
                if delay:
                    await asyncio.sleep(delay)
            await response.write_eof()
            return response
        if name not in self.interrupted:
            return web.Response(body=data, content_type="application/octet-stream")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        # As a dropped connection: the rest of the announced bytes never come.
        assert request.transport is not None
        request.transport.close()
        return response

    def _note(self, request: web.Request) -> None:
        self.requests.append((request.path, request.headers.get("Authorization")))


@asynccontextmanager
async def fake_civitai() -> AsyncIterator[FakeCivitai]:
    civitai = FakeCivitai()
    app = web.Application()
    app.router.add_get("/api/v1/model-versions/{version}", civitai._version)
    app.router.add_get("/files/{name}", civitai._file)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    civitai.url = f"http://127.0.0.1:{port}"
    civitai.runner = runner
    try:
        yield civitai
    finally:
        await civitai.close()
