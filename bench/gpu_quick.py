"""What each memory plan costs on a GPU: FLUX.1 [dev] and SDXL shapes with random weights at 1024², placed as
the server would place them under ``--device-memory-gib`` 12, 16, 24 and without a cap, beside raw diffusers
with the same offload method.

    python -m bench.gpu_quick [--models flux,sdxl] [--budgets 12,16,24,0] [--steps 4] [--out bench/results]
    python -m bench --suite gpu-quick [the same options]
    python -m bench.gpu_quick --dry-run     # no CUDA needed: the plans it would run, from the real shapes

For each model and budget it plans the placement from the model's real shapes (``air_registry/memory_plan.py``,
one image per call at 1024²), caps the process's CUDA memory at the budget (so that a plan that does not fit
fails as it would on a smaller card), places the pipeline with the server's own ``place`` and decode rule, and
times one call of ``--steps`` steps: seconds per image and peak allocated memory. Then the same call on raw
diffusers with the same method (``.to``, ``enable_model_cpu_offload``, ``enable_group_offload``; the server's
text-encoders-on-cpu placement has no diffusers method, so no raw row). Budgets run from the largest down,
since group offload cannot be taken off a pipeline again. About a minute per model on an H100 after the build
(weights initialised on the GPU, not saved). Figures go to ``<out>/gpu-quick-<UTC date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.gpu_models import build_pipeline, load_config, meta_size

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MODELS = ("flux", "sdxl")
GIB = 1024**3
# The made-up card a dry run plans "no cap" on: an H100's 80 GB.
DRY_RUN_DEVICE_GIB = 80.0
SIZE = 1024
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def activations(architecture: str, dtype_bytes: int = 2) -> int:
    from imagewire.air_registry.memory_plan import Activations

    copies = 1 if architecture == "flux" else 2   # FLUX.1 [dev] is guidance-distilled: one latent per image
    size = meta_size(architecture, dtype_bytes=dtype_bytes)
    return Activations(batch=1, width=SIZE, height=SIZE, dtype_bytes=dtype_bytes, copies=copies).total(
        size.denoiser_kind)


def plan_for(architecture: str, budget_gib: float | None) -> Any:
    """The server's plan for ``architecture`` on ``budget_gib`` (None: the device's own size), or the refusal."""
    from imagewire.air_registry.memory_plan import ModelTooLarge, plan_placement

    size = meta_size(architecture)
    budget = None if budget_gib is None else int(budget_gib * GIB)
    try:
        return plan_placement(size, budget=budget, activations=activations(architecture), device="cuda",
                              label=architecture)
    except ModelTooLarge as refused:
        return refused


def planned(models: Sequence[str], budgets: Sequence[float], device_gib: float) -> list[dict[str, Any]]:
    """Each model's plan for each budget (0: no cap, the device's ``device_gib``)."""
    rows = []
    for architecture in models:
        for budget in budgets:
            effective = device_gib if budget == 0 else min(budget, device_gib)
            plan = plan_for(architecture, effective)
            row: dict[str, Any] = {"model": architecture, "budget_gib": budget or None,
                                   "model_gib": round(meta_size(architecture).total / GIB, 2)}
            if isinstance(plan, Exception):
                row.update(plan=None, refused=str(plan))
            else:
                row.update(plan=plan.placement, planned_peak_gib=round(plan.peak_bytes / GIB, 2),
                           resident_gib=round(plan.resident_bytes / GIB, 2))
            rows.append(row)
    return rows


# ---------------------------------------------------------------- on the GPU


def _raw_place(pipe: Any, placement: str) -> bool:
    """Raw diffusers' own method for ``placement``; False where it has none."""
    import torch

    from imagewire.air_registry.memory_plan import ALL_ON_DEVICE, MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD

    if placement == ALL_ON_DEVICE:
        pipe.to("cuda")
    elif placement == MODEL_OFFLOAD:
        pipe.enable_model_cpu_offload(device="cuda")
    elif placement == SEQUENTIAL_OFFLOAD:
        pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    else:
        return False
    return True


def _timed_call(pipe: Any, architecture: str, steps: int) -> dict[str, float]:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    options: dict[str, Any] = {"guidance_scale": 3.5} if architecture == "flux" else {"guidance_scale": 7.0}
    with torch.inference_mode():
        pipe(PROMPT, num_inference_steps=steps, width=SIZE, height=SIZE, output_type="np",
             generator=torch.Generator("cpu").manual_seed(0), **options)
    torch.cuda.synchronize()
    return {"seconds_per_image": round(time.perf_counter() - started, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2)}


