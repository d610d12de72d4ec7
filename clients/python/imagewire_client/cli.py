"""The ``imagewire`` command: upload images, generate images, list models.

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
from imagewire_client.client import DEFAULT_URL, Client
from imagewire_client.errors import ImagewireError

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
    options.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (env IMAGEWIRE_API_KEY)")
    options.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                         help="seconds to wait for the server's answer (default 300)")
    return options


def build_parser() -> argparse.ArgumentParser:
    connection = _connection_options()
    parser = argparse.ArgumentParser(prog="imagewire", parents=[connection],
                                     description="Talk to an imagewire server: upload, generate, list models.")
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
                    "files to --out and prints their paths, one per line.")
    generate.add_argument("--model", required=True, metavar="AIR", help="model AIR, e.g. runware:101@1")
    generate.add_argument("--prompt", required=True, metavar="TEXT", help="positive prompt")
    generate.add_argument("--negative-prompt", metavar="TEXT")
    generate.add_argument("--image", metavar="FILE|UUID|URL", help="seed image for image-to-image")
    generate.add_argument("--strength", type=float, help="how far to move from --image, 0 < s <= 1 (default 0.8)")
    generate.add_argument("--width", type=int)
    generate.add_argument("--height", type=int)
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

    models = commands.add_parser("models", parents=[connection], help="list the server's models",
                                 description="List models: AIR, name, architecture and default size, tab-separated.")
    models.add_argument("search", nargs="?", metavar="SEARCH", help="only models matching this text")
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


class Progress:
    """Elapsed seconds on stderr while waiting; a single line when stderr is not a terminal."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label = label
        self.stream = stream
        self.live = stream.isatty()

    async def track(self, work: Awaitable[T]) -> T:
        if not self.live:
            print(f"{self.label}...", file=self.stream, flush=True)
            return await work
        ticker = asyncio.create_task(self._tick(time.monotonic()))
        try:
            return await work
        finally:
            ticker.cancel()
            self.stream.write("\r\033[K")
            self.stream.flush()

    async def _tick(self, started: float) -> None:
        while True:
            self.stream.write(f"\r{self.label}... {time.monotonic() - started:.1f} s")
            self.stream.flush()
            await asyncio.sleep(0.1)


async def run_upload(client: Client, args: argparse.Namespace, timeout: float) -> None:
    for name in args.files:
        uploaded = await client.upload_image(name, timeout=timeout)
        if args.json:
            print(json.dumps({"imageUUID": uploaded.uuid, "imageURL": uploaded.url}), flush=True)
        else:
            print(uploaded.uuid, flush=True)


async def run_generate(client: Client, args: argparse.Namespace, timeout: float) -> None:
    output_format, extension = FORMATS[args.format]
    call = client.image_inference(
        model=args.model, positive_prompt=args.prompt, negative_prompt=args.negative_prompt, seed_image=args.image,
        strength=args.strength, width=args.width, height=args.height, steps=args.steps, cfg_scale=args.cfg,
        scheduler=args.scheduler, seed=args.seed, number_results=args.number_results,
        # Ask for the bytes inline, so no second request is needed to save them.
        output_type="base64Data", output_format=output_format, output_quality=args.quality, lora=args.lora,
        embeddings=args.embedding, vae=args.vae, clip_skip=args.clip_skip, prompt_weighting=args.prompt_weighting,
        refiner=args.refiner, refiner_start_step=args.refiner_start_step,
        refiner_start_percentage=args.refiner_start_percentage, timeout=timeout,
    )
    plural = "s" if args.number_results != 1 else ""
    results = await Progress(f"generating {args.number_results} image{plural}", sys.stderr).track(call)
    args.out.mkdir(parents=True, exist_ok=True)
    for result in results:
        if result.image_bytes is None:
            raise ImagewireError("invalidResponse", f"The server sent no image data for {result.image_uuid}.")
        path = args.out / f"{result.image_uuid}.{extension}"
        path.write_bytes(result.image_bytes)
        print(path, flush=True)


async def run_models(client: Client, args: argparse.Namespace, timeout: float) -> None:
    for model in await client.models(args.search, timeout=timeout):
        print(f"{model.air}\t{model.name}\t{model.architecture}\t{model.defaultWidth}x{model.defaultHeight}")


COMMANDS: dict[str, Callable[[Client, argparse.Namespace, float], Awaitable[None]]] = {
    "upload": run_upload,
    "generate": run_generate,
    "models": run_models,
}


async def _run(args: argparse.Namespace) -> None:
    url = getattr(args, "url", None) or os.environ.get("IMAGEWIRE_URL") or DEFAULT_URL
    api_key = getattr(args, "api_key", None) or os.environ.get("IMAGEWIRE_API_KEY")
    timeout: float = getattr(args, "timeout", 300.0)
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
    try:
        asyncio.run(_run(args))
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
