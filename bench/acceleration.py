"""What step caching buys and costs: seconds per image, and the image's distance from the uncached one.

    python -m bench.acceleration [--models tiny,tiny-flux,sd15] [--size 256] [--steps 20] [--rounds 2]
                                 [--short] [--compile] [--threads N] [--out FILE]

For each model, side by side in one run: the uncached call, then each ``acceleratorOptions`` setting and each
``acceleration`` preset, resolved by the server's own ``tasks/acceleration.prepare`` for that model's catalog
entry and applied by the engine's own ``server/engine/acceleration.caching`` around the pipeline call (the
step callback advances its clock, as in ``server/engine/inference.py``). A fresh sampler and a CPU generator
with the same seed per call, so the uncached image is the reference: PSNR (dB, over 8-bit RGB) and the largest
difference of one channel level against it. Seconds are counted twice: on the wall clock, and as this
process's CPU time, which a busy neighbour on a shared machine leaves alone where one torch thread runs
(``--threads 1``): the CPU figures are the ones to compare there. Every case runs once per round, the rounds
one after another, so drift on a shared machine touches every case alike; seconds are the median over rounds,
and "repeats" says whether every round gave the same bytes.

With ``--compile``, a second copy of the model has its denoiser's repeated blocks compiled as ``--compile``
compiles them (``air_registry/compile.py``), and its cases (uncached, and the ``medium`` preset) run in the same
rounds, against the same eager reference; the compiler's time is the copy's first call, reported apart.

Models: ``tiny`` (the embedded ``imagewire:tiny@1``), ``tiny-flux`` (``imagewire:tiny-flux@1``) and ``sd15``:
SD 1.5's published shapes (``bench/model_configs/sd15.json``, an 860M-parameter UNet) with random weights,
float32, built in memory (``bench/gpu_models.build_pipeline``), served as ``imagewire:sd15@1`` would be. Random
weights cost what trained ones cost per step, but their features change between steps differently: the
quality columns are indicative, the speed columns are real.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("tiny", "tiny-flux", "sd15")
AIRS = {"tiny": "imagewire:tiny@1", "tiny-flux": "imagewire:tiny-flux@1", "sd15": "imagewire:sd15@1"}
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEED = 1234

# (label, acceleration preset, acceleratorOptions, scheduler): the UNet models' cases, then the transformers'.
UNET_CASES: list[tuple[str, str | None, dict[str, Any], str | None]] = [
    ("uncached", None, {}, None),
    ("deepCache interval 2", None, {"deepCache": True, "deepCacheInterval": 2}, None),
    ("deepCache interval 3 (default)", None, {"deepCache": True}, None),
    ("deepCache interval 3, branch 1", None, {"deepCache": True, "deepCacheBranchId": 1}, None),
    ("deepCache interval 3, branch 3", None, {"deepCache": True, "deepCacheBranchId": 3}, None),
    ("deepCache interval 5, max 4 in a row", None,
     {"deepCache": True, "deepCacheInterval": 5, "cacheMaxConsecutiveSteps": 4}, None),
    ("deepCache interval 3, window 20-80 %", None,
     {"deepCache": True, "cacheStartStepPercentage": 20, "cacheEndStepPercentage": 80}, None),
    ("deepCache interval 3, max 1 in a row", None, {"deepCache": True, "cacheMaxConsecutiveSteps": 1}, None),
    ("acceleration low", "low", {}, None),
    ("acceleration medium", "medium", {}, None),
    ("acceleration high", "high", {}, None),
    # A stochastic sampler: against its own uncached image.
    ("Euler a, uncached", None, {}, "Euler a"),
    ("Euler a, acceleration medium", "medium", {}, "Euler a"),
]
TRANSFORMER_CASES: list[tuple[str, str | None, dict[str, Any], str | None]] = [
    ("uncached", None, {}, None),
    ("teaCache distance 0.5 (default)", None, {"teaCache": True}, None),
    ("teaCache distance 0.8", None, {"teaCache": True, "teaCacheDistance": 0.8}, None),
    ("teaCache distance 1", None, {"teaCache": True, "teaCacheDistance": 1.0}, None),
    ("teaCache distance 1, max 1 in a row", None,
     {"teaCache": True, "teaCacheDistance": 1.0, "cacheMaxConsecutiveSteps": 1}, None),
    ("acceleration low", "low", {}, None),
    ("acceleration medium", "medium", {}, None),
    ("acceleration high", "high", {}, None),
]


SHORT = {"uncached", "deepCache interval 3 (default)", "deepCache interval 3, branch 3",
         "teaCache distance 0.5 (default)", "teaCache distance 1", "acceleration low", "acceleration medium",
         "acceleration high"}


@dataclass
class Case:
    label: str
    settings: Any
    scheduler: str | None
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    compiled: bool = False


def _pipeline(model: str) -> Any:
    import torch

    if model == "tiny":
        from imagewire.air_registry.tiny.sd import build_tiny_pipeline
        return build_tiny_pipeline()
    if model == "tiny-flux":
        from imagewire.air_registry.tiny.flux import build_tiny_pipeline as build_flux
        return build_flux()
    from bench.gpu_models import build_pipeline, load_config
    return build_pipeline(load_config("sd15"), device="cpu", dtype=torch.float32, seed=15)


def _settings(model: str, steps: int, preset: str | None, options: dict[str, Any]) -> Any:
    from imagewire.air_registry import Catalog
    from imagewire.tasks import acceleration, schema

    entry = Catalog.load().resolve(AIRS[model])
    task = schema.ImageInference(
        taskUUID="00000000-0000-4000-8000-000000000000", model=AIRS[model], positivePrompt=PROMPT, width=256,
        height=256, steps=steps, acceleration=preset,  # type: ignore[arg-type]
        acceleratorOptions=schema.AcceleratorOptions(**options) if options else None)
    return acceleration.prepare(task, entry, steps)


def _sampler(pipe: Any, name: str | None) -> Any:
    from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteScheduler

    config = pipe.scheduler.config
    if name == "Euler a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    return type(pipe.scheduler).from_config(config)


def _call(pipe: Any, case: Case, base_scheduler: Any, size: int, steps: int,
          flux: bool) -> tuple[float, float, bytes]:
    import torch

    from imagewire.server.engine.acceleration import caching

    pipe.scheduler = base_scheduler if case.scheduler is None else _sampler(pipe, case.scheduler)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # fresh per call, as the engine does
    arguments: dict[str, Any] = {"prompt": PROMPT, "num_inference_steps": steps, "width": size, "height": size,
                                 "guidance_scale": 3.5 if flux else 7.0}
    generator = torch.Generator("cpu").manual_seed(SEED)
    started, cpu_started = time.perf_counter(), time.process_time()
    with torch.inference_mode(), caching(pipe, case.settings) as clock:
        image = pipe(**arguments, generator=generator,
                     callback_on_step_end=clock.after(lambda _pipe, _step, _t, tensors: tensors)).images[0]
    return time.perf_counter() - started, time.process_time() - cpu_started, image.convert("RGB").tobytes()


def _distance(reference: bytes, image: bytes) -> tuple[float, int]:
    a = np.frombuffer(reference, dtype=np.uint8).astype(np.float64)
    b = np.frombuffer(image, dtype=np.uint8).astype(np.float64)
    mse = float(((a - b) ** 2).mean())
    return (math.inf if mse == 0 else 10 * math.log10(255**2 / mse)), int(np.abs(a - b).max())


def run_model(model: str, size: int, steps: int, rounds: int, short: bool = False,
              compile_too: bool = False) -> dict[str, Any]:
    from bench.cpuload import ForeignLoad

    flux = model == "tiny-flux"
    print(f"# {model}: building", file=sys.stderr, flush=True)
    pipe = _pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    base_scheduler = pipe.scheduler
    cases = [Case(label, _settings(model, steps, preset, options), scheduler)
             for label, preset, options, scheduler in (TRANSFORMER_CASES if flux else UNET_CASES)]
    if short:
        cases = [case for case in cases if case.label in SHORT]
    _call(pipe, cases[0], base_scheduler, size, 1, flux)  # warm-up: first-call allocations, one step
    compiled_pipe, compiler_seconds = None, None
    if compile_too:
        from imagewire.air_registry.compile import compile_denoiser

        compiled_pipe = _pipeline(model)
        compiled_pipe.set_progress_bar_config(disable=True)
        compile_denoiser(compiled_pipe)
        cases += [Case("compiled, uncached", None, None, compiled=True),
                  Case("compiled, acceleration medium", _settings(model, steps, "medium", {}), None, compiled=True)]
        print(f"# {model}: compiling", file=sys.stderr, flush=True)
        compiler_seconds, _, _ = _call(compiled_pipe, cases[-2], compiled_pipe.scheduler, size, 2, flux)
    load = ForeignLoad(lambda: [])
    load.start()
    started = time.monotonic()
    for index in range(rounds):
        for case in cases:
            on = compiled_pipe if case.compiled else pipe
            seconds, cpu_seconds, image = _call(on, case, on.scheduler if case.compiled else base_scheduler, size,
                                                steps, flux)
            case.seconds.append(seconds)
            case.cpu_seconds.append(cpu_seconds)
            case.images.append(image)
            print(f"# {model} round {index + 1}: {case.label}: {seconds:.2f} s, CPU {cpu_seconds:.2f} s",
                  file=sys.stderr, flush=True)
    foreign = load.cores()
    references = {case.scheduler: case for case in cases if case.settings is None and not case.compiled}
    rows = []
    for case in cases:
        reference = references[case.scheduler]
        psnr, worst = _distance(reference.images[0], case.images[0])
        median, base = statistics.median(case.seconds), statistics.median(reference.seconds)
        cpu, cpu_base = statistics.median(case.cpu_seconds), statistics.median(reference.cpu_seconds)
        rows.append({"case": case.label, "settings": None if case.settings is None else vars(case.settings),
                     "seconds_per_image": round(median, 3), "speedup": round(base / median, 2),
                     "cpu_seconds_per_image": round(cpu, 3), "cpu_speedup": round(cpu_base / cpu, 2),
                     "psnr_db": None if math.isinf(psnr) else round(psnr, 1), "max_level_difference": worst,
                     "repeats": all(image == case.images[0] for image in case.images),
                     "seconds": [round(s, 3) for s in case.seconds]})
    return {"model": model, "size": size, "steps": steps, "rounds": rounds, "foreign_cores": foreign,
            "first_compiled_call_seconds": None if compiler_seconds is None else round(compiler_seconds, 1),
            "minutes": round((time.monotonic() - started) / 60, 1), "rows": rows}


def render(result: dict[str, Any]) -> str:
    lines = [f"### {result['model']}, {result['size']}², {result['steps']} steps "
             f"({result['rounds']} rounds, other processes used {result['foreign_cores']} cores)", "",
             "| case | CPU s/image | speed-up (CPU) | wall s/image | speed-up (wall) | PSNR dB | max level diff "
             "| repeats |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        psnr = "identical" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"
        lines.append(f"| {row['case']} | {row['cpu_seconds_per_image']:.2f} | {row['cpu_speedup']:.2f}× | "
                     f"{row['seconds_per_image']:.2f} | {row['speedup']:.2f}× | {psnr} | "
                     f"{row['max_level_difference']} | {'yes' if row['repeats'] else 'no'} |")
    if result.get("first_compiled_call_seconds") is not None:
        lines += ["", f"The compiled copy's first call (two steps, the compiler's work): "
                      f"{result['first_compiled_call_seconds']} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.acceleration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,tiny-flux,sd15",
                        help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--short", action="store_true",
                        help="only the uncached call, each cache's defaults, DeepCache's branch 3 and the presets")
    parser.add_argument("--compile", action="store_true",
                        help="also a compiled copy of each model: uncached and with acceleration medium")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here too")
    args = parser.parse_args(argv)
    import torch

    from bench.environment import describe

    if args.threads:
        torch.set_num_threads(args.threads)
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    environment = describe("cpu", ["acceleration", *(argv if argv is not None else sys.argv[1:])])
    environment["command"] = environment["command"].replace("-m bench acceleration", "-m bench.acceleration")
    environment["torch_threads"] = torch.get_num_threads()
    environment["load_average_at_start"] = os.getloadavg()
    results = []
    for model in models:
        result = run_model(model, args.size, args.steps, args.rounds, args.short, args.compile)
        results.append(result)
        print(render(result) + "\n", flush=True)
    environment["load_average_at_end"] = os.getloadavg()
    print(f"command: {environment['command']}; torch threads {environment['torch_threads']}; load average "
          f"{environment['load_average_at_start'][0]:.2f} at start, {environment['load_average_at_end'][0]:.2f} "
          f"at end; revision {environment['git_revision']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": environment, "results": results}, indent=2))


if __name__ == "__main__":
    main()