def _run_one(pipe: Any, architecture: str, placement: str, budget_gib: float | None, steps: int,
             served: bool) -> dict[str, Any] | None:
    import torch

    from imagewire.air_registry.loader import place, unplace
    from imagewire.air_registry.memory_plan import decode_mode
    from imagewire.server.engine.inference import bound_decode

    unplace(pipe)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if budget_gib is None else min(1.0, budget_gib * GIB / total))
    if served:
        place(pipe, placement, "cuda")
        plan = plan_for(architecture, budget_gib)
        bound_decode(pipe, decode_mode(getattr(plan, "headroom", None), 1, SIZE, SIZE))
    elif not _raw_place(pipe, placement):
        return None
    else:
        bound_decode(pipe, decode_mode(None, 1, SIZE, SIZE))
    try:
        _timed_call(pipe, architecture, 1)   # warm-up: kernels, the allocator, the first copies
        return _timed_call(pipe, architecture, steps)
    except torch.OutOfMemoryError as exc:
        return {"out_of_memory": str(exc).splitlines()[0]}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def measure(models: Sequence[str], budgets: Sequence[float], steps: int) -> list[dict[str, Any]]:
    import torch

    device_gib = torch.cuda.mem_get_info()[0] / GIB
    rows = planned(models, budgets, device_gib)
    for architecture in models:
        print(f"building {architecture} with random weights on the GPU", file=sys.stderr)
        pipe = build_pipeline(load_config(architecture), device="cuda", dtype=torch.bfloat16 if architecture == "flux"
                              else torch.float16)
        pipe.set_progress_bar_config(disable=True)
        # Largest budget first: group offload stays on a pipeline once applied.
        mine = sorted((row for row in rows if row["model"] == architecture and row["plan"] is not None),
                      key=lambda row: -(row["budget_gib"] or 1e9))
        for row in mine:
            budget = row["budget_gib"]
            print(f"{architecture} on {budget or 'the whole device'} GiB: {row['plan']}", file=sys.stderr)
            row["imagewire"] = _run_one(pipe, architecture, row["plan"], budget, steps, served=True)
            row["raw_diffusers"] = _run_one(pipe, architecture, row["plan"], budget, steps, served=False)
        del pipe
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| model | budget GiB | plan | planned peak GiB | imagewire s/image | imagewire peak GiB "
             "| raw diffusers s/image | raw peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        served, raw = row.get("imagewire") or {}, row.get("raw_diffusers") or {}
        lines.append(f"| {row['model']} | {row['budget_gib'] or 'no cap'} | {row['plan'] or 'refused'} | "
                     f"{row.get('planned_peak_gib', '')} | {served.get('seconds_per_image', '')} | "
                     f"{served.get('peak_gib', '')} | {raw.get('seconds_per_image', '')} | {raw.get('peak_gib', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_quick", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: flux, sdxl")
    parser.add_argument("--budgets", default="12,16,24,0", help="--device-memory-gib values, GiB; 0: no cap")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per timed call")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON and Markdown results")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"no CUDA: print the plans it would run, on a made-up {DRY_RUN_DEVICE_GIB:g} GiB device")
    options = parser.parse_args(argv)
    models = [name.strip() for name in options.models.split(",") if name.strip()]
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    budgets = [float(value) for value in options.budgets.split(",")]
    import torch

    dry_run = options.dry_run or not torch.cuda.is_available()
    if dry_run:
        if not options.dry_run:
            print("no CUDA device: planning only (--dry-run)", file=sys.stderr)
        rows = planned(models, budgets, DRY_RUN_DEVICE_GIB)
        device = f"none (planned for a made-up {DRY_RUN_DEVICE_GIB:g} GiB device)"
    else:
        rows = measure(models, budgets, options.steps)
        device = torch.cuda.get_device_name(0)
    date = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    results = {"suite": "gpu-quick", "dry_run": dry_run, "device": device, "date": date, "size": SIZE,
               "steps": options.steps, "rows": rows}
    table = markdown(rows, f"gpu-quick on {device}, {SIZE}², {options.steps} steps, one image per call")
    print(table)
    options.out.mkdir(parents=True, exist_ok=True)
    stem = options.out / f"gpu-quick{'-dry-run' if dry_run else ''}-{date}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(table, encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
