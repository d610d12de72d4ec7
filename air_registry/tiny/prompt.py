"""The embedded model ``imagewire:tiny-prompt@1`` (builder ``tiny-prompt``): a GPT-2 language model small
enough to run anywhere, with random weights and a byte-level tokenizer written from nothing (one token
per byte). It continues a prompt the way prompt-expansion models made for Stable Diffusion do, with
random text.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from imagewire.air_registry.tiny.tokenizers import GPT2_END_TOKEN, write_gpt2_vocabulary

MARKER = "config.json"
_SEED = 14


def build(directory: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="imagewire-tiny-bytes-") as folder:
        write_gpt2_vocabulary(Path(folder))
        tokenizer = GPT2Tokenizer.from_pretrained(folder, model_max_length=512)
    end = tokenizer.convert_tokens_to_ids(GPT2_END_TOKEN)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=end, eos_token_id=end)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
