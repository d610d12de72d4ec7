"""The embedded model ``imagewire:tiny-background@1`` (builder ``tiny-background``): a SegFormer segmentation
network with one output channel (foreground against background), small enough to run anywhere, with
random weights. Saved in transformers format; the background removal runner reads its logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import SegformerConfig, SegformerForSemanticSegmentation

MARKER = "config.json"
_SEED = 12


def build(directory: Path) -> None:
    config = SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
        decoder_hidden_size=16, num_labels=1)  # type: ignore[call-arg]  # a PretrainedConfig keyword
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = SegformerForSemanticSegmentation(config)
    model.save_pretrained(directory, safe_serialization=True)
