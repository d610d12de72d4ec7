"""The ``imagewire`` command: upload, generate and edit images, make ControlNet guide images, upscale
images, remove backgrounds, caption images, enhance prompts, list models, have the server download one.

Results go to stdout one per line so they compose with other tools; progress and errors
go to stderr. Exit codes: 0 success, 1 an error from the server or the connection,
2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

from imagewire_client import __version__
from imagewire_client.client import DEFAULT_URL, DOWNLOAD_TIMEOUT, Client
from imagewire_client.edits import ControlNet, Outpaint
from imagewire_client.errors import ImagewireError
from imagewire_client.results import ImageResult

T = TypeVar("T")

# --format value -> (outputFormat on the wire, file extension)
FORMATS: dict[str, tuple[str, str]] = {
    "png": ("PNG", "png"),
    "jpg": ("JPG", "jpg"),
    "jpeg": ("JPG", "jpg"),
    "webp": ("WEBP", "webp"),
}


def _connection_options() -> argparse.ArgumentParser:
    # SUPPRESS keeps a subcommand's unset option from hiding the same option given before the subcommand.
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--url", default=argparse.SUPPRESS,
                         help=f"server WebSocket URL (env IMAGEWIRE_URL, default {DEFAULT_URL})")
    options.add_argument("--api-key", default=argparse.SUPPRESS,
                         help="API key (env IMAGEWIRE_API_KEY); the server prints it when it first starts and keeps "
                              "it in <data dir>/api-key")
    options.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                         help="seconds to wait for the server's answer (default 300; for download "
                              f"{DOWNLOAD_TIMEOUT / 3600:g} hours)")
    return options


def build_parser() -> argparse.ArgumentParser:
    connection = _connection_options()
    parser = argparse.ArgumentParser(
        prog="imagewire", parents=[connection],
        description="Talk to an imagewire server: upload, generate, preprocess, upscale, remove backgrounds, "
                    "caption, enhance prompts, list models, download models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    upload = commands.add_parser("upload", parents=[connection], help="store images on the server, print their UUIDs",
                                 description="Upload image files; prints one image UUID per line.")
    upload.add_argument("files", nargs="+", metavar="FILE", help="PNG, JPEG or WEBP file (or an http(s) URL)")
    upload.add_argument("--json", action="store_true",
                        help="print one JSON object per line with imageUUID and imageURL")

    generate = commands.add_parser(
        "generate", parents=[connection], help="generate images and save them",
        description="Generate images (text-to-image, or image-to-image with --image); writes <imageUUID>.<ext> "
                    "files to --out and prints their paths, one per line. Without --width/--height, text-to-image "
                    "takes the model's default size (from the server's catalog) and image-to-image the --image's.")
    generate.add_argument("--model", required=True, metavar="AIR", help="model AIR, e.g. runware:101@1")
    generate.add_argument("--prompt", required=True, metavar="TEXT", help="positive prompt")
    generate.add_argument("--negative-prompt", metavar="TEXT")
    generate.add_argument("--image", metavar="FILE|UUID|URL", help="seed image for image-to-image")
    generate.add_argument("--strength", type=float, help="how far to move from --image, 0 < s <= 1 (default 0.8)")
    generate.add_argument("--width", type=int, help="128-2048, a multiple of 64 (default: the model's default "
                          "width, which the server tells; with --image, the image's)")
    generate.add_argument("--height", type=int, help="likewise (default: the model's default height, or the "
                          "--image's)")
    generate.add_argument("--steps", type=int)
    generate.add_argument("--cfg", type=float, metavar="SCALE", help="CFG scale")
    generate.add_argument("--scheduler", metavar="NAME", help="e.g. Euler, 'DPM++ 2M Karras', UniPC")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--number-results", type=int, default=1, metavar="N")
    generate.add_argument("--format", choices=sorted(FORMATS), default="png", help="image format (default png)")
    generate.add_argument("--quality", type=int, metavar="Q", help="JPG/WEBP quality 20-99")
    generate.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="output folder (default .)")
    add_ons = generate.add_argument_group("what to add to the model")
    add_ons.add_argument("--lora", action="append", type=weighted_air, default=[], metavar="AIR[=WEIGHT]",
                         help="a LoRA, weight -4 to 4 (default 1); repeatable")
    add_ons.add_argument("--embedding", action="append", type=weighted_air, default=[], metavar="AIR[=WEIGHT]",
                         help="a textual-inversion embedding (put its token in the prompt); repeatable")
    add_ons.add_argument("--vae", metavar="AIR", help="a VAE to use instead of the model's own")
    add_ons.add_argument("--clip-skip", type=int, metavar="N", help="text-encoder layers to skip, 0-2")
    add_ons.add_argument("--prompt-weighting", choices=("compel", "sdEmbeds"),
                         help="the prompts' weighting syntax: compel '(cat)1.5', sdEmbeds '(cat:1.5)'")
    add_ons.add_argument("--refiner", metavar="AIR", help="an SDXL refiner that finishes the image")
    start = add_ons.add_mutually_exclusive_group()
    start.add_argument("--refiner-start-step", type=int, metavar="N", help="the step the refiner takes over at")
    start.add_argument("--refiner-start-percentage", type=float, metavar="P",
                       help="or the percentage of the steps, 1-99 (default: the server's, 80)")
    editing = generate.add_argument_group("editing")
    editing.add_argument("--mask", metavar="FILE|UUID|URL", help="inpaint --image: white repaints, black keeps")
    editing.add_argument("--mask-margin", type=int, metavar="PX",
                         help="repaint a crop around the mask, with this much context (32-128), at full size")
    editing.add_argument("--outpaint", type=_sides, metavar="TOP,RIGHT,BOTTOM,LEFT",
                         help="extend --image by these pixels (multiples of 64)")
    editing.add_argument("--outpaint-blur", type=int, default=0, metavar="PX", help="soft boundary (0-32)")
    editing.add_argument("--controlnet", nargs="+", action="append", default=[], metavar="AIR GUIDE [WEIGHT]",
                         help="a ControlNet model and its guide image (FILE|UUID|URL), optional weight 0-1; "
                              "repeatable")
    editing.add_argument("--control-mode", choices=["balanced", "prompt", "controlnet"],
                         help="how the ControlNets weigh against the prompt (default balanced)")
    editing.add_argument("--check-nsfw", action="store_true",
                         help="check each result for unwanted content (flagged ones come back black)")

    preprocess = commands.add_parser(
        "preprocess", parents=[connection], help="make a ControlNet guide image",
        description="Make a ControlNet guide image from an image; writes <guideImageUUID>.png to --out and "
                    "prints its path (its UUID is the file name, usable as --controlnet's GUIDE).")
    preprocess.add_argument("image", metavar="FILE|UUID|URL")
    preprocess.add_argument("--type", default="canny", choices=["canny", "tile", "shuffle"],
                            help="pre-processor (default canny)")
    preprocess.add_argument("--low", type=int, metavar="N", help="canny's low threshold (default 100)")
    preprocess.add_argument("--high", type=int, metavar="N", help="canny's high threshold (default 200)")
    preprocess.add_argument("--width", type=int, help="scale a wider image down to this width")
    preprocess.add_argument("--height", type=int, help="scale a taller image down to this height")
    preprocess.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                            help="output folder (default .)")

    models = commands.add_parser("models", parents=[connection], help="list the server's models",
                                 description="List models: AIR, name, architecture and default size, tab-separated.")
    models.add_argument("search", nargs="?", metavar="SEARCH", help="only models matching this text")
    models.add_argument("--category", metavar="NAME",
                        help="only models of this category: checkpoint, upscaler, background-removal, caption, "
                             "masking, prompt-enhancer")
    download = commands.add_parser(
        "download", parents=[connection], help="have the server fetch a model from the Hugging Face hub",
        description="Have the server download a catalog model it does not have yet (modelSearch marks them "
                    "downloadable; the server must run with --allow-downloads), showing the bytes as they "
                    "arrive; prints the model's AIR once it is ready. Interrupting stops the progress bar, not the "
                    "server's download.")
    download.add_argument("model", metavar="AIR", help="the model's AIR, as `models` lists it")

    def image_tool(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        tool = commands.add_parser(name, parents=[connection], help=help_text, description=description)
        tool.add_argument("image", metavar="FILE|UUID|URL", help="the input image")
        tool.add_argument("--model", metavar="AIR", help="the model (default: the server's default for this task)")
        return tool

    upscale = image_tool("upscale", "enlarge an image with a super-resolution model",
                         "Upscale an image; writes <imageUUID>.<ext> to --out and prints its path.")
    upscale.add_argument("--factor", type=float, default=2, help="2 to 4 (default 2)")
    remove = image_tool("remove-background", "cut the subject out of an image",
                        "Remove an image's background; writes <imageUUID>.<ext> (PNG keeps transparency) to --out "
                        "and prints its path.")
    remove.add_argument("--rgba", metavar="R,G,B,A", help="background colour instead of transparency, alpha 0-1")
    remove.add_argument("--mask-only", action="store_true", help="write the mask instead of the cut-out")
    remove.add_argument("--alpha-matting", action="store_true", help="refine soft edges such as hair")
    for tool in (upscale, remove):
        tool.add_argument("--format", choices=sorted(FORMATS), default="png", help="image format (default png)")
        tool.add_argument("--quality", type=int, metavar="Q", help="JPG/WEBP quality 20-99")
        tool.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="output folder (default .)")
    mask = commands.add_parser(
        "mask", parents=[connection], help="find faces, hands or people and write a mask of them",
        description="Mask what an image shows; writes <maskImageUUID>.png (white where something was found) to "
                    "--out and prints its path, then one line per detection: x_min y_min x_max y_max confidence.")
    mask.add_argument("image", metavar="FILE|UUID|URL", help="the input image")
    mask.add_argument("--model", metavar="AIR", default="runware:35@1",
                      help="what to find: runware:35@1 faces (default), runware:35@3 hands, runware:35@4 people")
    mask.add_argument("--confidence", type=float, metavar="C", help="0 to 1: keep detections scoring above it")
    mask.add_argument("--max-detections", type=int, metavar="N", help="1 to 20: keep the N best")
    mask.add_argument("--padding", type=int, metavar="PIXELS", help="grow each detection's white area")
    mask.add_argument("--blur", type=int, metavar="PIXELS", help="fade the mask out over this many more pixels")
    mask.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="output folder (default .)")
    caption = image_tool("caption", "describe an image in words", "Caption an image; prints the caption.")
    caption.add_argument("--prompt", metavar="TEXT", help="how the caption begins")
    enhance = commands.add_parser("enhance-prompt", parents=[connection], help="write richer versions of a prompt",
                                  description="Enhance a prompt; prints one version per line.")
    enhance.add_argument("prompt", metavar="TEXT")
    enhance.add_argument("--versions", type=int, default=1, metavar="N", help="1 to 5 (default 1)")
    enhance.add_argument("--max-length", type=int, default=380, metavar="TOKENS", help="12 to 400 (default 380)")
    enhance.add_argument("--seed", type=int)
    enhance.add_argument("--model", metavar="AIR")
    return parser


def weighted_air(text: str) -> tuple[str, float]:
    """``AIR`` or ``AIR=WEIGHT`` (AIRs hold colons and at signs, never an equals sign)."""
    air, equals, weight = text.rpartition("=")
    if not equals:
        return text, 1.0
    try:
        return air, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected AIR or AIR=WEIGHT with a number as WEIGHT, got {text!r}") from None


def _sides(text: str) -> Outpaint:
    try:
        top, right, bottom, left = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected TOP,RIGHT,BOTTOM,LEFT in pixels, e.g. 0,128,0,128; got {text!r}") from None
    return Outpaint(top=top, right=right, bottom=bottom, left=left)


def _controlnets(values: list[list[str]], mode: str | None) -> list[ControlNet]:
    controls = []
    for value in values:
        if len(value) not in (2, 3):
            raise ImagewireError("usageError", f"--controlnet takes AIR GUIDE [WEIGHT]; got {' '.join(value)!r}.")
        try:
            weight = float(value[2]) if len(value) == 3 else None
        except ValueError:
            raise ImagewireError("usageError", f"--controlnet weight must be a number; got {value[2]!r}.") from None
        controls.append(ControlNet(model=value[0], guide_image=value[1], weight=weight, control_mode=mode))
    return controls


class Progress:
    """A progress bar on stderr while waiting (the task's percent once the server reports it, and the
    elapsed seconds); a single line when stderr is not a terminal."""

    WIDTH = 24

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label = label
        self.stream = stream
        self.live = stream.isatty()
        self.percent: dict[int, int] = {}  # by result index
        self.detail = ""
        self.started = time.monotonic()

    def update(self, item: dict[str, Any]) -> None:
        """A progress item of the task: its result's percent, or where it waits in the queue."""
        if item.get("queuePosition") is not None:
            self.detail = f"queued, {item['queuePosition']} ahead"
        elif isinstance(item.get("progress"), int):
            self.percent[int(item.get("resultIndex") or 0)] = item["progress"]
            self.detail = f"step {item.get('step')}/{item.get('steps')}" if item.get("steps") else ""
        if self.live:
            self._draw()

    async def track(self, work: Awaitable[T]) -> T:
        if not self.live:
            print(f"{self.label}...", file=self.stream, flush=True)
            return await work
        self.started = time.monotonic()
        ticker = asyncio.create_task(self._tick())
        try:
            return await work
        finally:
            ticker.cancel()
            self.stream.write("\r\033[K")
            self.stream.flush()

    def line(self, elapsed: float) -> str:
        if not self.percent:
            return f"{self.label}... {self.detail + ', ' if self.detail else ''}{elapsed:.1f} s"
        percent = sum(self.percent.values()) // len(self.percent)
        filled = self.WIDTH * percent // 100
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        return f"{self.label} [{bar}] {percent:3d}% {self.detail} {elapsed:.1f} s"

    def _draw(self) -> None:
        self.stream.write(f"\r\033[K{self.line(time.monotonic() - self.started)}")
        self.stream.flush()

    async def _tick(self) -> None:
        while True:
            self._draw()
            await asyncio.sleep(0.1)


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f}"


