"""Command line of ``python -m bench``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import render, write
from bench.runner import DEFAULT_SECTIONS, SECTIONS, RunOptions, run
from bench.server_process import REPO_ROOT
from bench.workloads import FULL_CPU, FULL_GPU, QUICK, cpu_suite, gpu_suite

DEFAULT_OUT = REPO_ROOT / "bench" / "results"
DEFAULT_MODELS_DIR = Path(os.environ.get("IMAGEWIRE_BENCH_MODELS", Path.home() / ".cache" / "imagewire-bench"))


def _names(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list of {', '.join(allowed)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark imagewire: the raw diffusers pipeline against the served path (sequential and "
                    "concurrent), pings under load, uploads, output encoding, server memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--suite", choices=("cpu", "gpu", "gpu-quick"), default="cpu",
                        help="cpu: the embedded tiny model; gpu: SD 1.5 and SDXL shapes (and with --models, FLUX.1 "
                             "[dev] and SD 3.5 large) with random weights, in their CUDA precision; gpu-quick: "
                             "each memory plan's peak and speed (python -m bench.gpu_quick, its own options)")
    parser.add_argument("--quick", action="store_true", help="a few requests per section: checks the harness works")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON and Markdown results")
    parser.add_argument("--sections", type=lambda text: _names(text, SECTIONS, "--sections"),
                        default=DEFAULT_SECTIONS, help="comma-separated subset of " + ", ".join(SECTIONS)
                        + "; cluster (--engine local beside --engine ray with 1, 2, … replicas) runs only when named")
    parser.add_argument("--quiet-wait", type=float, default=None, metavar="SECONDS",
                        help="before each measurement, wait up to this long for other processes to leave the CPU "
                             "idle (default 60, 0 with --quick; 0 never waits)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="set an environment variable for the server process only (repeatable), e.g. "
                             "OMP_NUM_THREADS=2 to compare a thread policy with raw diffusers in one run")
    gpu = parser.add_argument_group("gpu suite")
    gpu.add_argument("--models", type=lambda text: _names(text, ("sd15", "sdxl", "flux", "sd35"), "--models"),
                     default=("sd15", "sdxl"),
                     help="architectures to run, comma-separated: sd15, sdxl, flux (FLUX.1 [dev], 34 GB on disk in "
                          "bfloat16), sd35 (SD 3.5 large, 27 GB)")
    gpu.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                     help="where built random-weight models are saved and reused [IMAGEWIRE_BENCH_MODELS]")
    gpu.add_argument("--dry-run", action="store_true",
                     help="run the gpu suite's whole path on the CPU with shrunk models and a few requests")
    return parser


def options_from(argv: Sequence[str]) -> tuple[RunOptions, Path]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.suite == "cpu":
        if args.dry_run:
            parser.error("--dry-run belongs to --suite gpu; --suite cpu --quick is the cpu suite's short run")
        suite, budget = cpu_suite(args.quick), QUICK if args.quick else FULL_CPU
    else:
        if not args.dry_run and not _cuda_available():
            parser.error("--suite gpu needs a CUDA device; --dry-run checks the suite on this CPU")
        suite = gpu_suite(args.models, dry_run=args.dry_run)
        budget = QUICK if args.quick or args.dry_run else FULL_GPU
    quick = args.quick or args.dry_run
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if quick else 60.0)
    server_env = {}
    for setting in args.server_env:
        name, equals, value = setting.partition("=")
        if not equals or not name:
            parser.error(f"--server-env takes NAME=VALUE, received {setting!r}")
        server_env[name] = value
    return RunOptions(suite=suite, budget=budget, sections=args.sections, models_dir=args.models_dir,
                      argv=tuple(argv), quick=quick, quiet_wait=quiet_wait, server_env=server_env), args.out


def _suite(arguments: Sequence[str]) -> str | None:
    for index, argument in enumerate(arguments):
        if argument == "--suite" and index + 1 < len(arguments):
            return arguments[index + 1]
        if argument.startswith("--suite="):
            return argument.partition("=")[2]
    return None


def _without_suite(arguments: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == "--suite":
            skip = True
        elif not argument.startswith("--suite="):
            kept.append(argument)
    return kept


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run, print the tables, write the files; returns the results (the smoke test reads them)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if _suite(arguments) == "gpu-quick":
        # Its own options (bench/gpu_quick.py): everything but --suite goes to it.
        from bench import gpu_quick

        return gpu_quick.main(_without_suite(arguments))
    options, out_dir = options_from(arguments)
    # SIGTERM ends the run like Ctrl-C: the cleanup code runs and the server child is stopped.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = asyncio.run(run(options))
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(render(results))
    json_path, markdown_path = write(results, out_dir)
    print(f"results: {json_path}\ntables:  {markdown_path}", file=sys.stderr)
    results["files"] = {"json": str(json_path), "markdown": str(markdown_path)}
    return results
