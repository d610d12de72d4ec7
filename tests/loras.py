"""LoRA files in the formats people download, for the tiny models: random low-rank updates (fixed seeds) under
the names each trainer writes.

- **kohya / AUTOMATIC1111** (sd-scripts): ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight`` and
  ``.alpha``, the module path with ``_`` for ``.``; SD 1.x files name the diffusers UNet's modules, SDXL files
  the original (``input_blocks.4.1…``) layout's; text encoders as ``lora_te_`` (SDXL: ``lora_te1_``, ``lora_te2_``).
- **LyCORIS LoCon**: kohya's names on the attention layers and the ResNets' 3×3 convolutions too.
- **LyCORIS LoHa**: Hadamard-product factors (``hada_w1_a`` …), which diffusers does not load.
- **FLUX kohya**: the original FLUX layout's names (``lora_unet_double_blocks_0_img_attn_qkv``), fused
  projections as one pair.
- **FLUX XLabs**: ``double_blocks.0.processor.qkv_lora1.down.weight`` and its kin.
- **FLUX diffusers / peft / ai-toolkit**: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tests.checkpoints import _unet

RANK = 4
# Large enough that a tiny model's image moves well past rounding, small enough to stay an image.
SCALE = 0.3


def _pair(generator: torch.Generator, rows: int, columns: int, *, kernel: tuple[int, ...] = ()) -> tuple[Any, Any]:
    down = torch.randn(RANK, columns, *kernel, generator=generator) * SCALE
    up = torch.randn(rows, RANK, *((1,) * len(kernel)), generator=generator) * SCALE
    return down, up


def _kohya(state: dict[str, Any], name: str, down: Any, up: Any, alpha: float) -> None:
    state[f"{name}.lora_down.weight"] = down.contiguous()
    state[f"{name}.lora_up.weight"] = up.contiguous()
    state[f"{name}.alpha"] = torch.tensor(alpha)


def _attention_linears(module: Any) -> Iterator[tuple[str, Any]]:
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.rsplit(".", 2)[-2:] != ["to_out", "1"] and (
                name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0", ".q_proj", ".k_proj", ".v_proj",
                               ".out_proj"))):
            yield name, layer


def _resnet_convs(unet: Any) -> Iterator[tuple[str, Any]]:
    for name, layer in unet.named_modules():
        if isinstance(layer, torch.nn.Conv2d) and ".resnets." in name and name.endswith((".conv1", ".conv2")):
            yield name, layer


def _original_names(unet: Any) -> dict[str, str]:
    """Each diffusers UNet parameter's name in the original layout (as SDXL trainers name modules)."""
    keys = {key: key for key in unet.state_dict()}
    moved = _unet(types.SimpleNamespace(state_dict=lambda: keys, config=unet.config))
    return {ours: theirs.removeprefix("model.diffusion_model.") for theirs, ours in moved.items()}


def kohya_sd(unet: Any, text_encoders: tuple[Any, ...], *, seed: int, original_layout: bool = False,
             locon: bool = False, alpha: float = RANK / 2) -> dict[str, Any]:
    """A kohya LoRA (or LoCon) of an SD 1.x (``original_layout`` False) or SDXL (True) UNet and text encoders."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    renamed = _original_names(unet) if original_layout else {}
    layers = list(_attention_linears(unet)) + (list(_resnet_convs(unet)) if locon else [])
    for name, layer in layers:
        path = renamed[f"{name}.weight"].removesuffix(".weight") if original_layout else name
        if isinstance(layer, torch.nn.Conv2d):
            down, up = _pair(generator, layer.out_channels, layer.in_channels, kernel=layer.kernel_size)
        else:
            down, up = _pair(generator, layer.out_features, layer.in_features)
        _kohya(state, "lora_unet_" + path.replace(".", "_"), down, up, alpha)
    prefixes = ("lora_te",) if len(text_encoders) == 1 else ("lora_te1", "lora_te2")[:len(text_encoders)]
    for prefix, encoder in zip(prefixes, text_encoders, strict=True):
        _kohya_text_encoder(state, prefix, encoder, generator, alpha)
    return state


def _kohya_text_encoder(state: dict[str, Any], prefix: str, encoder: Any, generator: torch.Generator,
                        alpha: float) -> None:
    for name, layer in _attention_linears(encoder):
        # Trainers name CLIP's modules with transformers' older ``text_model.`` level, which newer versions drop.
        path = name if name.startswith("text_model.") else f"text_model.{name}"
        down, up = _pair(generator, layer.out_features, layer.in_features)
        _kohya(state, f"{prefix}_" + path.replace(".", "_"), down, up, alpha)


def loha_sd(unet: Any, *, seed: int) -> dict[str, Any]:
    """A LyCORIS LoHa of the UNet's attention: two factor pairs whose product's Hadamard product is the update."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    for name, layer in _attention_linears(unet):
        key = "lora_unet_" + name.replace(".", "_")
        for factor in ("1", "2"):
            down, up = _pair(generator, layer.out_features, layer.in_features)
            state[f"{key}.hada_w{factor}_a"], state[f"{key}.hada_w{factor}_b"] = up.contiguous(), down.contiguous()
        state[f"{key}.alpha"] = torch.tensor(float(RANK))
    return state


