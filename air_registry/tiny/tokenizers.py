"""Tokenizers for the embedded models, written from nothing: no vocabulary is downloaded.

The CLIP tokenizer's vocabulary is every single byte, alone and word-final, plus the start and end
markers, with no merges: every prompt splits into one token per byte, which is all a model with
random weights needs, and no text can fall outside the vocabulary.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import transformers
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

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


# The T5 tokenizer of the flow-matching models: SentencePiece-style unigram pieces for every printable
# ASCII character and the word-start marker, so that a prompt splits into one piece per character.
# Other characters become the unknown piece: enough for a model with random weights.
T5_PAD_TOKEN = "<pad>"
T5_END_TOKEN = "</s>"
T5_UNKNOWN_TOKEN = "<unk>"
_WORD_START = "\u2581"


def t5_vocab() -> list[tuple[str, float]]:
    """The unigram pieces with their scores, in id order (pad 0, end 1, unknown 2, as T5 has them)."""
    special = [(T5_PAD_TOKEN, 0.0), (T5_END_TOKEN, 0.0), (T5_UNKNOWN_TOKEN, 0.0)]
    return [*special, (_WORD_START, -1.0), *((chr(code), -2.0) for code in range(ord("!"), ord("~") + 1))]


def build_t5_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """A T5 tokenizer built with the ``tokenizers`` library from :func:`t5_vocab`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    backend = Tokenizer(models.Unigram(t5_vocab(), unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=_WORD_START, prepend_scheme="always")])
    backend.decoder = decoders.Metaspace(replacement=_WORD_START, prepend_scheme="always")
    # T5 ends every sequence with the end marker.
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_END_TOKEN}", pair=f"$A {T5_END_TOKEN} $B {T5_END_TOKEN}", special_tokens=[(T5_END_TOKEN, 1)])
    # transformers 5 exports the tokenizers-backed T5 tokenizer under both its names; its stubs show one.
    t5_tokenizer = transformers.T5TokenizerFast  # type: ignore[attr-defined]
    return t5_tokenizer(tokenizer_object=backend, eos_token=T5_END_TOKEN, unk_token=T5_UNKNOWN_TOKEN,
                        pad_token=T5_PAD_TOKEN, extra_ids=0, model_max_length=max_length)


# ---------------------------------------------------------------- the language models' tokenizers

GPT2_END_TOKEN = "<|endoftext|>"


def write_gpt2_vocabulary(directory: Path) -> None:
    """vocab.json and merges.txt of a byte-level tokenizer: one token per byte, and the end marker.

    A byte-level vocabulary decodes any token sequence back into text, so whatever a model with random
    weights generates is still a string (and its length in tokens is its length in UTF-8 bytes).
    """
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {character: byte for byte, character in enumerate(_byte_level_alphabet())}
    vocab[GPT2_END_TOKEN] = len(vocab)
    with open(directory / "vocab.json", "w", encoding="utf-8") as file:
        json.dump(vocab, file, ensure_ascii=False)
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


# BERT-style special tokens, then the printable ASCII characters alone and word-inner ("##x"): every
# ASCII word splits into one piece per character. "[DEC]" starts a decoded caption, as in BLIP.
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


def wordpiece_vocab() -> list[str]:
    characters = [chr(code) for code in range(ord("!"), ord("~") + 1)]
    return [*WORDPIECE_SPECIALS, *characters, *(f"##{character}" for character in characters)]


def write_wordpiece_vocabulary(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(wordpiece_vocab()) + "\n", encoding="utf-8")
