"""What the editing parameters cost: the CPU stages around the pipeline and the device time of a call.

    python -m bench.editing [--repeats N]

1. The image stages the handler runs in worker threads, per image: the mask's blend weights, the crop of
   ``maskMargin``, the paste-back, and a canny guide image, at 512² and 1024².
2. One pipeline call (1 image) on the embedded models at 256², 8 steps, through the engine itself:
   image-to-image as the reference, inpainting with an ordinary and a 9-channel checkpoint, one and two
   ControlNets, and the content safety checker on the result.

Medians of ``--repeats`` runs after one warm-up, printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _median_ms(work: Callable[[], Any], repeats: int) -> float:
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _picture(size: int) -> Image.Image:
    x, y = np.meshgrid(np.arange(size), np.arange(size))
    return Image.fromarray(np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 7) % 256], -1).astype(np.uint8))


def _mask(size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 3, size * 3 // 4, size * 2 // 3))
    return mask


def image_stages(repeats: int) -> list[tuple[str, str, float]]:
    from imagewire.tasks import canvas, guides

    rows = []
    for size in (512, 1024):
        picture, mask = _picture(size), _mask(size)
        alpha = canvas.blend_weights(mask)
        box = canvas.crop_box(mask, 64, (size, size))
        scene = canvas.Scene(width=size, height=size, init_image=picture, mask_image=mask, canvas=picture,
                             alpha=alpha)
        cropped = canvas.Scene(width=size, height=size, init_image=picture, mask_image=mask, canvas=picture,
                               alpha=alpha, crop=box)
        generated = _picture(size).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        side = f"{size}²"
        rows += [
            ("mask blend weights", side, _median_ms(lambda m=mask: canvas.blend_weights(m), repeats)),
            ("maskMargin crop, scaled to full size", side, _median_ms(
                lambda p=picture, b=box, s=size: p.crop(b).resize((s, s), Image.Resampling.LANCZOS), repeats)),
            ("paste-back", side, _median_ms(lambda sc=scene, g=generated: canvas.paste_back(sc, g), repeats)),
            ("paste-back of a maskMargin crop", side,
             _median_ms(lambda sc=cropped, g=generated: canvas.paste_back(sc, g), repeats)),
            ("canny guide image", side,
             _median_ms(lambda p=picture: guides.canny(p, guides.GuideOptions()), repeats)),
        ]
    return rows


def device_calls(repeats: int) -> list[tuple[str, str, float]]:
    from imagewire.air_registry import Catalog, locate_weights
    from imagewire.server.engine import DiffusersEngine
    from imagewire.tasks.jobs import ControlNetUse, InferenceJob, SafetyCheckJob

    catalog = Catalog.load()
    data_dir = Path(tempfile.mkdtemp(prefix="imagewire-bench-editing-"))
    engine = DiffusersEngine(device="cpu", data_dir=data_dir, allow_downloads=False, max_batch_size=4)
    entries = {name: catalog.resolve(name) for name in ("tiny", "tiny-inpaint", "tiny-controlnet", "tiny-safety")}
    weights = {name: locate_weights(entry, data_dir=data_dir, allow_downloads=False)
               for name, entry in entries.items()}
    size = 256
    seed, mask, guide = _picture(size), _mask(size), _picture(size).convert("L").convert("RGB")
    control = ControlNetUse(model=entries["tiny-controlnet"], weights=weights["tiny-controlnet"], weight=1.0,
                            start=0.0, end=1.0, mode="balanced")

    def job(model: str = "tiny", **changes: Any) -> InferenceJob:
        fields: dict[str, Any] = dict(
            task_uuid="bench", model=entries[model], weights=weights[model], prompt="a lighthouse",
            negative_prompt=None, width=size, height=size, steps=8, cfg_scale=7.0, sampler=None, seeds=[1],
            init_image=seed, strength=1.0)
        fields.update(changes)
        return InferenceJob(**fields)

    cases = [
        ("image-to-image (reference)", job()),
        ("inpainting, ordinary checkpoint", job(mask_image=mask)),
        ("inpainting, 9-channel checkpoint", job("tiny-inpaint", mask_image=mask)),
        ("image-to-image, 1 ControlNet", job(controlnets=(control,), guide_images=(guide,))),
        ("image-to-image, 2 ControlNets", job(controlnets=(control, control), guide_images=(guide, guide))),
        ("safety check of 1 image", SafetyCheckJob(task_uuid="bench", checker=entries["tiny-safety"],
                                                   weights=weights["tiny-safety"], pictures=[seed])),
    ]
    return [(name, f"{size}², 8 steps" if isinstance(case, InferenceJob) else f"{size}²",
             _median_ms(lambda c=case: engine.run([c], lambda index, results: None), repeats))
            for name, case in cases]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.editing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    print("| stage | size | median ms |\n| --- | --- | --- |")
    for name, size, ms in [*image_stages(args.repeats), *device_calls(args.repeats)]:
        print(f"| {name} | {size} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
