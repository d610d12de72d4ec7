"""The ``imagewire`` command, run as a real subprocess against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.timing import seconds
from tests.wire import API_KEY

TINY = "imagewire:tiny@1"
SMALL = ["--model", TINY, "--steps", "2"]


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


async def imagewire(*args: str, url: str | None = None, api_key: str | None = API_KEY,
                    stderr_tty: bool = False, cwd: Path | None = None) -> Run:
    """Run the command; the connection comes from the environment, as a user would set it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGEWIRE_")}
    if url is not None:
        env["IMAGEWIRE_URL"] = url
    if api_key is not None:
        env["IMAGEWIRE_API_KEY"] = api_key
    controller = terminal = None
    if stderr_tty:
        controller, terminal = pty.openpty()
    # asyncio's subprocess keeps the event loop (and the server on it) running while the command works.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagewire_client.cli", *args, env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=terminal if stderr_tty else asyncio.subprocess.PIPE,
    )
    if terminal is not None:
        os.close(terminal)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), seconds(120))
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if controller is not None:
        stderr = await asyncio.to_thread(_drain, controller)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), (stderr or b"").decode())


def _drain(controller: int) -> bytes:
    output = b""
    try:
        while chunk := os.read(controller, 4096):
            output += chunk
    except OSError:  # EIO: the terminal's other side is closed and everything was read
        pass
    finally:
        os.close(controller)
    return output


def seed_png(folder: Path, width: int = 192, height: int = 128) -> Path:
    path = folder / "seed.png"
    Image.new("RGB", (width, height), "navy").save(path)
    return path


def opened(path: Path) -> tuple[str | None, tuple[int, int]]:
    with Image.open(path) as image:
        image.load()
        return image.format, image.size


async def test_upload_prints_one_uuid_per_file_and_json_on_request(server, tmp_path: Path):
    seed = seed_png(tmp_path)
    plain = await imagewire("upload", str(seed), str(seed), url=server.url)
    as_json = await imagewire("upload", "--json", str(seed), url=server.url)
    assert plain.code == 0, plain.stderr
    assert len(plain.lines) == 2 and all(len(line) == 36 for line in plain.lines)
    assert as_json.code == 0, as_json.stderr
    (record,) = [json.loads(line) for line in as_json.lines]
    assert set(record) == {"imageUUID", "imageURL"}
    assert record["imageURL"].endswith(".png") and record["imageUUID"] in record["imageURL"]


async def test_generate_text_to_image_writes_decodable_files_and_prints_their_paths(server, tmp_path: Path):
    out = tmp_path / "out" / "nested"
    run = await imagewire("generate", *SMALL, "--prompt", "a castle on a hill", "--width", "128", "--height", "128",
                          "--seed", "11", "--number-results", "2", "--out", str(out), url=server.url)
    assert run.code == 0, run.stderr
    paths = [Path(line) for line in run.lines]
    assert len(paths) == 2
    for path in paths:
        assert path.parent == out and path.suffix == ".png" and len(path.stem) == 36
        assert opened(path) == ("PNG", (128, 128))
    assert run.stderr.count("\n") == 1 and "generating 2 images" in run.stderr


async def test_generate_image_to_image_from_a_file_and_from_a_uuid(server, tmp_path: Path):
    seed = seed_png(tmp_path)
    from_file = await imagewire("generate", *SMALL, "--prompt", "the same, at night", "--image", str(seed),
                                "--strength", "0.5", "--format", "jpg", "--out", str(tmp_path), url=server.url)
    assert from_file.code == 0, from_file.stderr
    (path,) = [Path(line) for line in from_file.lines]
    assert path.suffix == ".jpg" and opened(path) == ("JPEG", (192, 128))

    uploaded = (await imagewire("upload", str(seed), url=server.url)).lines[0]
    from_uuid = await imagewire("generate", *SMALL, "--prompt", "the same, in fog", "--image", uploaded,
                                "--width", "128", "--height", "128", "--format", "webp", cwd=tmp_path, url=server.url)
    assert from_uuid.code == 0, from_uuid.stderr
    (relative,) = from_uuid.lines
    assert opened(tmp_path / relative) == ("WEBP", (128, 128))


