"""imageBackgroundRemoval jobs: a segmentation network's mask of the subject, at each input's own size.

One adapter per family says how its network is read, what square it sees, how pixels are normalised
and where in its output the mask is. Pictures of any size share a call: each is resized to the square.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from imagewire.air_registry import ARCHITECTURES
from imagewire.server.engine.images import to_image, to_tensor
from imagewire.tasks.background_removal import BackgroundRemovalJob
from imagewire.tasks.jobs import Emit, ProcessedImage

if TYPE_CHECKING:
    from imagewire.server.engine import DiffusersEngine

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _transformers_model(auto_class: str, *, remote_code: bool = False) -> Callable[[Path, str, torch.dtype], Any]:
    def load(path: Path, device: str, dtype: torch.dtype) -> Any:
        import transformers

        # BiRefNet and RMBG ship their architecture as code in their repo: it runs from the local copy.
        model = getattr(transformers, auto_class).from_pretrained(
            str(path), trust_remote_code=remote_code, dtype=dtype)
        return model.to(device).eval()

    return load


def _normalised_minmax(masks: torch.Tensor) -> torch.Tensor:
    low = masks.amin(dim=(1, 2, 3), keepdim=True)
    high = masks.amax(dim=(1, 2, 3), keepdim=True)
    return (masks - low) / (high - low).clamp_min(1e-6)


@dataclass(frozen=True)
class Segmenter:
    load: Callable[[Path, str, torch.dtype], Any]
    size: int                                   # the square the network sees
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mask: Callable[[Any], torch.Tensor]         # network output → (N, 1, h, w) probabilities


SEGMENTERS: dict[str, Segmenter] = {
    # The embedded test model: SegFormer with one class; its logits are a quarter of the input's size.
    "segformer": Segmenter(_transformers_model("AutoModelForSemanticSegmentation"), 64, IMAGENET_MEAN,
                           IMAGENET_STD, lambda output: output.logits.sigmoid()),
    # BiRefNet (and BRIA RMBG 2.0, a BiRefNet): the last of its predictions is the finest.
    "birefnet": Segmenter(_transformers_model("AutoModelForImageSegmentation", remote_code=True), 1024,
                          IMAGENET_MEAN, IMAGENET_STD, lambda output: output[-1].sigmoid()),
    # BRIA RMBG 1.4 (IS-Net): probabilities already, stretched to the full range as its authors do.
    "rmbg": Segmenter(_transformers_model("AutoModelForImageSegmentation", remote_code=True), 1024,
                      (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), lambda output: _normalised_minmax(output[0][0])),
}


def run(engine: DiffusersEngine, jobs: Sequence[BackgroundRemovalJob], emit: Emit) -> None:
    first = jobs[0]
    tools = engine.tools
    segmenter = SEGMENTERS[ARCHITECTURES[first.model.architecture].family]
    network = tools.get(first.model, first.weights, lambda path: segmenter.load(path, tools.device, tools.dtype))
    started = time.perf_counter()
    square = [job.image.resize((segmenter.size, segmenter.size), Image.Resampling.BILINEAR) for job in jobs]
    pixels = to_tensor(square, device=tools.device, dtype=tools.dtype)
    mean = torch.tensor(segmenter.mean, device=tools.device, dtype=tools.dtype).view(1, 3, 1, 1)
    std = torch.tensor(segmenter.std, device=tools.device, dtype=tools.dtype).view(1, 3, 1, 1)
    with torch.inference_mode():
        masks = segmenter.mask(network((pixels - mean) / std)).float()
    share = (time.perf_counter() - started) / len(jobs)
    for index, job in enumerate(jobs):
        width, height = job.image.size
        mask = F.interpolate(masks[index:index + 1], size=(height, width), mode="bilinear", align_corners=False)
        emit(index, [ProcessedImage(to_image(mask[0]), share)])
