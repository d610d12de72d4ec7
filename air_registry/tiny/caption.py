"""The embedded model ``imagewire:tiny-caption@1`` (builder ``tiny-caption``): a BLIP captioner (a ViT image
encoder and a cross-attending text decoder) small enough to run anywhere, with random weights and a
character-level WordPiece tokenizer written from nothing. Its captions are gibberish, but they are text
made the way a real BLIP model makes them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
)

from imagewire.air_registry.tiny.tokenizers import wordpiece_vocab, write_wordpiece_vocabulary

MARKER = "config.json"
IMAGE_SIZE = 64
_SEED = 13


def build_processor() -> BlipProcessor:
    with tempfile.TemporaryDirectory(prefix="imagewire-tiny-wordpiece-") as folder:
        write_wordpiece_vocabulary(Path(folder))
        tokenizer = BertTokenizer.from_pretrained(folder, bos_token="[DEC]", model_max_length=64)
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build(directory: Path) -> None:
    vocab = {token: index for index, token in enumerate(wordpiece_vocab())}
    config = BlipConfig(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 16},
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "encoder_hidden_size": 16,
                     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 64, "bos_token_id": vocab["[DEC]"], "eos_token_id": vocab["[SEP]"],
                     "sep_token_id": vocab["[SEP]"], "pad_token_id": vocab["[PAD]"]},
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = BlipForConditionalGeneration(config)
    model.save_pretrained(directory, safe_serialization=True)
    build_processor().save_pretrained(directory)
