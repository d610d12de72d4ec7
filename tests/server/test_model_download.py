"""modelDownload (our extension): a catalog model of the Hugging Face hub fetched over the wire with progress,
from a hub of our own on loopback (tests/fake_hub.py) serving the tiny model's files as a repo."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from tests.fake_hub import HUB_MODEL, REPO
from tests.wire import Wire, eventually, inference, new_uuid


def download(model: str = HUB_MODEL) -> dict[str, Any]:
    return {"taskType": "modelDownload", "taskUUID": new_uuid(), "model": model}


async def follow(wire: Wire, task: dict[str, Any]) -> list[dict[str, Any]]:
    """Send a modelDownload and read its items up to ``ready``."""
    await wire.send([task])
    items: list[dict[str, Any]] = []
    while not items or items[-1]["status"] != "ready":
        data, errors = await wire.items_for(task["taskUUID"], 1)
        assert not errors, errors
        items += data
    return items


async def searched(wire: Wire) -> dict[str, Any]:
    [found] = await wire.run({"taskType": "modelSearch", "search": "hubtest"})
    [model] = found["results"]
    return model


async def image(wire: Wire, model: str) -> str:
    [made] = await wire.run(inference(model=model, outputType="base64Data", seed=7))
    return str(made["imageBase64Data"])


async def test_a_download_reports_growing_bytes_ends_ready_and_the_model_runs(start_server, hub, hub_catalog):
    server = await start_server(allow_downloads=True, catalog_files=(hub_catalog,))
    wire = await Wire.open(server.url)
    before = await searched(wire)
    assert before["available"] is False and before["downloadable"] is True
    # The hint fits a server that downloads: no command to run by hand, and no flag to add.
    assert "on first use, or now with a modelDownload task" in before["comment"]
    assert REPO in before["comment"] and "hf download" not in before["comment"]
    assert "--allow-downloads" not in before["comment"]

    items = await follow(wire, download())
    *progress, ready = items
    total = sum(path.stat().st_size for path in hub.files(REPO).values())
    assert {key: value for key, value in ready.items() if key != "taskUUID"} == {
        "taskType": "modelDownload", "air": HUB_MODEL, "status": "ready", "bytesDone": total, "bytesTotal": total}
    assert len(progress) >= 2 and all(item["status"] == "downloading" for item in progress)
    done = [item["bytesDone"] for item in progress]
    assert done == sorted(done) and len(set(done)) == len(done) and done[-1] <= total
    assert all(item["bytesTotal"] == total for item in progress)
    # Each file was fetched once, the layout's marker last.
    fetched = [line.rsplit("/", 1)[1] for line in hub.requests if line.startswith("GET") and "/resolve/" in line]
    assert sorted(fetched) == sorted(name.rsplit("/", 1)[-1] for name in hub.files(REPO))
    assert fetched[-1] == "model_index.json"

    after = await searched(wire)
    assert after["available"] is True and after["downloadable"] is False and after["comment"] == ""
    # The tiny model's weights under another name: the same image at the same seed.
    assert await image(wire, HUB_MODEL) == await image(wire, "imagewire:tiny@1")
    # Now there is nothing to download.
    error = await wire.error(download())
    assert (error["code"], error["parameter"]) == ("invalidParameter", "model")
    assert "already" in error["message"]
    await wire.close()


async def test_a_download_goes_on_when_its_client_leaves_and_a_second_request_follows_it(
        start_server, hub, hub_catalog):
    server = await start_server(allow_downloads=True, catalog_files=(hub_catalog,))
    first = await Wire.open(server.url)
    task = download()
    await first.send([task])
    data, errors = await first.items_for(task["taskUUID"], 1)
    assert not errors and data[0]["status"] == "downloading"
    await first.close()
    # Another client asks meanwhile: it follows the same download to its end.
    second = await Wire.open(server.url)
    items = await follow(second, download())
    assert items[-1]["status"] == "ready"
    model = await eventually(lambda: searched(second))
    assert model["available"] is True
    fetched = [line for line in hub.requests if line.startswith("GET") and "/resolve/" in line]
    assert len(fetched) == len(hub.files(REPO))
    await second.close()


async def test_refusals_name_the_flag_the_model_and_what_would_do(start_server, hub, hub_catalog):
    plain = await start_server(catalog_files=(hub_catalog,))
    wire = await Wire.open(plain.url)
    error = await wire.error(download())
    assert (error["code"], error["parameter"]) == ("unsupportedParameter", "model")
    assert "--allow-downloads" in error["message"]
    model = await searched(wire)
    assert model["downloadable"] is False
    # Without the flag the hint is the operator's: the command that fetches the files, or the flag.
    assert f"hf download {REPO}" in model["comment"] and "--allow-downloads" in model["comment"]
    assert "modelDownload" not in model["comment"]
    await wire.close()

    server = await start_server(allow_downloads=True, catalog_files=(hub_catalog,))
    wire = await Wire.open(server.url)
    error = await wire.error(download("nobody:404@1"))
    assert (error["code"], error["parameter"]) == ("modelNotFound", "model")
    error = await wire.error(download("imagewire:tiny@1"))
    assert (error["code"], error["parameter"]) == ("invalidParameter", "model")
    assert HUB_MODEL in error["allowedValues"] and "'embedded'" in error["message"]
    error = await wire.error({"taskType": "modelDownload", "taskUUID": new_uuid()})
    assert error["parameter"] == "model"
    await wire.close()
    assert not [line for line in hub.requests if "/resolve/" in line]


async def test_a_hub_that_fails_leaves_the_model_missing(start_server, hub, hub_catalog):
    hub.refuse_files = True
    server = await start_server(allow_downloads=True, catalog_files=(hub_catalog,))
    wire = await Wire.open(server.url)
    task = download()
    await wire.send([task])
    data, errors = await wire.items_for(task["taskUUID"], 1000)
    assert errors and errors[0]["code"] == "serviceUnavailable" and errors[0]["parameter"] == "model"
    assert f"hf download {REPO}" in errors[0]["message"]
    assert (await searched(wire))["available"] is False
    # A hub that does not know the repo at all: the listing fails, and says so.
    hub.repos = {}
    error = await wire.error(download())
    assert (error["code"], error["parameter"]) == ("serviceUnavailable", "model")
    assert "could not be listed" in error["message"]
    await wire.close()


async def test_the_servers_log_has_its_own_progress_lines_and_none_of_the_hub_librarys_bars(
        start_server, hub, hub_catalog, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]):
    from huggingface_hub.utils import enable_progress_bars

    # On, as in a process where no download has run yet: the server's download is what turns them off.
    enable_progress_bars()
    caplog.set_level(logging.INFO, logger="imagewire.tasks.model_download")
    server = await start_server(allow_downloads=True, catalog_files=(hub_catalog,))
    wire = await Wire.open(server.url)
    capsys.readouterr()
    items = await follow(wire, download())
    await wire.close()
    stderr = capsys.readouterr().err
    # The hub library's tqdm bars ("Fetching 12 files: 100%|██████████| 12/12 [...]") are off.
    assert "Fetching" not in stderr and "%|" not in stderr and "\u2588" not in stderr, stderr
    total = items[-1]["bytesTotal"]
    size = f"{total / 1e6:.1f} MB"
    lines = [record.getMessage() for record in caplog.records if record.name == "imagewire.tasks.model_download"]
    assert lines[0] == f"downloading {HUB_MODEL} from Hugging Face repo '{REPO}': {size} to fetch"
    progress = [line for line in lines[1:-1] if re.fullmatch(
        rf"downloading {re.escape(HUB_MODEL)}: \d+\.\d of {re.escape(size)} \(\d+%\)", line)]
    # A download of a few seconds: a line per tenth reached at most, never two for the same tenth.
    percents = [int(line.rsplit("(", 1)[1].rstrip("%)")) for line in progress]
    assert progress and len(progress) == len(lines) - 2 and len(progress) <= 10
    assert len({percent // 10 for percent in percents}) == len(percents) and percents == sorted(percents)
    assert re.fullmatch(rf"downloaded {re.escape(HUB_MODEL)}: {re.escape(size)} in \d+\.\d s", lines[-1])


async def test_a_download_on_first_use_is_logged_without_the_hub_librarys_bars(
        start_server, hub, hub_catalog, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]):
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()
    caplog.set_level(logging.INFO, logger="imagewire.air_registry.weights")
    server = await start_server(allow_downloads=True, catalog_files=(hub_catalog,))
    wire = await Wire.open(server.url)
    capsys.readouterr()
    # No modelDownload: the request itself has the server fetch the model, and waits for it.
    made = await image(wire, HUB_MODEL)
    await wire.close()
    assert "Fetching" not in capsys.readouterr().err
    lines = [record.getMessage() for record in caplog.records if record.name == "imagewire.air_registry.weights"]
    assert lines[0] == f"downloading {HUB_MODEL} from Hugging Face repo '{REPO}' on first use"
    assert re.fullmatch(rf"downloaded {re.escape(HUB_MODEL)} in \d+\.\d s", lines[1])
    assert [line for line in hub.requests if "/resolve/" in line] and made
