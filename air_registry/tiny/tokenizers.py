"""Tokenizers for the embedded models, written from nothing: no vocabulary is downloaded.

The CLIP tokenizer's vocabulary is every single byte, alone and word-final, plus the start and end
markers, with no merges: every prompt splits into one token per byte, which is all a model with
random weights needs, and no text can fall outside the vocabulary.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
CLIP_MAX_LENGTH = 77


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE uses to stand for the 256 byte values.

    Printable bytes stand for themselves; the others are shifted past 255 so that every byte has a
    visible, non-whitespace character. This is the mapping CLIP's tokenizer expects.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in characters:
            characters[byte] = chr(256 + shift)
            shift += 1
    return [characters[byte] for byte in range(256)]


def clip_vocab() -> dict[str, int]:
    alphabet = _byte_level_alphabet()
    tokens = [*alphabet, *(character + "</w>" for character in alphabet), START_TOKEN, END_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def write_clip_vocabulary(directory: Path) -> None:
    """vocab.json and merges.txt: the files every version of the CLIP tokenizer can read."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "vocab.json", "w", encoding="utf-8") as file:
        json.dump(clip_vocab(), file, ensure_ascii=False)
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def build_clip_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory(prefix="imagewire-tiny-tokenizer-") as directory:
        write_clip_vocabulary(Path(directory))
        return CLIPTokenizer.from_pretrained(directory, model_max_length=CLIP_MAX_LENGTH)