async def test_generate_without_a_size_takes_the_models_default_size(server, tmp_path: Path):
    both = await imagewire("generate", "--model", "imagewire:tiny-sdxl@1", "--steps", "2", "--prompt", "a harbour",
                           "--out", str(tmp_path / "both"), url=server.url)
    width_only = await imagewire("generate", *SMALL, "--prompt", "a harbour", "--width", "128",
                                 "--out", str(tmp_path / "width"), url=server.url)
    by_alias = await imagewire("generate", "--model", "tiny", "--steps", "2", "--prompt", "a harbour",
                               "--height", "192", "--out", str(tmp_path / "alias"), url=server.url)
    for run in (both, width_only, by_alias):
        assert run.code == 0, run.stderr
    assert opened(Path(both.lines[0])) == ("PNG", (256, 256))
    assert "256x256 (the model's default size)" in both.stderr
    assert opened(Path(width_only.lines[0])) == ("PNG", (128, 256))
    assert "128x256 (the model's default height)" in width_only.stderr
    assert opened(Path(by_alias.lines[0])) == ("PNG", (256, 192))


async def test_generate_from_an_image_keeps_its_size_and_asks_for_no_default(server, tmp_path: Path):
    seed = seed_png(tmp_path, 320, 192)
    run = await imagewire("generate", *SMALL, "--prompt", "a harbour", "--image", str(seed), "--out", str(tmp_path),
                          url=server.url)
    assert run.code == 0, run.stderr
    assert opened(Path(run.lines[0]))[1] == (320, 192)
    assert "default" not in run.stderr


async def test_generate_with_a_model_the_catalog_lacks_gets_the_servers_answer(server):
    run = await imagewire("generate", "--model", "nowhere:1@1", "--prompt", "a fox", url=server.url)
    assert run.code == 1
    assert "nowhere:1@1" in run.stderr and "error: " in run.stderr


@pytest.mark.parametrize(("command", "key"), [
    (["models"], None), (["models"], ""), (["models"], "  "), (["upload", "seed.png"], None),
    (["generate", *SMALL, "--prompt", "a fox"], ""), (["caption", "seed.png"], None),
    (["enhance-prompt", "a fox"], None),
])
async def test_a_missing_api_key_is_named_as_missing(tmp_path: Path, command: list[str], key: str | None):
    # Nothing listens at this URL: a command that tried to connect would fail with connectionFailed instead.
    run = await imagewire(*command, url="ws://127.0.0.1:9/v1", api_key=key, cwd=tmp_path)
    assert run.code == 2 and run.stdout == ""
    (line,) = run.stderr.splitlines()
    assert line.startswith("imagewire: error: no API key: ")
    assert "IMAGEWIRE_API_KEY" in line and "--api-key" in line and "/api-key" in line
    as_flag = await imagewire(*command, "--api-key", key or "", url="ws://127.0.0.1:9/v1", api_key=None, cwd=tmp_path)
    assert as_flag.code == 2 and as_flag.stderr == run.stderr
    given = await imagewire(*command, "--api-key", "some-key", url="ws://127.0.0.1:9/v1", api_key=key, cwd=tmp_path)
    assert given.code == 1 and given.stderr.startswith("error: connectionFailed: "), given.stderr


async def test_generate_shows_a_progress_bar_when_stderr_is_a_terminal(server, tmp_path: Path):
    run = await imagewire("generate", *SMALL, "--prompt", "a kite", "--width", "128", "--height", "128",
                          "--out", str(tmp_path), url=server.url, stderr_tty=True)
    assert run.code == 0, run.stderr
    assert "\r\x1b[Kgenerating 1 image" in run.stderr and " s" in run.stderr
    assert "] 100% step " in run.stderr, "the bar follows the server's progress items"
    assert run.stderr.endswith("\r\x1b[K"), "the progress line is cleared at the end"


async def test_models_lists_air_name_architecture_and_default_size(server):
    run = await imagewire("models", TINY, "--category", "checkpoint", url=server.url)
    assert run.code == 0, run.stderr
    (line,) = run.lines
    air, name, architecture, size = line.split("\t")
    assert (air, architecture, size) == (TINY, "tiny", "256x256") and name


async def test_flags_override_the_environment(server):
    run = await imagewire("--url", server.url, "models", "--api-key", API_KEY, url="ws://127.0.0.1:9/v1",
                          api_key="wrong")
    assert run.code == 0, run.stderr
    assert TINY in run.stdout


