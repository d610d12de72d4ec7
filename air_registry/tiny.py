"""The embedded model ``imagewire:tiny@1``: a Stable Diffusion pipeline small enough to run anywhere.

Its weights are random, so its images are noise, but every code path of a real SD 1.x model runs
through it: the CLIP tokenizer and text encoder, a cross-attention UNet, a VAE with the real latent
scale factor of 8, and a standard scheduler. That lets the whole server be exercised on a CPU
without downloading anything.

The model is built from fixed seeds, so every build on a machine with the same library versions
writes the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

# Imported from their own modules rather than from ``diffusers``: the package's lazy top level shows
# type checkers placeholder classes without methods.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from imagewire.air_registry.weights import MODEL_INDEX

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"

# One fixed seed per component: changing one component's shape leaves the others' weights as they were.
_TEXT_ENCODER_SEED = 1
_UNET_SEED = 2
_VAE_SEED = 3

CROSS_ATTENTION_DIM = 32

# Components draw their initial weights from torch's global generator, seeded per component: two
# builds in one process at once would interleave their draws, so builds in a process take turns.
_BUILD_LOCK = threading.Lock()


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


def _tokenizer_vocab() -> dict[str, int]:
    """Every single byte, alone and word-final, plus the start and end markers.

    No merges are needed: every prompt splits into one token per byte, which is all a random model
    needs, and no text can fall outside the vocabulary.
    """
    alphabet = _byte_level_alphabet()
    tokens = [*alphabet, *(character + "</w>" for character in alphabet), START_TOKEN, END_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def _write_vocabulary_files(directory: Path) -> None:
    # vocab.json and merges.txt are the files every version of the CLIP tokenizer can read.
    with open(directory / "vocab.json", "w", encoding="utf-8") as file:
        json.dump(_tokenizer_vocab(), file, ensure_ascii=False)
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def build_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory(prefix="imagewire-tiny-tokenizer-") as directory:
        _write_vocabulary_files(Path(directory))
        return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


def _build_text_encoder() -> CLIPTextModel:
    vocab = _tokenizer_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=CROSS_ATTENTION_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=CROSS_ATTENTION_DIM,
        bos_token_id=vocab[START_TOKEN],
        eos_token_id=vocab[END_TOKEN],
        pad_token_id=vocab[END_TOKEN],
    )
    torch.manual_seed(_TEXT_ENCODER_SEED)
    return CLIPTextModel(config)


def _build_unet() -> UNet2DConditionModel:
    torch.manual_seed(_UNET_SEED)
    return UNet2DConditionModel(
        # 32 latents = 256 pixels: the size the pipeline picks when none is given.
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=2,
        norm_num_groups=8,
    )


def _build_vae() -> AutoencoderKL:
    torch.manual_seed(_VAE_SEED)
    # Four blocks, hence three downsamplings: the latent scale factor of 8 that every SD model has,
    # so image sizes behave exactly as with real weights.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
    )


def _build_scheduler() -> PNDMScheduler:
    # The noise schedule of Stable Diffusion 1.x, so that scheduler swaps behave as on real models.
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_pipeline() -> StableDiffusionPipeline:
    """The tiny pipeline in memory, float32 on the CPU, with the same weights on every call."""
    # The seeds above must not disturb the random state of whoever builds the model.
    with torch.random.fork_rng(devices=[]):
        # A plain dict: the pipeline's annotations are narrower than what it accepts (None, PNDM).
        components: dict[str, Any] = {
            "vae": _build_vae(),
            "text_encoder": _build_text_encoder(),
            "tokenizer": build_tokenizer(),
            "unet": _build_unet(),
            "scheduler": _build_scheduler(),
            "safety_checker": None,
            "feature_extractor": None,
        }
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


def ensure_tiny_model(path: Path) -> Path:
    """Make sure the tiny model is saved in diffusers format at ``path``; build it if it is not.

    The model is written to a temporary sibling and renamed into place, so ``path`` is either
    absent or complete, even when two processes build it at once.
    """
    path = Path(path)
    if (path / MODEL_INDEX).is_file():
        return path
    with _BUILD_LOCK:
        if (path / MODEL_INDEX).is_file():
            return path  # built by another thread while this one waited
        _build_into(path)
    return path


def _build_into(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        build_tiny_pipeline().save_pretrained(staging, safe_serialization=True)
        # Newer tokenizers save only tokenizer.json; the classic files keep the model readable by
        # older library versions and other tools.
        _write_vocabulary_files(staging / "tokenizer")
        _move_into_place(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, path: Path) -> None:
    try:
        os.replace(staging, path)
        return
    except OSError:
        # ``path`` exists and is not empty: either another build finished first, or a stale,
        # incomplete directory is in the way.
        if (path / MODEL_INDEX).is_file():
            return
    stale = Path(tempfile.mkdtemp(prefix=f".{path.name}.stale-", dir=path.parent))
    try:
        try:
            os.replace(path, stale / "model")
        except FileNotFoundError:
            pass  # another build moved it away already
        try:
            os.replace(staging, path)
        except OSError:
            if not (path / MODEL_INDEX).is_file():
                raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)
