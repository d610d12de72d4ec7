"""The embedded model ``imagewire:tiny-safety@1`` (builder ``tiny-safety``): the safety checker diffusers'
Stable Diffusion pipelines use (``StableDiffusionSafetyChecker``: a CLIP vision tower whose image embedding
is compared with embeddings of unwanted concepts), tiny and with random weights, plus its image processor.

An image is flagged when its similarity to a concept exceeds that concept's threshold
(``concept_embeds_weights`` and ``special_care_embeds_weights``). This checker's thresholds are 1, which
a cosine similarity never exceeds: it flags nothing. ``build(directory, flag_everything=True)`` saves the
same checker with thresholds of -2, which every similarity exceeds: it flags every image. That is how
tests force a flag: build it into a folder and name the folder in a catalog file (category ``safety``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig

from imagewire.air_registry.model_files import COMPONENT_CONFIG

MARKER = COMPONENT_CONFIG  # a single model, not a pipeline: its config.json, not model_index.json

_CHECKER_SEED = 7
IMAGE_SIZE = 32
NEVER = 1.0
ALWAYS = -2.0


def build_tiny_safety_checker(*, flag_everything: bool = False) -> StableDiffusionSafetyChecker:
    config = CLIPConfig(
        # The checker reads no text; the text tower is only part of the config's shape.
        text_config={"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 99, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=16,
    )
    threshold = ALWAYS if flag_everything else NEVER
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_CHECKER_SEED)
        checker = StableDiffusionSafetyChecker(config)
        with torch.no_grad():
            # The concepts are random directions; only the thresholds decide what gets flagged.
            checker.concept_embeds.copy_(torch.randn(checker.concept_embeds.shape))
            checker.special_care_embeds.copy_(torch.randn(checker.special_care_embeds.shape))
            checker.concept_embeds_weights.fill_(threshold)
            checker.special_care_embeds_weights.fill_(threshold)
    return checker.eval()


def image_processor_class() -> Any:
    """CLIP's image processor on PIL alone: newer transformers name that variant, which needs no torchvision."""
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def build_image_processor() -> Any:
    return image_processor_class()(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build(directory: Path, *, flag_everything: bool = False) -> None:
    build_tiny_safety_checker(flag_everything=flag_everything).save_pretrained(directory, safe_serialization=True)
    build_image_processor().save_pretrained(directory)
