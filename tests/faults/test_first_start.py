"""A first start without surprises, as an operator sees it in the terminal: a line at once, a taken port or a
model that cannot be loaded said in one line (before, not after, the models load), and a banner naming where
clients connect, the playground and the key."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path

from tests.timing import seconds
from tests.wire import API_KEY


async def run_server(data_dir: Path, *args: str, until: bytes | None = None,
                     env: dict[str, str] | None = None) -> tuple[int | None, list[tuple[float, str]]]:
    """Start ``python -m imagewire.server`` and read its stderr, each line with the seconds since launch, until it
    exits or prints ``until`` (then it is stopped)."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagewire.server", "--data-dir", str(data_dir), *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})})
    assert process.stderr is not None
    lines: list[tuple[float, str]] = []
    try:
        while line := await asyncio.wait_for(process.stderr.readline(), seconds(120)):
            lines.append((time.monotonic() - started, line.decode().rstrip("\n")))
            if until is not None and until in line:
                break
    finally:
        if process.returncode is None and until is not None:
            process.terminate()
        code = await asyncio.wait_for(process.wait(), seconds(60))
    return (code if until is None else None), lines


async def test_the_first_line_comes_at_once_and_the_banner_names_urls_and_the_key(tmp_path):
    _, lines = await run_server(tmp_path / "data", "--port", "0", "--engine", "fake",
                                until=b"API key:")
    first_at, first = lines[0]
    assert "starting" in first and "default model imagewire:tiny@1" in first
    # Measured 0.3-0.5 s on 2 busy cores; the bound leaves room for a slower machine.
    assert first_at < seconds(2)
    text = "\n".join(line for _, line in lines)
    ready = next(line for _, line in lines if line.startswith("imagewire ready: ws://127.0.0.1:"))
    port = ready.rsplit(":", 1)[1].removesuffix("/v1")
    assert f"playground: http://127.0.0.1:{port}/" in text
    assert f"API key:    the key kept in {(tmp_path / 'data' / 'api-key').resolve()}" in text


async def test_a_taken_port_is_one_line_before_any_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = await run_server(tmp_path / "data", "--port", str(port), "--api-key", API_KEY)
    assert code == 2
    assert lines[-1][1] == f"imagewire-server: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    # Said before the engine started: no model was loaded for it.
    assert not any("imagewire.engine" in line for _, line in lines)


async def test_a_default_model_that_cannot_be_loaded_stops_the_start_in_one_line(tmp_path, empty_hf_cache):
    env = {"HF_HOME": str(empty_hf_cache.parent), "HF_HUB_CACHE": str(empty_hf_cache)}
    code, lines = await run_server(tmp_path / "data", "--port", "0", "--api-key", API_KEY,
                                   "--default-model", "sd15", env=env)
    assert code == 2
    text = "\n".join(line for _, line in lines)
    assert "Traceback" not in text
    assert lines[-1][1].startswith("imagewire-server: error: --default-model imagewire:sd15@1 could not be "
                                   "loaded: the weights of Stable Diffusion 1.5")
    assert lines[-1][1].endswith("(--on-preload-failure continue starts without it)")


async def test_by_flag_the_start_goes_on_without_it_and_says_so(tmp_path, empty_hf_cache):
    env = {"HF_HOME": str(empty_hf_cache.parent), "HF_HUB_CACHE": str(empty_hf_cache)}
    _, lines = await run_server(tmp_path / "data", "--port", "0", "--api-key", API_KEY, "--default-model", "sd15",
                                "--on-preload-failure", "continue", env=env, until=b"API key:")
    text = "\n".join(line for _, line in lines)
    assert "Traceback" not in text
    warnings = [line for _, line in lines if " WARNING " in line]
    assert len(warnings) == 1 and "--default-model imagewire:sd15@1 could not be loaded, starting without it" \
        in warnings[0]
    assert any(line.startswith("imagewire ready: ") for _, line in lines)
