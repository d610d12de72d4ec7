"""The embedded IP-Adapter ``imagewire:tiny-ip-adapter@1`` (builder ``tiny-ip-adapter``): an IP-Adapter that fits
``imagewire:tiny@1``, in the layout of an operator's IP-Adapter folder (``air_registry/ip_adapters.py``).

``ip-adapter.safetensors`` holds what h94's IP-Adapter files hold, in their key names, so that loading it runs the
same diffusers code as a real adapter: ``image_proj.proj.*`` and ``image_proj.norm.*`` (the projection of the image
embedding to 4 extra tokens of the UNet's cross-attention width) and ``ip_adapter.<n>.to_k_ip.weight`` /
``to_v_ip.weight`` for each cross-attention layer of the UNet, numbered as diffusers numbers them (odd numbers, in
the order of ``unet.attn_processors``). ``image_encoder/`` is a tiny ``CLIPVisionModelWithProjection`` whose
projection width is what the adapter's projection reads. Every weight is drawn from fixed seeds, large enough that
a guide image visibly changes the result.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from imagewire.air_registry.ip_adapters import IMAGE_ENCODER, WEIGHTS
from imagewire.air_registry.tiny.sd import CROSS_ATTENTION_DIM, _build_unet

MARKER = WEIGHTS  # written last of the two, into a staging folder that is renamed into place

_ENCODER_SEED = 21
_ADAPTER_SEED = 22
IMAGE_SIZE = 32           # pixels the encoder reads (its feature extractor resizes and crops guide images to it)
EMBEDDING_WIDTH = 16      # the encoder's projection: the image embedding the adapter projects
TOKENS = 4                # the image tokens a (non-plus) IP-Adapter adds to the text's
_STD = 0.5                # of the adapter's weights: enough for the guide image to show in a few steps


def build_image_encoder() -> CLIPVisionModelWithProjection:
    torch.manual_seed(_ENCODER_SEED)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=IMAGE_SIZE, patch_size=8, projection_dim=EMBEDDING_WIDTH, num_channels=3)
    return CLIPVisionModelWithProjection(config).eval()


def adapter_state_dict() -> dict[str, torch.Tensor]:
    """The adapter's tensors, in h94's key names."""
    unet = _build_unet()
    config = unet.config
    generator = torch.Generator("cpu").manual_seed(_ADAPTER_SEED)

    def drawn(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * _STD).contiguous()

    tensors = {
        "image_proj.proj.weight": drawn(CROSS_ATTENTION_DIM * TOKENS, EMBEDDING_WIDTH),
        "image_proj.proj.bias": drawn(CROSS_ATTENTION_DIM * TOKENS),
        "image_proj.norm.weight": torch.ones(CROSS_ATTENTION_DIM),
        "image_proj.norm.bias": torch.zeros(CROSS_ATTENTION_DIM),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue  # self-attention: no image tokens
        # The width of the block the layer is in, as diffusers works it out when it loads the adapter.
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else None
        widths = list(config["block_out_channels"])
        hidden = (widths[-1] if block is None else
                  list(reversed(widths))[block] if name.startswith("up_blocks") else widths[block])
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = drawn(hidden, CROSS_ATTENTION_DIM)
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = drawn(hidden, CROSS_ATTENTION_DIM)
        key_id += 2
    return tensors


def build(directory: Path) -> None:
    directory = Path(directory)
    with torch.random.fork_rng(devices=[]):
        encoder = build_image_encoder()
        tensors = adapter_state_dict()
    encoder.save_pretrained(directory / IMAGE_ENCODER, safe_serialization=True)
    save_file(tensors, str(directory / WEIGHTS))
