"""modelDownload through the clients: ``Client.download_model``, its blocking twin and ``imagewire download``,
against a server with --allow-downloads that fetches from the fake hub (tests/fake_hub.py)."""

from __future__ import annotations

import asyncio
import io

import pytest
from imagewire_client import Client, ImagewireError, SyncClient
from imagewire_client.cli import DownloadProgress

from tests.clients.test_cli import imagewire
from tests.fake_hub import HUB_MODEL, REPO, FakeHub
from tests.wire import API_KEY


def repo_size(hub: FakeHub) -> int:
    return sum(path.stat().st_size for path in hub.files(REPO).values())


async def test_the_async_client_reports_growing_bytes_and_returns_the_ready_answer(start_server, hub, hub_catalog):
    server = await start_server(allow_downloads=True, catalog_files=(hub_catalog,))
    heard: list[tuple[int, int]] = []
    async with Client(server.url, API_KEY) as client:
        [before] = await client.models("hubtest")
        ready = await client.download_model(HUB_MODEL, on_progress=lambda done, total: heard.append((done, total)))
        [after] = await client.models("hubtest")
        # The downloaded model makes the tiny model's image at the same seed: its weights arrived whole.
        [made] = await client.image_inference(model=HUB_MODEL, positive_prompt="a kite", width=128, height=128,
                                              steps=2, seed=5, output_type="base64Data")
        [tiny] = await client.image_inference(model="imagewire:tiny@1", positive_prompt="a kite", width=128,
                                              height=128, steps=2, seed=5, output_type="base64Data")
    total = repo_size(hub)
    assert (ready.air, ready.status, ready.bytesDone, ready.bytesTotal) == (HUB_MODEL, "ready", total, total)
    assert len(heard) >= 2 and all(seen_total == total for _, seen_total in heard)
    done = [seen for seen, _ in heard]
    assert done == sorted(done) and done[-1] <= total
    assert before.downloadable and not before.available
    assert after.available and not after.downloadable
    assert made.image_bytes == tiny.image_bytes


async def test_the_blocking_client_downloads_and_a_server_without_the_flag_says_why_not(
        start_server, hub, hub_catalog):
    plain = await start_server(catalog_files=(hub_catalog,))
    server = await start_server(allow_downloads=True, catalog_files=(hub_catalog,))
    heard: list[tuple[int, int]] = []

    def refused() -> ImagewireError:
        with SyncClient(plain.url, API_KEY) as client, pytest.raises(ImagewireError) as caught:
            client.download_model(HUB_MODEL)
        return caught.value

    def downloaded():
        with SyncClient(server.url, API_KEY) as client:
            return client.download_model(HUB_MODEL, on_progress=lambda done, total: heard.append((done, total)))

    error = await asyncio.to_thread(refused)
    assert (error.code, error.parameter) == ("unsupportedParameter", "model")
    assert "--allow-downloads" in error.message
    ready = await asyncio.to_thread(downloaded)
    assert (ready.status, ready.bytesTotal) == ("ready", repo_size(hub)) and heard


async def test_the_download_command_shows_a_bar_and_prints_the_air(start_server, hub, hub_catalog):
    server = await start_server(allow_downloads=True, catalog_files=(hub_catalog,))
    run = await imagewire("download", HUB_MODEL, url=server.url)
    assert run.code == 0, run.stderr
    assert run.lines == [HUB_MODEL]
    total_mb = f"{repo_size(hub) / 1e6:.1f}"
    bars = [line for line in run.stderr.splitlines() if line.startswith(f"downloading {HUB_MODEL} [")]
    # Not a terminal: a line per tenth of the way at most, the bar filling up.
    assert 2 <= len(bars) <= 11 and all(line.endswith(f"/{total_mb} MB") for line in bars)
    assert "] 100% " in bars[-1] and "] 100% " not in bars[0]
    assert run.stderr.splitlines()[-1] == f"{HUB_MODEL}: {total_mb} MB downloaded, ready"
    # Downloaded now: a second try is refused, and says so.
    again = await imagewire("download", HUB_MODEL, url=server.url)
    assert again.code == 1 and "already" in again.stderr


async def test_the_download_command_exits_1_with_the_servers_message(start_server, hub, hub_catalog):
    plain = await start_server(catalog_files=(hub_catalog,))
    run = await imagewire("download", HUB_MODEL, url=plain.url)
    assert run.code == 1 and run.stdout == ""
    error_line = run.stderr.splitlines()[-1]
    assert error_line.startswith("error: unsupportedParameter: ") and "--allow-downloads" in error_line
    assert error_line.endswith("(parameter: model)")
    assert not [line for line in hub.requests if "/resolve/" in line]


async def test_the_download_command_on_a_terminal_redraws_one_line(start_server, hub, hub_catalog):
    server = await start_server(allow_downloads=True, catalog_files=(hub_catalog,))
    run = await imagewire("download", HUB_MODEL, url=server.url, stderr_tty=True)
    assert run.code == 0 and run.lines == [HUB_MODEL]
    # The bar is redrawn in place (carriage return, erase line) rather than a line per answer.
    assert run.stderr.count(f"\r\x1b[Kdownloading {HUB_MODEL} [") >= 2
    assert f"{HUB_MODEL}: " in run.stderr.splitlines()[-1]


def test_the_download_bar_counts_megabytes_and_percent() -> None:
    log = io.StringIO()   # not a terminal: a line per tenth of the way
    progress = DownloadProgress("hubtest:tiny@1", log)
    for done in (0, 50_000, 300_000, 310_000, 2_000_000):
        progress.update(done, 2_000_000)
    assert log.getvalue().splitlines() == [
        "downloading hubtest:tiny@1 [------------------------]   0% 0.0/2.0 MB",
        "downloading hubtest:tiny@1 [###---------------------]  15% 0.3/2.0 MB",
        "downloading hubtest:tiny@1 [########################] 100% 2.0/2.0 MB",
    ]
