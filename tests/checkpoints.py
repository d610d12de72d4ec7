"""Single-file checkpoints for tests: the tiny SD model written in the original Stable Diffusion layout
(one safetensors file; ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``),
as Civitai serves checkpoints.

diffusers reads this layout (``from_single_file``) but does not write it, so the renaming is spelled
out here, for the tiny model's shapes: a round trip through ``from_single_file`` must give back the
same images (``tests/air_registry/test_checkpoints.py``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _down_blocks(state: Any, blocks: int, per_block: int) -> dict[str, Any]:
    """The down blocks of a UNet or a ControlNet (they share them) under their original names."""
    out: dict[str, Any] = {}
    for i in range(blocks):
        for j in range(per_block):
            index = 1 + i * (per_block + 1) + j
            out.update(_renamed(state, f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", _RESNET))
            out.update(_renamed(state, f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1."))
        if i < blocks - 1:
            out.update(_renamed(state, f"down_blocks.{i}.downsamplers.0.conv.",
                                f"input_blocks.{(i + 1) * (per_block + 1)}.0.op."))
    return out


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
                         ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),
                         ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")):
        out.update(_renamed(state, ours + ".", theirs + "."))
    blocks = len(config.block_out_channels)
    out.update(_down_blocks(state, blocks, per_block))
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


def _controlnet(controlnet: Any) -> dict[str, Any]:
    """A ControlNet in the original layout (``control_model.*``): the UNet's encoder half, a zero convolution per
    skip connection (``zero_convs``), one after the middle block, and the guide image's encoder
    (``input_hint_block``)."""
    state, config = controlnet.state_dict(), controlnet.config
    per_block = config.layers_per_block
    out: dict[str, Any] = {}
    for ours, theirs in (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                         ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),
                         ("conv_in", "input_blocks.0.0"), ("controlnet_mid_block", "middle_block_out.0"),
                         ("controlnet_cond_embedding.conv_in", "input_hint_block.0"),
                         ("controlnet_cond_embedding.conv_out", "input_hint_block.14")):
        out.update(_renamed(state, ours + ".", theirs + "."))
    for index in range(6):  # the guide encoder's convolutions, each after a SiLU
        out.update(_renamed(state, f"controlnet_cond_embedding.blocks.{index}.", f"input_hint_block.{2 * index + 2}."))
    blocks = len(config.block_out_channels)
    out.update(_down_blocks(state, blocks, per_block))
    for index in range(1 + blocks * (per_block + 1) - 1):
        out.update(_renamed(state, f"controlnet_down_blocks.{index}.", f"zero_convs.{index}.0."))
    out.update(_renamed(state, "mid_block.resnets.0.", "middle_block.0.", _RESNET))
    out.update(_renamed(state, "mid_block.attentions.0.", "middle_block.1."))
    out.update(_renamed(state, "mid_block.resnets.1.", "middle_block.2.", _RESNET))
    assert len(out) == len(state), "every ControlNet weight has its place in the original layout"
    return {f"control_model.{key}": tensor for key, tensor in out.items()}


def controlnet_meta(architecture: str) -> Any:
    """A full-size ControlNet for ``architecture``'s UNet, on the meta device, from the config the server writes."""
    import diffusers

    from imagewire.air_registry.single_file import controlnet_config_folder

    folder = controlnet_config_folder(architecture, Path(tempfile.mkdtemp(prefix="controlnet-config-")))
    assert folder is not None
    config = json.loads((folder / "controlnet" / "config.json").read_text())
    return _meta(diffusers.ControlNetModel, config)


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


# ---------------------------------------------------------------- full-size layouts, on the meta device

def _meta(module_class: Any, config: Mapping[str, Any]) -> Any:
    """A model of the published shapes with no weights allocated: its state dict's tensors carry shapes only."""
    settable = {key: value for key, value in config.items() if not key.startswith("_")}
    with torch.device("meta"):
        if hasattr(module_class, "from_config"):
            return module_class.from_config(settable)
        return module_class(module_class.config_class(**settable))