async def test_server_errors_exit_1_with_code_message_and_parameter(server, tmp_path: Path):
    out = tmp_path / "out"
    bad_width = await imagewire("generate", *SMALL, "--prompt", "a fox", "--width", "500", "--height", "128",
                                "--out", str(out), url=server.url)
    bad_key = await imagewire("models", url=server.url, api_key="wrong")
    no_server = await imagewire("models", url="ws://127.0.0.1:9/v1")
    missing_image = await imagewire("generate", *SMALL, "--prompt", "a fox", "--image", str(tmp_path / "nope.png"),
                                    url=server.url)
    assert bad_width.code == 1 and bad_width.stdout == ""
    error_line = bad_width.stderr.splitlines()[-1]
    assert error_line.startswith("error: invalidWidth: ") and "received 500" in error_line
    assert error_line.endswith("(parameter: width)")
    assert not out.exists(), "nothing is written when the task fails"
    assert bad_key.code == 1 and bad_key.stderr.startswith("error: invalidApiKey: ")
    assert no_server.code == 1 and no_server.stderr.startswith("error: connectionFailed: ")
    assert missing_image.code == 1
    last_line = missing_image.stderr.splitlines()[-1]
    assert last_line.startswith("error: invalidImage: ") and last_line.endswith("(parameter: seedImage)")


@pytest.mark.parametrize("args", [["generate", "--prompt", "no model"], ["upload"], ["teleport"], []])
async def test_usage_errors_exit_2(args: list[str]):
    run = await imagewire(*args)
    assert run.code == 2
    assert "usage: imagewire" in run.stderr


@pytest.mark.parametrize("command", [[], ["upload"], ["generate"], ["models"], ["download"]])
async def test_every_command_has_help(command: list[str]):
    run = await imagewire(*command, "--help")
    assert run.code == 0
    assert run.stdout.startswith("usage: imagewire") and "--url" in run.stdout and "--api-key" in run.stdout


async def test_generate_with_a_lora_a_clip_skip_and_a_refiner(server, tmp_path: Path):
    common = ["--prompt", "a (castle:1.3)", "--width", "128", "--height", "128", "--seed", "5"]
    plain = await imagewire("generate", *SMALL, *common, "--out", str(tmp_path / "plain"), url=server.url)
    added = await imagewire("generate", *SMALL, *common, "--lora", "imagewire:tiny-lora@1=0.7", "--clip-skip", "1",
                            "--prompt-weighting", "sdEmbeds", "--out", str(tmp_path / "added"), url=server.url)
    refined = await imagewire("generate", "--model", "imagewire:tiny-sdxl@1", "--steps", "4", *common,
                              "--refiner", "tiny-sdxl-refiner", "--refiner-start-step", "2",
                              "--out", str(tmp_path / "refined"), url=server.url)
    for run in (plain, added, refined):
        assert run.code == 0, run.stderr
    images = [Path(run.lines[0]).read_bytes() for run in (plain, added, refined)]
    assert len(set(images)) == 3


@pytest.mark.parametrize(("args", "message"), [
    (["--lora", "imagewire:tiny-lora@1=strong"], "expected AIR or AIR=WEIGHT"),
    (["--refiner-start-step", "3"], "need --refiner"),
])
async def test_bad_add_on_options_are_usage_errors(args: list[str], message: str):
    run = await imagewire("generate", *SMALL, "--prompt", "a fox", *args)
    assert run.code == 2 and message in run.stderr


