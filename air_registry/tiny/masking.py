"""The embedded model ``imagewire:tiny-masking@1`` (builder ``tiny-masking``): an OWL-ViT open-vocabulary
detector (a CLIP-style image and text encoder with box and class heads on every image patch), small enough to
run anywhere, with random weights and the byte-level CLIP tokenizer of ``tokenizers.py``. Its detections are
arbitrary, but they come out of the same network, post-processing and mask drawing as a real detector's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Owlv2Config, Owlv2ForObjectDetection, OwlViTConfig, OwlViTForObjectDetection

from imagewire.air_registry.tiny.tokenizers import END_TOKEN, START_TOKEN, build_clip_tokenizer, clip_vocab

MARKER = "config.json"
IMAGE_SIZE = 96   # 6 × 6 patches of 16 pixels: 36 candidate boxes
MAX_QUERY_TOKENS = 16
_SEED = 14
# The default initialisation leaves the heads' outputs near zero or saturated: every score near 0.5 and every
# box the size of a patch, or every box the whole picture. These spreads give scores across (0, 1) and boxes of
# varied sizes around their patches, so that thresholds, caps and padding have something to act on in tests.
_BOX_HEAD_STD = 0.15
_CLASS_HEAD_STD = 0.02
_LOGIT_SCALE_BIAS = 5.0   # elu(5) + 1: the patch-query similarity, within ±1, is stretched six times
_LOGIT_SHIFT_BIAS = -0.6  # random patch and query embeddings come out similar: centre their scores on 0.5


def build(directory: Path, *, generation: str = "owlvit") -> None:
    """Save the detector in ``directory``; ``generation="owlv2"`` saves the same shapes as an OWLv2 (which
    sees pictures padded to a square and adds an objectness head), for tests of that family's path."""
    vocab = clip_vocab()
    shapes: dict[str, Any] = {
        "text_config": {"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "max_position_embeddings": MAX_QUERY_TOKENS,
                        "bos_token_id": vocab[START_TOKEN], "eos_token_id": vocab[END_TOKEN],
                        "pad_token_id": vocab[END_TOKEN]},
        "vision_config": {"image_size": IMAGE_SIZE, "patch_size": 16, "hidden_size": 16, "intermediate_size": 32,
                          "num_hidden_layers": 1, "num_attention_heads": 2},
        "projection_dim": 16}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model: OwlViTForObjectDetection | Owlv2ForObjectDetection = (
            OwlViTForObjectDetection(OwlViTConfig(**shapes)) if generation == "owlvit"
            else Owlv2ForObjectDetection(Owlv2Config(**shapes)))
        with torch.no_grad():
            heads = model.box_head
            for layer in (heads.dense0, heads.dense1, heads.dense2):
                layer.weight.normal_(std=_BOX_HEAD_STD)
                layer.bias.zero_()
            for layer in (model.class_head.logit_shift, model.class_head.logit_scale):
                layer.weight.normal_(std=_CLASS_HEAD_STD)
                layer.bias.zero_()
            model.class_head.logit_scale.bias.fill_(_LOGIT_SCALE_BIAS)
            model.class_head.logit_shift.bias.fill_(_LOGIT_SHIFT_BIAS)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer = build_clip_tokenizer()
    tokenizer.model_max_length = MAX_QUERY_TOKENS
    tokenizer.save_pretrained(directory)
