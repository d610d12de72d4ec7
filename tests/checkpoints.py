"""Single-file checkpoints for tests: the tiny SD model written in the original Stable Diffusion layout
(one safetensors file; ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``),
as Civitai serves checkpoints.

diffusers reads this layout (``from_single_file``) but does not write it, so the renaming is spelled
out here, for the tiny model's shapes: a round trip through ``from_single_file`` must give back the
same images (``tests/air_registry/test_checkpoints.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _renamed(state: dict[str, Any], old: str, new: str, pairs: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """The entries of ``state`` under ``old``, moved under ``new``, each inner name renamed by ``pairs``."""
    moved = {}
    for key, tensor in state.items():
        if not key.startswith(old):
            continue
        rest = key[len(old):]
        for before, after in pairs:
            if rest.startswith(before + "."):
                rest = after + rest[len(before):]
        moved[new + rest] = tensor
    return moved


def _unet(unet: Any) -> dict[str, Any]:
    state, config = unet.state_dict(), unet.config
    per_block = config.layers_per_block
    out: dict[str, Any] = {}
    for ours, theirs in (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                         ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")):
        out.update(_renamed(state, ours + ".", theirs + "."))
    blocks = len(config.block_out_channels)
    for i in range(blocks):
        for j in range(per_block):
            index = 1 + i * (per_block + 1) + j
            out.update(_renamed(state, f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", _RESNET))
            out.update(_renamed(state, f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1."))
        if i < blocks - 1:
            out.update(_renamed(state, f"down_blocks.{i}.downsamplers.0.conv.",
                                f"input_blocks.{(i + 1) * (per_block + 1)}.0.op."))
    out.update(_renamed(state, "mid_block.resnets.0.", "middle_block.0.", _RESNET))
    out.update(_renamed(state, "mid_block.attentions.0.", "middle_block.1."))
    out.update(_renamed(state, "mid_block.resnets.1.", "middle_block.2.", _RESNET))
    for i in range(blocks):
        has_attention = any(key.startswith(f"up_blocks.{i}.attentions.") for key in state)
        for j in range(per_block + 1):
            index = i * (per_block + 1) + j
            out.update(_renamed(state, f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", _RESNET))
            out.update(_renamed(state, f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1."))
        if i < blocks - 1:
            last = i * (per_block + 1) + per_block
            out.update(_renamed(state, f"up_blocks.{i}.upsamplers.0.conv.",
                                f"output_blocks.{last}.{2 if has_attention else 1}.conv."))
    assert len(out) == len(state), "every UNet weight has its place in the original layout"
    return {f"model.diffusion_model.{key}": tensor for key, tensor in out.items()}


def _vae(vae: Any) -> dict[str, Any]:
    state = vae.state_dict()
    blocks = len(vae.config.block_out_channels)
    out: dict[str, Any] = {}
    for part in ("encoder", "decoder"):
        for ours, theirs in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out")):
            out.update(_renamed(state, f"{part}.{ours}.", f"{part}.{theirs}."))
        out.update(_renamed(state, f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.",
                            (("conv_shortcut", "nin_shortcut"),)))
        out.update(_renamed(state, f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.",
                            (("conv_shortcut", "nin_shortcut"),)))
        for key, tensor in _renamed(state, f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.",
                                    _VAE_ATTENTION).items():
            # The original attention projections are 1×1 convolutions.
            out[key] = tensor[:, :, None, None] if tensor.ndim == 2 else tensor
    for i in range(blocks):
        out.update(_renamed(state, f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        out.update(_renamed(state, f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                            f"encoder.down.{i}.downsample.conv."))
        # The original decoder counts its blocks from the latent side's far end.
        out.update(_renamed(state, f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{blocks - 1 - i}.block."))
        out.update(_renamed(state, f"decoder.up_blocks.{i}.upsamplers.0.conv.",
                            f"decoder.up.{blocks - 1 - i}.upsample.conv."))
    out = {key.replace("conv_shortcut", "nin_shortcut"): tensor for key, tensor in out.items()}
    for name in ("quant_conv", "post_quant_conv"):
        out.update(_renamed(state, f"{name}.", f"{name}."))
    assert len(out) == len(state), "every VAE weight has its place in the original layout"
    return {f"first_stage_model.{key}": tensor for key, tensor in out.items()}


def _text_encoder(text_encoder: Any) -> dict[str, Any]:
    # The original names keep transformers' older ``text_model.`` level, which newer versions drop.
    state = {key if key.startswith("text_model.") else f"text_model.{key}": tensor
             for key, tensor in text_encoder.state_dict().items()}
    return {f"cond_stage_model.transformer.{key}": tensor for key, tensor in state.items()}


def write_tiny_sd_checkpoint(path: Path) -> Path:
    """The tiny SD model (``imagewire:tiny@1``) as one checkpoint in the original layout, at ``path``."""
    from imagewire.air_registry.tiny.sd import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    tensors = {**_unet(pipe.unet), **_vae(pipe.vae), **_text_encoder(pipe.text_encoder)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(path))
    return path