def size_of(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


async def test_preprocess_then_inpaint_with_the_guide_image(server, tmp_path):
    from tests.server.test_editing import mask_picture, seed_picture

    seed_picture().save(tmp_path / "seed.png")
    mask_picture().save(tmp_path / "mask.png")
    run = await imagewire("preprocess", str(tmp_path / "seed.png"), "--low", "50", "--high", "150",
                          "--out", str(tmp_path / "guides"), url=server.url)
    assert run.code == 0, run.stderr
    (guide_path,) = run.lines
    assert size_of(guide_path) == (128, 128)
    guide_uuid = Path(guide_path).stem
    run = await imagewire("generate", *SMALL, "--prompt", "a door", "--image", str(tmp_path / "seed.png"),
                          "--mask", str(tmp_path / "mask.png"), "--mask-margin", "32",
                          "--controlnet", "imagewire:tiny-controlnet@1", guide_uuid, "0.7",
                          "--control-mode", "controlnet", "--out", str(tmp_path / "out"), url=server.url)
    assert run.code == 0, run.stderr
    (path,) = run.lines
    assert size_of(path) == (128, 128)
    run = await imagewire("generate", *SMALL, "--prompt", "a door", "--image", str(tmp_path / "seed.png"),
                          "--outpaint", "0,64,0,0", "--out", str(tmp_path / "out"), url=server.url)
    assert run.code == 0, run.stderr
    assert size_of(run.lines[0]) == (192, 128)
    run = await imagewire("generate", *SMALL, "--prompt", "a door", "--controlnet", "imagewire:tiny-controlnet@1",
                          url=server.url)
    assert run.code == 1 and "AIR GUIDE [WEIGHT]" in run.stderr


def test_the_progress_bar_shows_the_tasks_percent_and_step() -> None:
    import io

    from imagewire_client.cli import Progress

    progress = Progress("generating 2 images", io.StringIO())
    assert progress.line(1.0) == "generating 2 images... 1.0 s"
    progress.update({"progress": 0, "queuePosition": 3})
    assert progress.line(1.5) == "generating 2 images... queued, 3 ahead, 1.5 s"
    progress.update({"progress": 50, "resultIndex": 0, "step": 5, "steps": 10})
    progress.update({"progress": 100, "resultIndex": 1, "step": 10, "steps": 10})
    assert progress.line(2.0) == "generating 2 images [##################------]  75% step 10/10 2.0 s"


async def test_the_tool_commands_upscale_cut_out_caption_and_enhance(server, tmp_path: Path):
    picture = tmp_path / "in.png"
    Image.linear_gradient("L").resize((30, 20)).convert("RGB").save(picture)
    upscaled = await imagewire("upscale", str(picture), "--factor", "4", "--out", str(tmp_path / "big"), url=server.url)
    assert upscaled.code == 0, upscaled.stderr
    (path,) = upscaled.lines
    with Image.open(path) as result:
        assert result.size == (120, 80)
    cut = await imagewire("remove-background", str(picture), "--rgba", "0,0,255,0.5", "--format", "webp",
                          "--out", str(tmp_path), url=server.url)
    assert cut.code == 0, cut.stderr
    (path,) = cut.lines
    with Image.open(path) as result:
        assert path.endswith(".webp") and result.mode == "RGBA"
    caption = await imagewire("caption", str(picture), "--prompt", "a photo of", url=server.url)
    assert caption.code == 0 and caption.stdout.startswith("a photo of"), caption.stderr
    enhanced = await imagewire("enhance-prompt", "a red fox", "--versions", "3", "--max-length", "30", "--seed", "4",
                               url=server.url)
    assert enhanced.code == 0, enhanced.stderr
    assert len(enhanced.lines) == 3 and all(line.startswith("a red fox") for line in enhanced.lines)
    bad = await imagewire("upscale", str(picture), "--factor", "5", url=server.url)
    assert bad.code == 1 and "upscaleFactor" in bad.stderr


async def test_the_mask_command_writes_the_mask_and_prints_the_detections(server, tmp_path: Path):
    picture = tmp_path / "in.png"
    Image.linear_gradient("L").resize((60, 40)).convert("RGB").save(picture)
    masked = await imagewire("mask", str(picture), "--model", "runware:35@4", "--confidence", "0.1",
                             "--max-detections", "2", "--padding", "0", "--blur", "0", "--out", str(tmp_path),
                             url=server.url)
    assert masked.code == 0, masked.stderr
    path, *detections = masked.lines
    assert len(detections) == 2
    with Image.open(path) as mask:
        white = [mask.getpixel((x, y)) == 255 for y in range(40) for x in range(60)]
    boxes = [[int(value) for value in line.split()[:4]] for line in detections]
    assert white == [any(left <= x < right and top <= y < bottom for left, top, right, bottom in boxes)
                     for y in range(40) for x in range(60)]
    bad = await imagewire("mask", str(picture), "--model", "runware:35@13", url=server.url)
    assert bad.code == 1 and "model" in bad.stderr
