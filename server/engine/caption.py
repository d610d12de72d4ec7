"""imageCaption jobs on a BLIP captioner: the jobs given share a model and a prompt, so their pictures are
captioned in one call. Decoding is greedy: a picture gets the same caption every time."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from imagewire.tasks.image_caption import CaptionJob
from imagewire.tasks.jobs import Emit, GeneratedText

if TYPE_CHECKING:
    from imagewire.server.engine import DiffusersEngine

MAX_NEW_TOKENS = 60


def _load(path: Path, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(str(path))
    model = BlipForConditionalGeneration.from_pretrained(str(path), dtype=dtype).to(device).eval()  # type: ignore[arg-type]
    return processor, model


def run(engine: DiffusersEngine, jobs: Sequence[CaptionJob], emit: Emit) -> None:
    first = jobs[0]
    tools = engine.tools
    processor, model = tools.get(first.model, first.weights, lambda path: _load(path, tools.device, tools.dtype))
    started = time.perf_counter()
    text = [first.prompt] * len(jobs) if first.prompt else None
    batch = processor(images=[job.image for job in jobs], text=text, return_tensors="pt").to(tools.device)
    batch["pixel_values"] = batch["pixel_values"].to(tools.dtype)
    with torch.inference_mode():
        tokens = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=1, do_sample=False)
    captions = processor.batch_decode(tokens, skip_special_tokens=True)
    share = (time.perf_counter() - started) / len(jobs)
    for index, caption in enumerate(captions):
        emit(index, [GeneratedText(" ".join(caption.split()), share)])