def _component(architecture: str, name: str) -> Any:
    import diffusers
    import transformers

    from imagewire.air_registry.pipeline_configs import PIPELINE_CONFIGS

    component = PIPELINE_CONFIGS[architecture].components[name]
    assert component is not None
    library = diffusers if component.library == "diffusers" else transformers
    return _meta(getattr(library, component.class_name), component.config)


def _open_clip(text_encoder: Any) -> dict[str, Any]:
    """OpenCLIP's names for a CLIP text tower (SD 2.x's ``cond_stage_model.model.*``, SDXL's second embedder):
    one fused input projection per attention, and the projection as a bare matrix."""
    state = {key.removeprefix("text_model."): tensor for key, tensor in text_encoder.state_dict().items()}
    config = text_encoder.config
    width = config.hidden_size
    out: dict[str, Any] = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"], "ln_final.bias": state["final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"]
    # SD 2.x's tower has one more layer than the model reads (the penultimate layer's output is used).
    for layer in range(config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        out[theirs + "attn.in_proj_weight"] = torch.empty(3 * width, width, device="meta")
        out[theirs + "attn.in_proj_bias"] = torch.empty(3 * width, device="meta")
        for before, after in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                              ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for kind in ("weight", "bias"):
                out[f"{theirs}{after}.{kind}"] = state[f"{ours}{before}.{kind}"]
    return out


def _flux_transformer(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The FLUX.1 transformer's weight matrices in Black Forest Labs' own layout (``double_blocks.*``): what detection
    reads (biases left out)."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    head = config["attention_head_dim"]
    mlp = hidden * 4
    shapes: dict[str, tuple[int, ...]] = {
        "img_in.weight": (hidden, config["in_channels"]), "img_in.bias": (hidden,),
        "txt_in.weight": (hidden, config["joint_attention_dim"]), "txt_in.bias": (hidden,),
        "time_in.in_layer.weight": (hidden, 256), "time_in.out_layer.weight": (hidden, hidden),
        "vector_in.in_layer.weight": (hidden, config["pooled_projection_dim"]),
        "vector_in.out_layer.weight": (hidden, hidden),
        "final_layer.linear.weight": (64, hidden), "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
    }
    if config["guidance_embeds"]:
        shapes |= {"guidance_in.in_layer.weight": (hidden, 256), "guidance_in.out_layer.weight": (hidden, hidden)}
    for block in range(config["num_layers"]):
        for stream in ("img", "txt"):
            prefix = f"double_blocks.{block}.{stream}_"
            shapes |= {prefix + "mod.lin.weight": (6 * hidden, hidden),
                       prefix + "attn.qkv.weight": (3 * hidden, hidden),
                       prefix + "attn.norm.query_norm.scale": (head,), prefix + "attn.norm.key_norm.scale": (head,),
                       prefix + "attn.proj.weight": (hidden, hidden), prefix + "mlp.0.weight": (mlp, hidden),
                       prefix + "mlp.2.weight": (hidden, mlp)}
    for block in range(config["num_single_layers"]):
        prefix = f"single_blocks.{block}."
        shapes |= {prefix + "linear1.weight": (3 * hidden + mlp, hidden),
                   prefix + "linear2.weight": (hidden, hidden + mlp),
                   prefix + "norm.query_norm.scale": (head,), prefix + "norm.key_norm.scale": (head,),
                   prefix + "modulation.lin.weight": (3 * hidden, hidden)}
    return shapes


def _sd3_transformer(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The MMDiT's weight matrices in Stability's own layout (``joint_blocks.*``): what detection reads (biases and
    norms left out); MMDiT-X (SD 3.5 medium) has a second attention in its first blocks."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "x_embedder.proj.weight": (hidden, config["in_channels"], config["patch_size"], config["patch_size"]),
        "pos_embed": (1, config["pos_embed_max_size"] ** 2, hidden),
        "context_embedder.weight": (hidden, config["joint_attention_dim"]),
        "y_embedder.mlp.0.weight": (hidden, config["pooled_projection_dim"]),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "final_layer.linear.weight": (config["patch_size"] ** 2 * config["out_channels"], hidden),
    }
    for block in range(config["num_layers"]):
        for stream in ("x_block", "context_block"):
            prefix = f"joint_blocks.{block}.{stream}."
            shapes |= {prefix + "attn.qkv.weight": (3 * hidden, hidden), prefix + "attn.proj.weight": (hidden, hidden),
                       prefix + "mlp.fc1.weight": (4 * hidden, hidden), prefix + "mlp.fc2.weight": (hidden, 4 * hidden)}
        if block in config.get("dual_attention_layers", ()):
            shapes[f"joint_blocks.{block}.x_block.attn2.qkv.weight"] = (3 * hidden, hidden)
    return shapes


def _shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def original_layout_shapes(architecture: str) -> dict[str, tuple[int, ...]]:
    """The tensors' names and shapes of a checkpoint of ``architecture`` as it is published in one file (the
    original layout), from the configs the server writes for it; nothing is allocated. Every tensor for the
    UNet models; the weight matrices of the transformer for FLUX and SD 3."""
    from imagewire.air_registry.pipeline_configs import PIPELINE_CONFIGS

    table = PIPELINE_CONFIGS[architecture]
    components = {name: part for name, part in table.components.items() if part is not None}
    if "unet" in components:
        shapes = _shapes(_unet(_component(architecture, "unet")) | _vae(_component(architecture, "vae")))
        if architecture.startswith("sdxl"):
            embedders = [name for name in ("text_encoder", "text_encoder_2") if name in components]
            for index, name in enumerate(embedders):
                encoder = _component(architecture, name)
                state = ({f"model.{k}": v for k, v in _open_clip(encoder).items()} if name == "text_encoder_2"
                         else {f"transformer.{k}": v for k, v in _text_encoder(encoder).items()})
                shapes |= {f"conditioner.embedders.{index}.{key.removeprefix('cond_stage_model.transformer.')}":
                           tuple(tensor.shape) for key, tensor in state.items()}
        elif architecture == "sd21":
            encoder = _component(architecture, "text_encoder")
            shapes |= {f"cond_stage_model.model.{key}": tuple(t.shape) for key, t in _open_clip(encoder).items()}
        else:
            shapes |= _shapes(_text_encoder(_component(architecture, "text_encoder")))
        return shapes
    transformer = components["transformer"].config
    denoiser = (_flux_transformer(transformer) if components["transformer"].class_name.startswith("Flux")
                else _sd3_transformer(transformer))
    return {f"model.diffusion_model.{key}": shape for key, shape in denoiser.items()}


def write_sd15_checkpoint(path: Path) -> Path:
    """A full-size SD 1.5 checkpoint in the original layout, float16, with deterministic random weights (~2 GB).

    The weights are small (a standard deviation of 0.02, norms at 1) so that activations stay finite and
    images decode to numbers, not NaN."""
    unet, vae = _component("sd15", "unet"), _component("sd15", "vae")
    state = {**_unet(unet), **_vae(vae), **_text_encoder(_component("sd15", "text_encoder"))}
    generator = torch.Generator().manual_seed(15)
    tensors = {}
    for key in sorted(state):
        shape = tuple(state[key].shape)
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "ln.weight"))  \
                or ".norm" in key and key.endswith(".weight") and len(shape) == 1:
            tensors[key] = torch.ones(shape, dtype=torch.float16)
        else:
            tensors[key] = (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_header_only(path: Path, shapes: Mapping[str, tuple[int, ...]], *, dtype: str = "F16") -> Path:
    """A safetensors file that has its header and no data: what detection reads, without gigabytes of weights."""
    import json
    import struct

    sizes = {"F16": 2, "BF16": 2, "F32": 4}
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        length = sizes[dtype]
        for dimension in shape:
            length *= dimension
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + length]}
        offset += length
    encoded = json.dumps(header).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded)
    return path