class DownloadProgress:
    """A model download's bytes on stderr: a bar redrawn in place on a terminal; otherwise a line at each tenth
    of the way, so that a log shows it moving without a line per answer."""

    WIDTH = 24
    STEPS = 10

    def __init__(self, model: str, stream: TextIO) -> None:
        self.model = model
        self.stream = stream
        self.live = stream.isatty()
        self.shown_step = -1

    def line(self, done: int, total: int) -> str:
        percent = 100 * done // total if total else 100
        filled = self.WIDTH * percent // 100
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        return f"downloading {self.model} [{bar}] {percent:3d}% {_megabytes(done)}/{_megabytes(total)} MB"

    def update(self, done: int, total: int) -> None:
        if self.live:
            self.stream.write(f"\r\033[K{self.line(done, total)}")
            self.stream.flush()
            return
        step = self.STEPS * done // total if total else self.STEPS
        if step > self.shown_step:
            self.shown_step = step
            print(self.line(done, total), file=self.stream, flush=True)

    def finish(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


async def run_download(client: Client, args: argparse.Namespace, timeout: float) -> None:
    progress = DownloadProgress(args.model, sys.stderr)
    try:
        ready = await client.download_model(args.model, on_progress=progress.update, timeout=timeout)
        # The ready answer is no progress answer: the bar is filled here, so that it ends at 100%.
        progress.update(ready.bytesDone, ready.bytesTotal)
    finally:
        progress.finish()
    print(f"{ready.air}: {_megabytes(ready.bytesTotal)} MB downloaded, ready", file=sys.stderr, flush=True)
    print(ready.air, flush=True)


async def run_upload(client: Client, args: argparse.Namespace, timeout: float) -> None:
    for name in args.files:
        uploaded = await client.upload_image(name, timeout=timeout)
        if args.json:
            print(json.dumps({"imageUUID": uploaded.uuid, "imageURL": uploaded.url}), flush=True)
        else:
            print(uploaded.uuid, flush=True)


async def _size(client: Client, args: argparse.Namespace, timeout: float) -> tuple[int | None, int | None, str]:
    """--width and --height, the missing ones of a text-to-image request filled with the model's defaults;
    and a note on where they came from, for the progress line."""
    width, height = args.width, args.height
    if args.image is not None or (width is not None and height is not None):
        return width, height, ""
    info = await client.model_info(args.model, timeout=timeout)
    if info is None:  # not in the server's catalog: its answer to the task says what is wrong
        return width, height, ""
    taken = "size" if width is None and height is None else "width" if width is None else "height"
    width = info.defaultWidth if width is None else width
    height = info.defaultHeight if height is None else height
    return width, height, f", {width}x{height} (the model's default {taken})"


async def run_generate(client: Client, args: argparse.Namespace, timeout: float) -> None:
    output_format, extension = FORMATS[args.format]
    width, height, size_note = await _size(client, args, timeout)
    plural = "s" if args.number_results != 1 else ""
    progress = Progress(f"generating {args.number_results} image{plural}{size_note}", sys.stderr)
    call = client.image_inference(
        model=args.model, positive_prompt=args.prompt, negative_prompt=args.negative_prompt, seed_image=args.image,
        strength=args.strength, width=width, height=height, steps=args.steps, cfg_scale=args.cfg,
        scheduler=args.scheduler, seed=args.seed, number_results=args.number_results,
        # Ask for the bytes inline, so no second request is needed to save them.
        output_type="base64Data", output_format=output_format, output_quality=args.quality, lora=args.lora,
        embeddings=args.embedding, vae=args.vae, clip_skip=args.clip_skip, prompt_weighting=args.prompt_weighting,
        refiner=args.refiner, refiner_start_step=args.refiner_start_step,
        refiner_start_percentage=args.refiner_start_percentage, timeout=timeout,
        mask_image=args.mask, mask_margin=args.mask_margin, check_nsfw=args.check_nsfw,
        outpaint=None if args.outpaint is None else Outpaint(
            top=args.outpaint.top, right=args.outpaint.right, bottom=args.outpaint.bottom, left=args.outpaint.left,
            blur=args.outpaint_blur),
        control_net=_controlnets(args.controlnet, args.control_mode),
        on_progress=progress.update if progress.live else None,
    )
    results = await progress.track(call)
    args.out.mkdir(parents=True, exist_ok=True)
    for result in results:
        if result.image_bytes is None:
            raise ImagewireError("invalidResponse", f"The server sent no image data for {result.image_uuid}.")
        path = args.out / f"{result.image_uuid}.{extension}"
        path.write_bytes(result.image_bytes)
        print(path, flush=True)
        if result.nsfw_content:
            print(f"{path}: flagged by the content safety checker (the image is black)", file=sys.stderr)


async def run_preprocess(client: Client, args: argparse.Namespace, timeout: float) -> None:
    call = client.controlnet_preprocess(args.image, preprocessor=args.type, width=args.width, height=args.height,
                                        low_threshold=args.low, high_threshold=args.high, timeout=timeout)
    guide = await Progress(f"making a {args.type} guide image", sys.stderr).track(call)
    if guide.image_bytes is None:
        raise ImagewireError("invalidResponse", f"The server sent no image data for {guide.uuid}.")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{guide.uuid}.png"
    path.write_bytes(guide.image_bytes)
    print(path, flush=True)


async def run_models(client: Client, args: argparse.Namespace, timeout: float) -> None:
    for model in await client.models(args.search, category=args.category, timeout=timeout):
        print(f"{model.air}\t{model.name}\t{model.architecture}\t{model.defaultWidth}x{model.defaultHeight}")


def _save(result: ImageResult, out: Path, extension: str) -> None:
    if result.image_bytes is None:
        raise ImagewireError("invalidResponse", f"The server sent no image data for {result.image_uuid}.")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result.image_uuid}.{extension}"
    path.write_bytes(result.image_bytes)
    print(path, flush=True)


