"""Components the embedded flow-matching models share: CLIP and T5 text encoders and a VAE with 16
latent channels, each a real architecture at a tiny width, with weights drawn from a given seed.

Callers build inside ``torch.random.fork_rng`` so that the seeds leave their caller's random state
alone (see ``flux.py``).
"""

from __future__ import annotations

import torch

# Imported from their own modules rather than from ``diffusers``: the package's lazy top level shows
# type checkers placeholder classes without methods.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from imagewire.air_registry.tiny.tokenizers import CLIP_MAX_LENGTH, END_TOKEN, START_TOKEN, clip_vocab, t5_vocab

CLIP_WIDTH = 32


def clip_text_encoder(seed: int, *, with_projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    """CLIP's text transformer; ``with_projection`` adds the projection SD 3 pools its prompts with."""
    vocab = clip_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=CLIP_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=CLIP_WIDTH,
        bos_token_id=vocab[START_TOKEN],
        eos_token_id=vocab[END_TOKEN],
        pad_token_id=vocab[END_TOKEN],
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def t5_encoder(seed: int, *, width: int) -> T5EncoderModel:
    """T5 v1.1's encoder (gated GELU feed-forward, relative position buckets) at ``width``."""
    config = T5Config(
        vocab_size=len(t5_vocab()),
        d_model=width,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config)


def latent16_vae(seed: int, *, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """The VAE of FLUX and SD 3: 16 latent channels, scale factor 8, no quantisation convolutions."""
    torch.manual_seed(seed)
    # Four blocks, hence three downsamplings: the latent scale factor of 8 the real models have, so that
    # image sizes behave exactly as with real weights.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
