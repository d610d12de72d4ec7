"""imageMasking jobs on an open-vocabulary detector (OWL-ViT, OWLv2 from ``transformers``): every image patch
proposes a box and scores it against the job's query ("a photo of a human face"); the boxes scoring above the
job's confidence, with overlapping ones merged into the best of them, are its detections.

The jobs given share a model and a query, so their pictures go through in one call, each scaled to the square
the network sees: OWL-ViT stretches a picture to it, OWLv2 pads it to a square first (grey, below and to the
right, as its authors do), and its boxes are relative to that padded square.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from imagewire.air_registry import ARCHITECTURES
from imagewire.server.engine.images import to_tensor
from imagewire.tasks.image_masking import Box, Detections, MaskingJob
from imagewire.tasks.jobs import Emit

if TYPE_CHECKING:
    from imagewire.server.engine import DiffusersEngine

# CLIP's normalisation, which both OWL generations were trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PADDING_GREY = (128, 128, 128)
# Boxes overlapping a better one by more than this (intersection over union) are the same object found twice.
SAME_OBJECT_OVERLAP = 0.5


@dataclass(frozen=True)
class DetectorFamily:
    pads_to_square: bool


FAMILIES = {"owlvit": DetectorFamily(pads_to_square=False), "owlv2": DetectorFamily(pads_to_square=True)}


def _load(path: Path, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForZeroShotObjectDetection, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForZeroShotObjectDetection.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return tokenizer, model


def square(image: Image.Image, side: int, family: DetectorFamily) -> tuple[Image.Image, tuple[float, float]]:
    """The picture as the network sees it, and the pixels of the picture one unit of a box coordinate spans
    across and down."""
    width, height = image.size
    if family.pads_to_square:
        longest = max(width, height)
        padded = Image.new("RGB", (longest, longest), PADDING_GREY)
        padded.paste(image.convert("RGB"), (0, 0))
        return padded.resize((side, side), Image.Resampling.BILINEAR), (longest, longest)
    return image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC), (width, height)


def best_distinct(corners: torch.Tensor, scores: torch.Tensor, limit: int) -> list[int]:
    """Indices of at most ``limit`` boxes, best first, none overlapping a better kept one by more than
    ``SAME_OBJECT_OVERLAP`` (greedy non-maximum suppression). ``corners``: (N, 4) as x0, y0, x1, y1."""
    order = scores.argsort(descending=True)
    corners = corners[order]
    areas = (corners[:, 2] - corners[:, 0]).clamp_min(0) * (corners[:, 3] - corners[:, 1]).clamp_min(0)
    alive = torch.ones(len(order), dtype=torch.bool)
    kept: list[int] = []
    for position in range(len(order)):
        if len(kept) == limit:
            break
        if not alive[position]:
            continue
        kept.append(int(order[position]))
        top_left = torch.maximum(corners[position, :2], corners[:, :2])
        bottom_right = torch.minimum(corners[position, 2:], corners[:, 2:])
        overlap = (bottom_right - top_left).clamp_min(0).prod(dim=1)
        union = areas[position] + areas - overlap
        alive &= ~(overlap > SAME_OBJECT_OVERLAP * union.clamp_min(1e-9))
    return kept


def run(engine: DiffusersEngine, jobs: Sequence[MaskingJob], emit: Emit) -> None:
    first = jobs[0]
    tools = engine.tools
    family = FAMILIES[ARCHITECTURES[first.model.architecture].family]
    tokenizer, network = tools.get(first.model, first.weights, lambda path: _load(path, tools.device, tools.dtype))
    started = time.perf_counter()
    side = network.config.vision_config.image_size
    squares, spans = zip(*(square(job.image, side, family) for job in jobs), strict=True)
    pixels = to_tensor(squares, device=tools.device, dtype=tools.dtype)
    mean = torch.tensor(CLIP_MEAN, device=tools.device, dtype=tools.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=tools.device, dtype=tools.dtype).view(1, 3, 1, 1)
    query = tokenizer([first.query], padding="max_length", truncation=True, return_tensors="pt",
                      max_length=network.config.text_config.max_position_embeddings).to(tools.device)
    with torch.inference_mode():
        output = network(input_ids=query.input_ids.repeat(len(jobs), 1),
                         attention_mask=query.attention_mask.repeat(len(jobs), 1), pixel_values=(pixels - mean) / std)
    scores = output.logits[..., 0].float().sigmoid().cpu()        # (N, patches): one query
    centres = output.pred_boxes.float().cpu()                        # (N, patches, 4): cx, cy, w, h in 0–1
    share = (time.perf_counter() - started) / len(jobs)
    for index, job in enumerate(jobs):
        across, down = spans[index]
        cx, cy, w, h = centres[index].unbind(-1)
        corners = torch.stack([(cx - w / 2) * across, (cy - h / 2) * down, (cx + w / 2) * across,
                               (cy + h / 2) * down], dim=-1)
        # The page keeps detections "above" the threshold.
        candidates = (scores[index] > job.confidence).nonzero().flatten()
        chosen = best_distinct(corners[candidates], scores[index][candidates], job.max_detections)
        boxes = []
        for position in chosen:
            left, top, right, bottom = (float(value) for value in corners[candidates[position]])
            boxes.append(Box(left, top, right, bottom, score=float(scores[index][candidates[position]])))
        emit(index, [Detections(tuple(boxes), share)])