async def run_upscale(client: Client, args: argparse.Namespace, timeout: float) -> None:
    output_format, extension = FORMATS[args.format]
    call = client.upscale(args.image, factor=args.factor, model=args.model, output_type="base64Data",
                          output_format=output_format, output_quality=args.quality, timeout=timeout)
    _save(await Progress("upscaling", sys.stderr).track(call), args.out, extension)


def _rgba(text: str) -> list[float]:
    try:
        red, green, blue, alpha = (float(part) for part in text.split(","))
    except ValueError:
        raise ImagewireError("invalidParameter", f"--rgba must be R,G,B,A like 255,255,255,0; got {text!r}.") from None
    return [int(red), int(green), int(blue), alpha]


async def run_remove_background(client: Client, args: argparse.Namespace, timeout: float) -> None:
    output_format, extension = FORMATS[args.format]
    settings: dict[str, Any] = {}
    if args.rgba:
        settings["rgba"] = _rgba(args.rgba)
    if args.mask_only:
        settings["returnOnlyMask"] = True
    if args.alpha_matting:
        settings["alphaMatting"] = True
    call = client.remove_background(args.image, model=args.model, output_type="base64Data",
                                    output_format=output_format, output_quality=args.quality,
                                    settings=settings or None, timeout=timeout)
    _save(await Progress("removing the background", sys.stderr).track(call), args.out, extension)


