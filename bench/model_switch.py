"""How long switching between two models takes: cold (from disk), from host RAM, and already loaded.

    python -m bench.model_switch [--device cpu|cuda] [--architecture tiny|sd15|sdxl] [--switches 10]

Two catalog entries with the same architecture alternate in the server's own ``PipelineCache``, set up as
the flags would set it up: ``--max-loaded-models 1`` (every switch loads from disk), ``--max-loaded-models 1
--ram-models 1`` (every switch after the first two is a copy from host RAM to the device) and
``--max-loaded-models 2`` (both stay on the device: a switch is a lookup). A switch is timed from asking for
the pipeline until it is on the device (on CUDA, synchronised); one image after each switch shows what a
request pays on top. ``tiny`` is the embedded model, its two entries two copies of its folder; ``sd15`` and
``sdxl`` are the full-size shapes with random weights (``bench/gpu_models.py``, fp16), whose two entries
share one folder. Disk reads come from the operating system's file cache after the first: "cold" is a
load from a warm file cache, the best case of a load from disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench.environment import describe
from bench.stats import milliseconds, summarize

# (label, max_loaded, ram_models): how each scenario sets the cache up.
SCENARIOS: tuple[tuple[str, int, int], ...] = (
    ("cold (from disk)", 1, 0),
    ("from host RAM", 1, 1),
    ("loaded", 2, 0),
)
_SIZES = {"tiny": 128, "sd15": 512, "sdxl": 1024}


def _entries(architecture: str, root: Path, device: str, models_dir: Path) -> tuple[Any, Any]:
    from imagewire.air_registry import Catalog
    from imagewire.air_registry.tiny import ensure_embedded

    tiny = Catalog.load().resolve("imagewire:tiny@1")
    if architecture == "tiny":
        folder = ensure_embedded("tiny-sd", root / "tiny-a")
        shutil.copytree(folder, root / "tiny-b")
        folders = (folder, root / "tiny-b")
    else:
        import torch

        from bench.gpu_models import ensure_model

        built = ensure_model(architecture, models_dir / architecture, device=device, dtype=torch.float16)
        folders = (built, built)
    return tuple(dataclasses.replace(tiny, air=f"bench:switch-{name}@1", source="folder", location=str(folder),
                                     architecture="tiny" if architecture == "tiny" else architecture)
                 for name, folder in zip("ab", folders, strict=True))  # type: ignore[return-value]


def _timed(action: Callable[[], Any], synchronize: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    synchronize()
    return time.perf_counter() - started


def measure(architecture: str, *, device: str, switches: int, models_dir: Path) -> list[dict[str, Any]]:
    import torch

    from imagewire.air_registry.loader import PipelineCache
    from imagewire.server.engine.threads import limit_cpu_threads

    limit_cpu_threads(device)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    size = _SIZES[architecture]
    rows = []
    with tempfile.TemporaryDirectory(prefix="imagewire-switch-") as scratch:
        first, second = _entries(architecture, Path(scratch), device, models_dir)
        for label, max_loaded, ram_models in SCENARIOS:
            cache = PipelineCache(device=device, data_dir=Path(scratch), max_loaded=max_loaded,
                                  ram_models=ram_models)
            # Both models once, so every timed switch is the scenario's kind (the first loads are cold).
            for entry in (first, second):
                cache.text_to_image(entry)
            switch_times, image_times = [], []
            for index in range(switches):
                entry = first if index % 2 == 0 else second
                switch_times.append(_timed(partial(cache.text_to_image, entry), synchronize))
                pipe = cache.text_to_image(entry)
                image_times.append(_timed(partial(pipe, "a lighthouse", num_inference_steps=2, width=size, height=size,
                                                  generator=torch.Generator("cpu").manual_seed(index)), synchronize))
            print(f"{label}: {summarize(milliseconds(switch_times))}", file=sys.stderr, flush=True)
            rows.append({"scenario": label, "flags": f"--max-loaded-models {max_loaded}"
                         + (f" --ram-models {ram_models}" if ram_models else ""),
                         "switch_ms": summarize(milliseconds(switch_times)),
                         "image_after_switch_ms": summarize(milliseconds(image_times))})
            cache.unload_all()
    return rows


def render(rows: Sequence[dict[str, Any]], *, architecture: str, device: str) -> str:
    size = _SIZES[architecture]
    lines = [f"Switching between two {architecture} models on {device} (then one {size}² image, 2 steps):", "",
             "| scenario | flags | switch p50 ms | switch max ms | image p50 ms |",
             "| --- | --- | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['scenario']} | `{row['flags']}` | {row['switch_ms']['p50']:.2f} | "
                     f"{row['switch_ms']['max']:.2f} | {row['image_after_switch_ms']['p50']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_switch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--architecture", choices=tuple(_SIZES), default="tiny",
                        help="tiny: the embedded model; sd15, sdxl: full-size shapes with random weights (GPU)")
    parser.add_argument("--switches", type=int, default=10, help="timed switches per scenario")
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "imagewire-bench",
                        help="where the full-size shapes are built once and kept")
    parser.add_argument("--json", type=Path, help="also write the figures and the machine here")
    args = parser.parse_args(argv)
    rows = measure(args.architecture, device=args.device, switches=args.switches, models_dir=args.models_dir)
    print(render(rows, architecture=args.architecture, device=args.device))
    if args.json is not None:
        environment = describe(args.device, ["model_switch", *(argv or sys.argv[1:])])
        environment["command"] = environment["command"].replace("-m bench model_switch", "-m bench.model_switch")
        args.json.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