def _flux_widths(transformer: Any) -> tuple[int, int]:
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return inner, transformer.transformer_blocks[0].ff.net[0].proj.out_features


def kohya_flux(transformer: Any, *, seed: int, alpha: float = RANK / 2, text_encoder: Any = None) -> dict[str, Any]:
    """A FLUX LoRA as sd-scripts writes it: the original layout's names, q/k/v fused; with ``text_encoder``, CLIP's
    layers too (``lora_te1_``)."""
    generator = torch.Generator().manual_seed(seed)
    inner, mlp = _flux_widths(transformer)
    state: dict[str, Any] = {}
    for i in range(len(transformer.transformer_blocks)):
        for stream in ("img", "txt"):
            for name, rows, columns in (("attn_qkv", 3 * inner, inner), ("attn_proj", inner, inner),
                                        ("mlp_0", mlp, inner), ("mlp_2", inner, mlp)):
                _kohya(state, f"lora_unet_double_blocks_{i}_{stream}_{name}", *_pair(generator, rows, columns), alpha)
    for i in range(len(transformer.single_transformer_blocks)):
        # linear1 fuses q, k, v and the MLP at FLUX.1's own widths, which diffusers' converter assumes.
        _kohya(state, f"lora_unet_single_blocks_{i}_linear2", *_pair(generator, inner, inner + mlp), alpha)
    if text_encoder is not None:
        _kohya_text_encoder(state, "lora_te1", text_encoder, generator, alpha)
    return state


def xlabs_flux(transformer: Any, *, seed: int) -> dict[str, Any]:
    """A FLUX LoRA as XLabs' trainer writes it: attention processors' LoRAs of the double blocks."""
    generator = torch.Generator().manual_seed(seed)
    inner, _ = _flux_widths(transformer)
    state: dict[str, Any] = {}
    for i in range(len(transformer.transformer_blocks)):
        for name, rows in (("qkv_lora1", 3 * inner), ("proj_lora1", inner), ("qkv_lora2", 3 * inner),
                           ("proj_lora2", inner)):
            down, up = _pair(generator, rows, inner)
            state[f"double_blocks.{i}.processor.{name}.down.weight"] = down.contiguous()
            state[f"double_blocks.{i}.processor.{name}.up.weight"] = up.contiguous()
    return state


def peft_flux(transformer: Any, *, seed: int) -> dict[str, Any]:
    """A FLUX LoRA as diffusers' and ai-toolkit's training write it: ``transformer.<module>.lora_A/B``."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    for name, layer in transformer.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.endswith(
                (".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.to_out.0", ".attn.add_q_proj", ".attn.add_k_proj",
                 ".attn.add_v_proj", ".attn.to_add_out", ".proj_out")) and "single_transformer_blocks" in name or (
                isinstance(layer, torch.nn.Linear) and name.startswith("transformer_blocks.") and name.endswith(
                    (".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.to_out.0", ".attn.add_q_proj",
                     ".attn.add_k_proj", ".attn.add_v_proj", ".attn.to_add_out"))):
            down, up = _pair(generator, layer.out_features, layer.in_features)
            state[f"transformer.{name}.lora_A.weight"] = down.contiguous()
            state[f"transformer.{name}.lora_B.weight"] = up.contiguous()
    return state


def save(state: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