async def run_mask(client: Client, args: argparse.Namespace, timeout: float) -> None:
    call = client.mask(args.image, model=args.model, confidence=args.confidence, max_detections=args.max_detections,
                       mask_padding=args.padding, mask_blur=args.blur, timeout=timeout)
    masked = await Progress("masking", sys.stderr).track(call)
    if masked.image_bytes is None:
        raise ImagewireError("invalidResponse", f"The server sent no image data for {masked.uuid}.")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{masked.uuid}.png"
    path.write_bytes(masked.image_bytes)
    print(path, flush=True)
    for found in masked.detections:
        print(found.x_min, found.y_min, found.x_max, found.y_max, found.confidence, flush=True)


async def run_caption(client: Client, args: argparse.Namespace, timeout: float) -> None:
    call = client.caption(args.image, model=args.model, prompt=args.prompt, timeout=timeout)
    print((await Progress("captioning", sys.stderr).track(call)).text, flush=True)


async def run_enhance_prompt(client: Client, args: argparse.Namespace, timeout: float) -> None:
    call = client.enhance_prompt(args.prompt, versions=args.versions, max_length=args.max_length, model=args.model,
                                 seed=args.seed, timeout=timeout)
    for version in await Progress("enhancing", sys.stderr).track(call):
        print(version.text, flush=True)


COMMANDS: dict[str, Callable[[Client, argparse.Namespace, float], Awaitable[None]]] = {
    "upload": run_upload,
    "generate": run_generate,
    "preprocess": run_preprocess,
    "models": run_models,
    "upscale": run_upscale,
    "remove-background": run_remove_background,
    "mask": run_mask,
    "caption": run_caption,
    "enhance-prompt": run_enhance_prompt,
    "download": run_download,
}


NO_API_KEY = ("no API key: set IMAGEWIRE_API_KEY or pass --api-key (the server prints its key when it first "
              "starts and keeps it in <data dir>/api-key, by default ./imagewire-data/api-key)")


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else IMAGEWIRE_API_KEY; an empty or blank value is no key."""
    for value in (getattr(args, "api_key", None), os.environ.get("IMAGEWIRE_API_KEY")):
        if value and value.strip():
            return value
    return None


async def _run(args: argparse.Namespace, api_key: str) -> None:
    url = getattr(args, "url", None) or os.environ.get("IMAGEWIRE_URL") or DEFAULT_URL
    timeout: float = getattr(args, "timeout", DOWNLOAD_TIMEOUT if args.command == "download" else 300.0)
    async with Client(url, api_key) as client:
        await COMMANDS[args.command](client, args, timeout)


def _report(error: ImagewireError) -> None:
    print(f"error: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imagewire`` command; returns the exit code."""
    parser = build_parser()
    args: Any = parser.parse_args(argv)
    starts = ("refiner_start_step", "refiner_start_percentage")
    if args.command == "generate" and args.refiner is None and any(getattr(args, name) is not None for name in starts):
        parser.error("--refiner-start-step and --refiner-start-percentage need --refiner")
    # Every command talks to the server. Without a key it would refuse the connection as invalidApiKey,
    # which reads as a wrong key rather than a forgotten one: say what is missing, as a usage error.
    api_key = _api_key(args)
    if api_key is None:
        print(f"{parser.prog}: error: {NO_API_KEY}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(args, api_key))
    except ImagewireError as error:
        _report(error)
        return 1
    except OSError as error:  # e.g. the output folder is not writable
        _report(ImagewireError("fileError", f"{error.strerror or error}: {error.filename or ''}".rstrip(": ")))
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
